"""`evaluate`: the paper's few-shot QA on an engine, mode by mode, batch by batch, resumable."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import interactive_output, progress_bar
from ..engines.base import Engine, LocalEngine, Sampling
from ..errors import InputError, InputTypeError
from ..prompts import ContextRef, ContextText, fewshot_qa_prompt, first_answer, normalize, resolve_documents
from .data import MODES, QARow, Questions, check_modes, load_rows, parse_modes
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
    check_modes(modes, rows, questions, store)
    generate_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    sampling = generator.sampling(**generate_kwargs)
    if sampling.n != 1:
        raise InputError(f"evaluation scores one answer per question: n must be 1, not {sampling.n}")
    engine = generator.describe()  # what determines its outputs: backend, decoder, encoder, fingerprints, ...
    settings = run_settings(rows, engine, store, shots=shots, seed=seed, chunk_size=chunk_size,
                            batch_size=batch_size, sampling=sampling)
    out = Path(output) if output is not None else None
    if out is not None:
        claim_output(out, settings, overwrite=overwrite)
    run = Run(generator, sampling, rows, questions, store, chunk_size, batch_size, out,
              interactive_output() if show_progress is None else show_progress)
    predictions: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    for mode in modes:
        predictions[mode], dropped = run.score(mode)
        if dropped:
            notes.append(f"predictions-{mode}.jsonl: {dropped} unreadable or incomplete line{'s' * (dropped > 1)} "
                         "dropped; those questions were asked again")
    report = EvalReport({mode: summarize(p) for mode, p in predictions.items()}, predictions, {
        "data": str(data) if isinstance(data, (str, Path)) else type(data).__name__,
        "encoder": engine.get("encoder"), "decoder": engine.get("decoder"), "backend": engine.get("backend"),
        "shots": shots, "seed": seed, "example_rows": questions.examples, "questions": len(questions.scored),
        "modes": modes, "run": settings,
    }, notes)
    if out is not None:
        report.save(out)
    return report


@dataclass
class Run:
    """One evaluation under way: its engine and settings, its rows, and where its predictions go."""

    generator: Engine
    sampling: Sampling
    rows: list[QARow]
    questions: Questions
    store: Any
    chunk_size: int | None
    batch_size: int
    out: Path | None
    show_progress: bool
    _examples: list[list[Any]] | None = None  # the examples' compressed documents: made once for every question

    def documents(self, indices: list[int], mode: str) -> list[list[Any]]:
        """Each row's documents: texts (full), contexts (compressed: read from the store, or the texts of all
        rows compressed at once), or nothing (closed). With a service, stored ids and texts travel as they are:
        the service reads its own store and compresses."""
        rows = [self.rows[i] for i in indices]
        if mode == "closed":
            return [[""] for _ in rows]  # fewshot_qa_prompt wants a document per question; closed shows none
        if mode == "full":
            return [list(r.passages or ()) for r in rows]
        docs = [[ContextRef(k) for k in r.passage_ids] if self.store is not None and r.passage_ids is not None
                else [ContextText(p.strip(), self.chunk_size) for p in r.passages or ()] for r in rows]
        if not isinstance(self.generator, LocalEngine):
            return docs
        return resolve_documents(docs, self.generator.compressor, self.store, show_progress_bar=False)

    def examples(self, mode: str) -> list[tuple[list[Any], str, str]]:
        """The few-shot examples of a mode's prompts: (documents, question, first gold answer)."""
        if mode != "compressed":
            docs = self.documents(self.questions.examples, mode)
        else:
            if self._examples is None:
                self._examples = self.documents(self.questions.examples, mode)
            docs = self._examples
        return [(ds, self.rows[i].question, self.rows[i].answers[0]) for ds, i in zip(docs, self.questions.examples)]

    def score(self, mode: str) -> tuple[list[dict[str, Any]], int]:
        """The predictions of every scored question in `mode` (those of an earlier run of the folder kept), and
        how many unreadable lines of that run were dropped."""
        examples = self.examples(mode)
        done, dropped = read_predictions(self.out, mode, set(self.questions.candidates))
        scored = self.questions.scored
        todo = [i for i in scored if i not in done]
        with progress_bar(total=len(scored), initial=len(scored) - len(todo), unit="question", desc=mode,
                          disable=not self.show_progress) as bar:
            for k in range(0, len(todo), self.batch_size):
                batch = todo[k: k + self.batch_size]
                new = self.predict(mode, batch, examples)
                write_predictions(self.out, mode, new)
                done.update({p["row"]: p for p in new})
                bar.update(len(batch))
        return [done[i] for i in scored], dropped

    def predict(self, mode: str, batch: list[int], examples: list[tuple[list[Any], str, str]]) -> list[dict[str, Any]]:
        """One batch of questions generated together: each one's prediction, scores and costs."""
        prompts = [fewshot_qa_prompt(self.rows[i].question, ds, examples, mode=PROMPT_MODES[mode])
                   for i, ds in zip(batch, self.documents(batch, mode))]
        results, total = _complete(self.generator, prompts, self.sampling)
        from_store = mode == "compressed" and self.store is not None  # stored contexts keep no text: estimated
        new = []
        for i, (text, positions, saved, prefill) in zip(batch, results):
            answer, r = first_answer(text), self.rows[i]
            new.append({"row": i, "question": r.question, "prediction": answer, "generated": text,
                        "answers": r.answers, "exact_match": exact_match(answer, r.answers),
                        "f1": f1_score(answer, r.answers), "prompt_positions": positions,
                        "tokens_saved": saved, "tokens_saved_estimated": from_store and bool(r.passage_ids),
                        "prefill_seconds": prefill / len(batch), "total_seconds": total / len(batch)})
        return new


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
