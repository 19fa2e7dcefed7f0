"""Accuracy as the paper measures it: few-shot QA, exact match and F1, compressed vs open book vs closed book.

    from arccompress import evaluate
    report = evaluate("nq_open_dev_top5.jsonl", generator=gen, shots=5)
    print(report.table())                      # exact match, F1, prompt positions, time, per mode
    report.scores["compressed"]["exact_match"]  # a fraction in [0, 1]

Rows are `{"question": str, "answers": [str, ...], "passages": [str, ...]}` (the retrieved passages, best
first), or `"passage_ids": [...]` of contexts in a ContextStore. `shots` rows, drawn with `seed`, become the
few-shot examples (answer: their first gold answer) and are not scored, as in the reference evaluation.
Prompts use the paper's template (`fewshot_qa_prompt`); the answer is the generated text before the first
blank line. Predictions are written as they come to `output/predictions-<mode>.jsonl`; a run started again
with the same output folder continues where it stopped.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .errors import InputError, InputTypeError, NotFoundError
from .prompts import fewshot_qa_prompt, first_answer

MODES = ("compressed", "full", "closed")
PROMPT_MODES = {"compressed": "compressed", "full": "text", "closed": "closed"}


# ----------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, punctuation removed, articles (a, an, the) removed, single spaces.

    Punctuation is ASCII's (as in SQuAD) and every other Unicode punctuation character (curly quotes, dashes).
    """
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(c for c in text if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _answers(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"answers must be a str or a non-empty list of str, not {answers!r}")
    return answers


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals a normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _answers(answers)))


def f1_score(prediction: str, answers: str | Sequence[str]) -> float:
    """Token F1 between the normalized prediction and the best-matching normalized gold answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in _answers(answers):
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ----------------------------------------------------------------------------- data


def load_rows(data: Any) -> list[dict[str, Any]]:
    """Rows of a QA set from a JSONL or Parquet path, a datasets.Dataset or a list of dicts, checked."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise NotFoundError(f"no such data file {path}")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            raw = pq.read_table(path).to_pylist()
            where = [f"{path} row {k}" for k in range(len(raw))]
        else:
            from .corpus import BadRowValue, jsonl_records

            raw, where = [], []
            for at, record in jsonl_records(path):
                if isinstance(record, BadRowValue):
                    raise InputError(f"{at}: {record}")
                raw.append(record)
                where.append(at)
    elif isinstance(data, Iterable):
        raw = [dict(r) if not isinstance(r, dict) else r for r in data]
        where = [f"row {k}" for k in range(len(raw))]
    else:
        raise InputTypeError(f"data must be a JSONL or Parquet path, a datasets.Dataset or a list of rows, not "
                        f"{type(data).__name__}")
    rows = []
    for row, at in zip(raw, where):
        if not isinstance(row, dict):
            raise InputError(f"{at}: a row must be an object, found {type(row).__name__}")
        question, answers = row.get("question"), row.get("answers", row.get("answer"))
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{at}: no question")
        try:
            answers = _answers(answers)
        except ValueError:
            raise InputError(f"{at}: 'answers' must be a non-empty list of str") from None
        passages, ids = row.get("passages"), row.get("passage_ids")
        if passages is not None and (not isinstance(passages, list) or not passages or
                                     not all(isinstance(p, str) and p.strip() for p in passages)):
            raise InputError(f"{at}: 'passages' must be a non-empty list of non-empty str")
        if ids is not None and (not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids)):
            raise InputError(f"{at}: 'passage_ids' must be a non-empty list of str")
        if passages is None and ids is None:
            raise InputError(f"{at}: a row needs 'passages' (texts) or 'passage_ids' (ids in a store)")
        rows.append({"question": question, "answers": answers, "passages": passages, "passage_ids": ids, "where": at})
    if not rows:
        raise InputError("the data has no rows")
    return rows


def choose_examples(n_rows: int, shots: int, seed: int) -> list[int]:
    """Indices of the few-shot example rows: `shots` of them, drawn with `seed` (the same for every run)."""
    if shots < 0 or shots >= n_rows:
        raise InputError(f"shots must be between 0 and {n_rows - 1} for {n_rows} rows, not {shots}")
    return sorted(random.Random(seed).sample(range(n_rows), shots))


# ----------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """Scores and predictions per mode. `scores[mode]` holds exact_match and f1 (fractions in [0, 1]), the
    number of questions, the mean prompt positions, the mean decoder tokens the compression saved per prompt,
    and the prefill and total generation seconds."""

    scores: dict[str, dict[str, float]]
    predictions: dict[str, list[dict[str, Any]]]
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        head = ("mode", "EM %", "F1 %", "questions", "prompt positions", "tokens saved", "prefill s", "total s")
        rows = [head] + [(
            mode, f"{s['exact_match'] * 100:.1f}", f"{s['f1'] * 100:.1f}", str(s["questions"]),
            f"{s['mean_prompt_positions']:.0f}", f"{s['mean_tokens_saved']:.0f}", f"{s['prefill_seconds']:.2f}",
            f"{s['total_seconds']:.2f}") for mode, s in self.scores.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         for r in rows)

    def to_markdown(self) -> str:
        c = self.config
        lines = [f"# arccompress eval: {c.get('data', '')}", "",
                 f"encoder `{c.get('encoder')}`, decoder `{c.get('decoder')}` ({c.get('backend')}), {c.get('shots')} "
                 f"shots (seed {c.get('seed')}), {c.get('questions')} questions.", "",
                 "| mode | EM % | F1 % | questions | mean prompt positions | mean tokens saved | prefill s | total s |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for mode, s in self.scores.items():
            lines.append(f"| {mode} | {s['exact_match'] * 100:.1f} | {s['f1'] * 100:.1f} | {s['questions']} | "
                         f"{s['mean_prompt_positions']:.0f} | {s['mean_tokens_saved']:.0f} | {s['prefill_seconds']:.2f} | "
                         f"{s['total_seconds']:.2f} |")
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path) -> None:
        """report.json, report.md and report.png (score against prompt positions; needs matplotlib)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps({"config": self.config, "scores": self.scores}, indent=2))
        (folder / "report.md").write_text(self.to_markdown())
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode, s in self.scores.items():
            ax.scatter(s["mean_prompt_positions"], s["exact_match"] * 100, s=60, label=mode)
            ax.annotate(f"{mode} {s['exact_match'] * 100:.1f}", (s["mean_prompt_positions"], s["exact_match"] * 100),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("mean decoder prompt positions")
        ax.set_ylabel("exact match (%)")
        ax.set_title(f"{self.config.get('shots')}-shot QA, {self.config.get('questions')} questions", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "report.png", dpi=120)
        plt.close(fig)


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    data: Any,
    *,
    generator: Any,
    modes: Sequence[str] = MODES,
    shots: int = 5,
    limit: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    store: Any = None,
    output: str | Path | None = None,
    batch_size: int = 16,
    show_progress: bool | None = None,
    **generate_kwargs: Any,
) -> EvalReport:
    """Score a QA set in each mode: "compressed" (documents compressed), "full" (open book: the documents'
    text) and "closed" (no documents), with `shots` few-shot examples in the paper's format.

    `generator` is a Generator (transformers) or a VLLMGenerator; generate_kwargs go to its `generate`
    (greedy unless told otherwise; max_new_tokens defaults to 32). Rows with `passage_ids` take their contexts
    from `store`. Each passage is compressed once per run (the examples' once for all questions).
    """
    from .runtime import interactive_output, progress_bar

    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise InputError(f"modes must be among {', '.join(MODES)}, not {list(modes)}")
    rows = load_rows(data)
    example_idx = choose_examples(len(rows), shots, seed)
    scored = [i for i in range(len(rows)) if i not in set(example_idx)]
    if limit is not None:
        scored = scored[:limit]
    for mode in modes:
        need = "passages" if mode == "full" else "passages or passage_ids" if mode == "compressed" else None
        for i in ([] if need is None else scored + example_idx):
            r = rows[i]
            if mode == "full" and r["passages"] is None:
                raise InputError(f"{r['where']}: mode 'full' needs the passages' text ('passages')")
            if mode == "compressed" and r["passages"] is None and store is None:
                raise InputError(f"{r['where']}: 'passage_ids' need store=")
    generate_kwargs.setdefault("max_new_tokens", 32)
    comp = generator.compressor
    out = Path(output) if output is not None else None
    if out is not None:
        _claim_output(out, {"data": str(data) if isinstance(data, (str, Path)) else None, "shots": shots, "seed": seed,
                            "rows": len(rows), "encoder": comp.fingerprint, "decoder": _decoder_name(generator),
                            "chunk_size": chunk_size, "generate_kwargs": {k: repr(v) for k, v in generate_kwargs.items()}})
    if show_progress is None:
        show_progress = interactive_output()

    def documents(indices: list[int], mode: str) -> list[list]:
        """Each row's documents: texts, or (compressed mode) contexts, the texts of all rows compressed at once."""
        docs = []
        for i in indices:
            r = rows[i]
            if mode == "compressed" and r["passage_ids"] is not None and store is not None:
                docs.append(store.get_many(r["passage_ids"], device=comp.device))
            else:
                docs.append(list(r["passages"]))
        if mode != "compressed":
            return docs
        texts = [d.strip() for ds in docs for d in ds if isinstance(d, str)]
        made = iter(comp.compress(texts, chunk_size=chunk_size)) if texts else iter(())
        return [[next(made) if isinstance(d, str) else d for d in ds] for ds in docs]

    compressed_examples = None
    predictions: dict[str, list[dict[str, Any]]] = {}
    scores: dict[str, dict[str, float]] = {}
    for mode in modes:
        prompt_mode = PROMPT_MODES[mode]
        if mode == "compressed" and compressed_examples is None:
            compressed_examples = documents(example_idx, mode)  # once, for every question
        example_docs = compressed_examples if mode == "compressed" else documents(example_idx, mode)
        examples = [(ds, rows[i]["question"], rows[i]["answers"][0]) for ds, i in zip(example_docs, example_idx)]
        done = _read_predictions(out, mode, scored)
        todo = [i for i in scored if i not in done]
        with progress_bar(total=len(scored), initial=len(scored) - len(todo), unit="question", desc=mode,
                          disable=not show_progress) as bar:
            for k in range(0, len(todo), batch_size):
                batch = todo[k: k + batch_size]
                prompts = [fewshot_qa_prompt(rows[i]["question"], ds, examples, mode=prompt_mode)
                           for i, ds in zip(batch, documents(batch, mode))]
                savings = [generator.savings(p) for p in prompts]
                ids, prefill, total = _timed_generation(generator, prompts, generate_kwargs)
                # decoded here, the same way for every backend: the same tokens give the same prediction
                texts_out = generator.tokenizer.batch_decode(ids, skip_special_tokens=True)
                new = []
                for i, text, s in zip(batch, texts_out, savings):
                    answer = first_answer(text)
                    new.append({"row": i, "question": rows[i]["question"], "prediction": answer, "generated": text,
                                "answers": rows[i]["answers"], "exact_match": exact_match(answer, rows[i]["answers"]),
                                "f1": f1_score(answer, rows[i]["answers"]), "prompt_positions": s.prompt_length,
                                "tokens_saved": s.tokens_saved or 0, "prefill_seconds": prefill / len(batch),
                                "total_seconds": total / len(batch)})
                _write_predictions(out, mode, new)
                done.update({p["row"]: p for p in new})
                bar.update(len(batch))
        predictions[mode] = [done[i] for i in scored]
        scores[mode] = _summary(predictions[mode])
    report = EvalReport(scores, predictions, {
        "data": str(data) if isinstance(data, (str, Path)) else type(data).__name__,
        "encoder": comp.name, "decoder": _decoder_name(generator), "backend": type(generator).__name__,
        "shots": shots, "seed": seed, "example_rows": example_idx, "questions": len(scored), "modes": list(modes),
        "generate_kwargs": {k: v for k, v in generate_kwargs.items() if isinstance(v, (int, float, str, bool))},
    })
    if out is not None:
        report.save(out)
    return report


class _FirstStepClock(LogitsProcessor):
    """Notes when the first step's logits arrive: the end of the prefill (transformers calls logits processors
    once per step, with or without sampling)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.at = time.perf_counter()
        return scores


def _timed_generation(generator: Any, prompts: list, kwargs: dict[str, Any]) -> tuple[list[list[int]], float, float]:
    """(token ids, prefill seconds, total seconds) of one batch, generated once.

    transformers: the prefill ends when the first step's logits reach the logits processors. vLLM: the longest
    time to first token of the batch's requests when the engine logs statistics (disable_log_stats=False),
    else a second, one-token run measures it."""
    start = time.perf_counter()
    if hasattr(generator, "generate_outputs"):  # VLLMGenerator
        from .vllm import without_eos

        outputs = generator.generate_outputs(prompts, **kwargs)
        total = time.perf_counter() - start
        ids = [without_eos(o.outputs[0].token_ids, generator.tokenizer) for o in outputs]
        latencies = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None) is not None]
        if outputs and len(latencies) == len(outputs):
            return ids, max(latencies), total
        start = time.perf_counter()
        generator.generate_ids(prompts, **(kwargs | {"max_new_tokens": 1}))
        return ids, time.perf_counter() - start, total
    clock = _FirstStepClock()
    processors = LogitsProcessorList([*(kwargs.get("logits_processor") or []), clock])
    ids = generator.generate_ids(prompts, **(kwargs | {"logits_processor": processors}))
    total = time.perf_counter() - start
    return ids, (clock.at - start) if clock.at is not None else total, total


def _decoder_name(generator: Any) -> str:
    model = getattr(generator, "model", None)
    if model is not None and hasattr(model, "config"):
        return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
    llm = getattr(generator, "llm", None)
    return str(llm.llm_engine.model_config.model) if llm is not None else type(generator).__name__


def _summary(preds: list[dict[str, Any]]) -> dict[str, float]:
    n = len(preds)
    mean = (lambda key: sum(p[key] for p in preds) / n) if n else (lambda key: 0.0)  # noqa: E731
    return {"exact_match": mean("exact_match"), "f1": mean("f1"), "questions": n,
            "mean_prompt_positions": mean("prompt_positions"), "mean_tokens_saved": mean("tokens_saved"),
            "prefill_seconds": sum(p["prefill_seconds"] for p in preds),
            "total_seconds": sum(p["total_seconds"] for p in preds)}


def _claim_output(out: Path, run: dict[str, Any]) -> None:
    """Make `out` this run's folder; a folder holding another run's predictions (other data, shots, models or
    generation settings) is refused instead of mixing them."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "run.json"
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != run:
            raise InputError(f"{out} holds predictions of another run (settings in {marker}); choose another --output "
                             "or remove it")
        return
    marker.write_text(json.dumps(run, indent=2))


def _read_predictions(out: Path | None, mode: str, scored: list[int]) -> dict[int, dict[str, Any]]:
    """Predictions a previous run of this output folder wrote (a line cut by a crash is dropped)."""
    if out is None or not (out / f"predictions-{mode}.jsonl").is_file():
        return {}
    wanted, done = set(scored), {}
    for line in (out / f"predictions-{mode}.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            p = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(p, dict) and p.get("row") in wanted:
            done[p["row"]] = p
    return done


def _write_predictions(out: Path | None, mode: str, preds: list[dict[str, Any]]) -> None:
    if out is None:
        return
    with open(out / f"predictions-{mode}.jsonl", "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
        f.flush()
