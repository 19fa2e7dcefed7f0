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

The package: `metrics` (answer normalization, exact match, F1), `data` (rows, examples, modes), `run` (`evaluate`),
`folder` (a run's key and its predictions files), `report` (`EvalReport`).
"""

from __future__ import annotations

from .data import MODES, QARow, Questions, check_modes, choose_examples, load_rows, parse_modes
from .metrics import exact_match, f1_score, normalize_answer
from .report import EvalReport
from .run import evaluate

__all__ = ["MODES", "EvalReport", "QARow", "Questions", "check_modes", "choose_examples", "evaluate", "exact_match",
           "f1_score", "load_rows", "normalize_answer", "parse_modes"]
