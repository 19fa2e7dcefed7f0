"""`evaluate`: the paper's few-shot QA on an engine, mode by mode, batch by batch, resumable."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..console import interactive_output, progress_bar
from ..engines.base import Engine, LocalEngine, Sampling
from ..errors import InputError, InputTypeError
from ..prompts import ContextRef, ContextText, fewshot_qa_prompt, first_answer, normalize
from .data import MODES, Questions, check_modes, load_rows, parse_modes
from .folder import claim_output, read_predictions, run_settings, write_predictions
from .metrics import exact_match, f1_score, summarize
from .report import EvalReport

PROMPT_MODES = {"compressed": "compressed", "full": "text", "closed": "closed"}
DEFAULT_MAX_NEW_TOKENS = 32


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
    run = run_settings(rows, engine, store, shots=shots, seed=seed, chunk_size=chunk_size, batch_size=batch_size,
                        sampling=sampling)
    out = Path(output) if output is not None else None
    if out is not None:
        claim_output(out, run, overwrite=overwrite)
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
        done, dropped = read_predictions(out, mode, set(questions.candidates))
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
                write_predictions(out, mode, new)
                done.update({p["row"]: p for p in new})
                bar.update(len(batch))
        predictions[mode] = [done[i] for i in scored]
        scores[mode] = summarize(predictions[mode])
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
