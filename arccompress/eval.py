"""Accuracy as the paper measures it: few-shot QA, exact match and F1, compressed vs open book vs closed book.

    from arccompress import evaluate
    report = evaluate("nq_open_dev_top5.jsonl", generator=gen, shots=5)
    print(report.table())                      # exact match, F1, prompt positions, time, per mode
    report.scores["compressed"]["exact_match"]  # a fraction in [0, 1]

Rows are `{"question": str, "answers": [str, ...], "passages": [str, ...]}` (the retrieved passages, best
first), and/or `"passage_ids": [...]` of contexts in a ContextStore; they are read by `arccompress.sources`
(JSONL, Parquet, a list of dicts, a `datasets.Dataset`), each problem named by row and field. `shots` rows,
drawn with `seed`, become the few-shot examples (answer: their first gold answer) and are not scored, as in
the reference evaluation. Prompts use the paper's template (`fewshot_qa_prompt`); the answer is the generated
text before the first blank line.

Predictions are written as they come to `output/predictions-<mode>.jsonl`. A run is keyed by everything that
determines its predictions (the rows, the engine's description: backend, decoder and encoder fingerprints,
quantization, dtype; the store's identity; shots, seed, chunk size, batch size and every sampling setting):
started again with the same key, it continues where it stopped; with another key, the folder is refused unless
`overwrite=True`. Resuming reads the files as bytes and drops (and redoes) every line that does not parse or
validate, e.g. one a crash cut short.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import Engine, LocalEngine, Sampling
from .errors import ContextNotFoundError, InputError, InputTypeError, NotFoundError
from .prompts import ContextRef, ContextText, fewshot_qa_prompt, first_answer, normalize
from .runtime import interactive_output, progress_bar
from .sources import MISSING, normalize_id, read_records
from .tokenization import check_text

MODES = ("compressed", "full", "closed")
PROMPT_MODES = {"compressed": "compressed", "full": "text", "closed": "closed"}
DEFAULT_MAX_NEW_TOKENS = 32
RUN_FILE = "run.json"
REPORT_FILES = ("report.json", "report.md", "report.png")


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


@dataclass(frozen=True)
class QARow:
    """One question of a QA set: its gold answers, and its passages as text and/or as ids in a store."""

    question: str
    answers: list[str]
    passages: list[str] | None
    passage_ids: list[str] | None
    where: str  # the row's place in the data, for messages


def load_rows(data: Any) -> list[QARow]:
    """The rows of a QA set (a JSONL or Parquet path, a datasets.Dataset, or a list of dicts), each checked:
    InputError naming the row and the field at the first problem."""
    if isinstance(data, (str, Path)) and not Path(data).exists():
        raise NotFoundError(f"no such data file {data}")
    if isinstance(data, Iterator):
        data = list(data)  # a generator of dicts: read once
    rows = [qa_row(where, record) for where, record in read_records(data)]
    if not rows:
        raise InputError("the data has no rows")
    return rows


def qa_row(where: str, record: dict[str, Any]) -> QARow:
    """A checked row: a non-empty question, one answer or a non-empty list of them, and optional `passages`
    (non-empty texts) and `passage_ids` (ids as the corpus rule reads them: strs, or ints as their text)."""
    question = record.get("question", MISSING)
    if question is MISSING:
        raise InputError(f"{where}: no 'question' field")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: field 'question' must be a non-empty string, found {_shown(question)}")
    check_text(question, f"{where}, field 'question'")
    field_name = "answers" if "answers" in record or "answer" not in record else "answer"
    answers = record.get(field_name, MISSING)
    if answers is MISSING:
        raise InputError(f"{where}: no 'answers' field (the gold answers, a list of strings)")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: field {field_name!r} must be a non-empty list of strings, found {_shown(answers)}")
    for k, a in enumerate(answers):
        check_text(a, f"{where}, field {field_name!r} item {k}")
    passages = record.get("passages")
    if passages is not None:
        if not isinstance(passages, list) or not passages or \
                not all(isinstance(p, str) and p.strip() for p in passages):
            raise InputError(f"{where}: field 'passages' must be a non-empty list of non-empty strings, found "
                             f"{_shown(passages)}")
        for k, p in enumerate(passages):
            check_text(p, f"{where}, field 'passages' item {k}")
    ids = record.get("passage_ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise InputError(f"{where}: field 'passage_ids' must be a non-empty list of ids, found {_shown(ids)}")
        try:
            ids = [normalize_id(i) for i in ids]
        except InputError as e:
            raise InputError(f"{where}: field 'passage_ids': {e}") from None
    return QARow(question, list(answers), passages, ids, where)


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def choose_examples(n_rows: int, shots: int, seed: int) -> list[int]:
    """Indices of the few-shot example rows: `shots` of them, drawn with `seed` (the same for every run)."""
    if shots < 0 or shots >= n_rows:
        raise InputError(f"shots (--shots) must be between 0 and {n_rows - 1} for {n_rows} rows, not {shots}")
    return sorted(random.Random(seed).sample(range(n_rows), shots))


@dataclass(frozen=True)
class Questions:
    """Which rows a run uses: the few-shot examples, the rows it could score, and those it scores (`limit`)."""

    examples: list[int]
    candidates: list[int]
    scored: list[int]

    @classmethod
    def select(cls, n_rows: int, *, shots: int, seed: int, limit: int | None) -> Questions:
        examples = choose_examples(n_rows, shots, seed)
        candidates = [i for i in range(n_rows) if i not in set(examples)]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"limit (--limit) must be a positive int, not {limit!r}")
        return cls(examples, candidates, candidates[:limit] if limit is not None else candidates)


def parse_modes(modes: str | Sequence[str]) -> list[str]:
    """The modes asked for, in order, each once; InputError for an unknown one."""
    asked = list(dict.fromkeys([modes] if isinstance(modes, str) else modes))
    unknown = [m for m in asked if m not in MODES]
    if unknown or not asked:
        raise InputError(f"unknown mode {unknown[0]!r}: modes (--modes) are compressed, full and closed" if unknown
                         else "no modes: choose among compressed, full and closed (--modes)")
    return asked


def check_modes(modes: Sequence[str], rows: list[QARow], questions: Questions, store: Any) -> None:
    """Refuse up front a mode the rows cannot run, naming the first row and the way out: closed needs nothing,
    full needs the passages' text, compressed the text or ids in `store` (all present there)."""
    needed = questions.scored + questions.examples
    compressible = all(rows[i].passages is not None or (rows[i].passage_ids is not None and store is not None)
                       for i in needed)
    others = ["compressed", "closed"] if compressible else ["closed"]
    for i in needed:
        r = rows[i]
        if "full" in modes and r.passages is None:
            has = "only 'passage_ids'" if r.passage_ids is not None else "no 'passages'"
            raise InputError(f"mode full needs the passages' text: {r.where} has {has}; add 'passages' to the rows, "
                             f"or run --modes {','.join(others)} (modes={others})")
        if "compressed" in modes and r.passages is None:
            if r.passage_ids is None:
                raise InputError(f"mode compressed needs 'passages' or 'passage_ids': {r.where} has neither; add them, "
                                 f"or run closed book only (--modes closed / modes=['closed'])")
            if store is None:
                raise InputError(f"{r.where}: 'passage_ids' name contexts in a store: give the store "
                                 "(--store / store=)")
    if "compressed" in modes and store is not None:
        for i in needed:
            r = rows[i]
            missing = [k for k in r.passage_ids or () if k not in store]
            if missing:
                raise ContextNotFoundError(f"{r.where}: passage_ids not in the store {store.path}: "
                                           f"{', '.join(map(repr, missing[:5]))}")


# ----------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """Scores and predictions per mode. `scores[mode]` holds exact_match and f1 (fractions in [0, 1]), the
    number of questions, the mean prompt positions, the mean decoder positions the compression saved per prompt
    (`tokens_saved_estimated` when stored contexts, which keep no text, were counted by their encoder tokens),
    and the prefill and total generation seconds. `notes` says what a resumed run found and redid."""

    scores: dict[str, dict[str, Any]]
    predictions: dict[str, list[dict[str, Any]]]
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        head = ("mode", "EM %", "F1 %", "questions", "prompt positions", "tokens saved", "prefill s", "total s")
        rows = [head] + [(
            mode, f"{s['exact_match'] * 100:.1f}", f"{s['f1'] * 100:.1f}", str(s["questions"]),
            f"{s['mean_prompt_positions']:.0f}", _saved(s), f"{s['prefill_seconds']:.2f}",
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
                         f"{s['mean_prompt_positions']:.0f} | {_saved(s)} | {s['prefill_seconds']:.2f} | "
                         f"{s['total_seconds']:.2f} |")
        if any(s.get("tokens_saved_estimated") for s in self.scores.values()):
            lines += ["", "~ tokens saved by stored contexts are counted with the encoder's (Llama 3) tokens: exact "
                          "for a Llama 3 decoder, an estimate for others."]
        lines += [""] + [f"- {note}" for note in self.notes] if self.notes else []
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path) -> None:
        """report.json, report.md and report.png (score against prompt positions; needs matplotlib)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps({"config": self.config, "scores": self.scores,
                                                        "notes": self.notes}, indent=2))
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


def _saved(s: dict[str, Any]) -> str:
    return f"{'~' if s.get('tokens_saved_estimated') else ''}{s['mean_tokens_saved']:.0f}"


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    data: Any,
    *,
    generator: Engine,
    modes: Sequence[str] = MODES,
    shots: int = 5,
    limit: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    store: Any = None,
    output: str | Path | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    show_progress: bool | None = None,
    **generate_kwargs: Any,
) -> EvalReport:
    """Score a QA set in each mode: "compressed" (documents compressed), "full" (open book: the documents'
    text) and "closed" (no documents), with `shots` few-shot examples in the paper's format.

    `generator`: any engine (`Generator`, `VLLMGenerator`, `VLLMClient`, ...); generate_kwargs are its sampling
    settings (greedy unless told otherwise; max_new_tokens defaults to 32). Rows with `passage_ids` take their
    contexts from `store` in compressed mode; full mode needs every row's `passages` text; closed mode needs
    neither. Each passage is compressed once per run (the examples' once for all questions). `output`: the run's
    folder (predictions as they come, report files); a folder of another run is refused unless `overwrite`.
    """
    if not isinstance(generator, Engine):
        raise InputTypeError(f"generator must be an engine (Generator, VLLMGenerator, VLLMClient, ...), not "
                             f"{type(generator).__name__}")
    modes = parse_modes(modes)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, not {batch_size!r}")
    rows = load_rows(data)
    questions = Questions.select(len(rows), shots=shots, seed=seed, limit=limit)
    example_idx, scored = questions.examples, questions.scored
    check_modes(modes, rows, questions, store)
    generate_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    sampling = generator.sampling(**generate_kwargs)
    if sampling.n != 1:
        raise InputError(f"evaluation scores one answer per question: n must be 1, not {sampling.n}")
    engine = generator.describe()  # what determines its outputs: backend, decoder, encoder, fingerprints, ...
    run = _run_settings(rows, engine, store, shots=shots, seed=seed, chunk_size=chunk_size, batch_size=batch_size,
                        sampling=sampling)
    out = Path(output) if output is not None else None
    if out is not None:
        _claim_output(out, run, overwrite=overwrite)
    if show_progress is None:
        show_progress = interactive_output()
    comp = generator.compressor if isinstance(generator, LocalEngine) else None

    def documents(indices: list[int], mode: str) -> list[list[Any]]:
        """Each row's documents: texts (full), contexts (compressed: read from the store, or the texts of all
        rows compressed at once), or nothing (closed)."""
        if mode == "closed":
            return [[""] for _ in indices]  # fewshot_qa_prompt wants a document per question; closed shows none
        use_store = mode == "compressed" and store is not None
        # stored contexts: read here for a local engine; by id for a service, which reads its own store
        docs = [(store.get_many(rows[i].passage_ids, device=comp.device) if comp else
                 [ContextRef(k) for k in rows[i].passage_ids])
                if use_store and rows[i].passage_ids is not None else list(rows[i].passages) for i in indices]
        if mode == "full":
            return docs
        texts = [d.strip() for ds in docs for d in ds if isinstance(d, str)]
        if comp is None:
            made = iter([ContextText(t, chunk_size) for t in texts])
        else:
            made = iter(comp.compress(texts, chunk_size=chunk_size, show_progress_bar=False) if texts else [])
        return [[next(made) if isinstance(d, str) else d for d in ds] for ds in docs]

    compressed_examples = None
    predictions: dict[str, list[dict[str, Any]]] = {}
    scores: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for mode in modes:
        if mode == "compressed" and compressed_examples is None:
            compressed_examples = documents(example_idx, mode)  # once, for every question
        example_docs = compressed_examples if mode == "compressed" else documents(example_idx, mode)
        examples = [(ds, rows[i].question, rows[i].answers[0]) for ds, i in zip(example_docs, example_idx)]
        done, dropped = _read_predictions(out, mode, set(questions.candidates))
        if dropped:
            notes.append(f"predictions-{mode}.jsonl: {dropped} unreadable or incomplete line{'s' * (dropped > 1)} "
                         "dropped; those questions were asked again")
        todo = [i for i in scored if i not in done]
        from_store = mode == "compressed" and store is not None  # stored contexts keep no text: saved is estimated
        with progress_bar(total=len(scored), initial=len(scored) - len(todo), unit="question", desc=mode,
                          disable=not show_progress) as bar:
            for k in range(0, len(todo), batch_size):
                batch = todo[k: k + batch_size]
                prompts = [fewshot_qa_prompt(rows[i].question, ds, examples, mode=PROMPT_MODES[mode])
                           for i, ds in zip(batch, documents(batch, mode))]
                results, total = _complete(generator, prompts, sampling)
                new = []
                for i, (text, positions, saved, prefill) in zip(batch, results):
                    answer, r = first_answer(text), rows[i]
                    new.append({"row": i, "question": r.question, "prediction": answer, "generated": text,
                                "answers": r.answers, "exact_match": exact_match(answer, r.answers),
                                "f1": f1_score(answer, r.answers), "prompt_positions": positions,
                                "tokens_saved": saved, "tokens_saved_estimated": from_store and bool(r.passage_ids),
                                "prefill_seconds": prefill / len(batch), "total_seconds": total / len(batch)})
                _write_predictions(out, mode, new)
                done.update({p["row"]: p for p in new})
                bar.update(len(batch))
        predictions[mode] = [done[i] for i in scored]
        scores[mode] = _summary(predictions[mode])
    report = EvalReport(scores, predictions, {
        "data": str(data) if isinstance(data, (str, Path)) else type(data).__name__,
        "encoder": engine.get("encoder"), "decoder": engine.get("decoder"), "backend": engine.get("backend"),
        "shots": shots, "seed": seed, "example_rows": example_idx, "questions": len(scored), "modes": modes,
        "run": run,
    }, notes)
    if out is not None:
        report.save(out)
    return report


# ----------------------------------------------------------------------------- the engine


def _complete(engine: Engine, prompts: list[Any], sampling: Sampling
              ) -> tuple[list[tuple[str, int, int, float]], float]:
    """Generate one batch once: per prompt (text, prompt positions, positions saved, prefill seconds of the
    batch), and the batch's total seconds. The engine times the prefill (Engine.complete's time_prefill)."""
    normalised, _ = normalize(prompts)
    start = time.perf_counter()
    completions = engine.complete(normalised, sampling, time_prefill=True)
    total = time.perf_counter() - start
    prefill = max((c.prefill_seconds for c in completions if c.prefill_seconds is not None), default=total)
    return [(c.texts[0], c.prompt_positions or 0, c.positions_saved or 0, prefill) for c in completions], total



# ----------------------------------------------------------------------------- the run's folder

IDENTITY_FIELDS = ("backend", "decoder_fingerprint", "quantization", "dtype", "encoder_fingerprint", "head")


def _run_settings(rows: list[QARow], engine: dict[str, Any], store: Any, *, shots: int, seed: int,
                  chunk_size: int | None, batch_size: int, sampling: Sampling) -> dict[str, Any]:
    """Everything that determines a run's predictions, readable, and its key (a hash of it)."""
    data = hashlib.sha256(json.dumps([[r.question, r.answers, r.passages, r.passage_ids] for r in rows],
                                     ensure_ascii=True).encode()).hexdigest()
    manifest = getattr(store, "manifest", None) or {}
    settings: dict[str, Any] = {
        "data": f"{len(rows)} rows, sha256 {data[:16]}",
        **{k: engine.get(k) for k in IDENTITY_FIELDS},
        "store": None if store is None else f"{manifest.get('store_id')} ({manifest.get('codec', {}).get('name')})",
        "shots": shots, "seed": seed, "chunk_size": chunk_size, "batch_size": batch_size,
        **{f"sampling.{k}": _jsonable(v) for k, v in dataclasses.asdict(sampling).items()},
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return {"key": key, "settings": settings, "names": {"encoder": engine.get("encoder"),
                                                          "decoder": engine.get("decoder")}}


def _jsonable(value: Any) -> Any:
    """A setting as JSON: plain values as they are, containers element by element, objects by their type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return type(value).__name__


def _claim_output(out: Path, run: dict[str, Any], *, overwrite: bool) -> None:
    """Make `out` this run's folder. A folder holding another run's predictions is refused, naming what differs,
    unless `overwrite`: then that run's files (and only those) are removed first."""
    marker = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    previous: dict[str, Any] = {}
    if marker.is_file():
        try:
            previous = json.loads(marker.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            previous = {}
        if isinstance(previous, dict) and previous.get("key") == run["key"]:
            return
    ours = [out / name for name in (RUN_FILE, *REPORT_FILES)] + sorted(out.glob("predictions-*.jsonl"))
    if any(p.exists() for p in ours):
        if not overwrite:
            raise InputError(f"{out} holds predictions of another run ({_differences(previous, run)}); choose another "
                             "output folder, or replace them with --overwrite (overwrite=True)")
        for p in ours:
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(run, indent=2))
    os.replace(tmp, marker)


def _differences(previous: Any, run: dict[str, Any]) -> str:
    """What differs between a folder's run and this one, in a few words: "data 12 rows, sha256 ... -> ..."."""
    old = previous.get("settings") if isinstance(previous, dict) else None
    if not isinstance(old, dict):
        return "made by an earlier arccompress, or its run.json is unreadable"
    new = run["settings"]
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")


PREDICTION_FIELDS: dict[str, tuple[type, ...]] = {
    "question": (str,), "prediction": (str,), "generated": (str,), "answers": (list,),
    "exact_match": (int, float), "f1": (int, float), "prompt_positions": (int,), "tokens_saved": (int,),
    "prefill_seconds": (int, float), "total_seconds": (int, float),
}


def _valid_prediction(p: Any, rows: set[int]) -> bool:
    return isinstance(p, dict) and type(p.get("row")) is int and p["row"] in rows and all(
        isinstance(p.get(k), kinds) and not isinstance(p.get(k), bool) for k, kinds in PREDICTION_FIELDS.items())


def _read_predictions(out: Path | None, mode: str, rows: set[int]) -> tuple[dict[int, dict[str, Any]], int]:
    """Predictions a previous run of this folder wrote for `rows`, and how many lines were dropped: a line that
    is not UTF-8, not JSON or not a whole prediction (a crash cut it, an editor broke it). When any was dropped,
    or the last line has no newline, the file is rewritten with the good lines only, so that the next append
    starts on a fresh line."""
    path = None if out is None else out / f"predictions-{mode}.jsonl"
    if path is None or not path.is_file():
        return {}, 0
    data = path.read_bytes()
    done: dict[int, dict[str, Any]] = {}
    kept: list[bytes] = []
    dropped = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            p = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            p = None
        if isinstance(p, dict) and type(p.get("row")) is int and p["row"] not in rows:
            kept.append(line)  # a row of another limit or of the examples: kept, not used
        elif _valid_prediction(p, rows):
            done[p["row"]] = p
            kept.append(line)
        else:
            dropped += 1
    if dropped or (data and not data.endswith(b"\n")):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, path)
    return done, dropped


def _write_predictions(out: Path | None, mode: str, preds: list[dict[str, Any]]) -> None:
    if out is None:
        return
    with open(out / f"predictions-{mode}.jsonl", "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
        f.flush()


def _summary(preds: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(preds)
    mean = (lambda key: sum(p[key] for p in preds) / n) if n else (lambda key: 0.0)  # noqa: E731
    return {"exact_match": mean("exact_match"), "f1": mean("f1"), "questions": n,
            "mean_prompt_positions": mean("prompt_positions"), "mean_tokens_saved": mean("tokens_saved"),
            "tokens_saved_estimated": any(p.get("tokens_saved_estimated") for p in preds),
            "prefill_seconds": sum(p["prefill_seconds"] for p in preds),
            "total_seconds": sum(p["total_seconds"] for p in preds)}
