"""`arccompress eval`: SQuAD metrics on hand-checked cases, the few-shot draw, an end-to-end run, resuming."""

from __future__ import annotations

import json

import pytest

from arccompress import Compressor, ContextStore, Generator, evaluate
from arccompress.eval import choose_examples, exact_match, f1_score, load_rows, normalize_answer
from arccompress.prompts import fewshot_qa_prompt


@pytest.mark.parametrize("prediction, answers, em, f1", [
    ("Paris", ["Paris"], 1.0, 1.0),
    ("paris.", ["Paris"], 1.0, 1.0),  # case and punctuation
    ("The Eiffel Tower", ["Eiffel tower"], 1.0, 1.0),  # articles
    ("an apple a day", ["apple day"], 1.0, 1.0),
    ("  New   York  ", ["new york"], 1.0, 1.0),  # whitespace
    ("“Les Misérables”", ["Les Misérables"], 1.0, 1.0),  # unicode quotes are punctuation, accents stay
    ("Les Miserables", ["Les Misérables"], 0.0, 0.5),
    ("1,006 km", ["1006 km"], 1.0, 1.0),  # the comma goes, as in SQuAD
    ("Barack Obama", ["Obama", "Barack Obama"], 1.0, 1.0),  # best over gold answers
    ("president Barack Obama", ["Barack Obama"], 0.0, 0.8),  # precision 2/3, recall 1
    ("", ["Paris"], 0.0, 0.0),  # empty prediction
    ("the", ["a"], 1.0, 1.0),  # both normalise to nothing
    ("Paris", "Paris", 1.0, 1.0),  # one answer as a str
])
def test_metrics_on_hand_checked_cases(prediction, answers, em, f1):
    assert exact_match(prediction, answers) == em
    assert f1_score(prediction, answers) == pytest.approx(f1)


def test_normalization_and_bad_answers():
    assert normalize_answer("The  Quick—Brown, fox!") == "quickbrown fox"  # removed, not spaced, as in SQuAD
    with pytest.raises(ValueError, match="non-empty list"):
        exact_match("x", [])


def test_few_shot_draw_is_deterministic():
    a = choose_examples(100, 5, seed=0)
    assert a == choose_examples(100, 5, seed=0) and len(set(a)) == 5 and a == sorted(a)
    assert a != choose_examples(100, 5, seed=1)
    assert choose_examples(10, 0, seed=0) == []
    with pytest.raises(ValueError, match="shots"):
        choose_examples(5, 5, seed=0)


def test_prompt_modes_follow_the_reference_template():
    examples = [(["d1a ", "d1b"], "q1 ", "a1")]
    assert fewshot_qa_prompt("q2", ["d2"], examples, mode="text") == \
        "Document: d1a\nd1b\nQuestion: q1\nAnswer: a1\n\nDocument: d2\nQuestion: q2\nAnswer:"
    assert fewshot_qa_prompt("q2", ["d2"], examples, mode="closed") == "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer:"
    with pytest.raises(ValueError, match="mode"):
        fewshot_qa_prompt("q", "d", mode="open")


def qa_rows(n: int = 12) -> list[dict]:
    return [{"question": f"What is item {i}?", "answers": [f"value {i}", f"v{i}"],
             "passages": [f"Item {i} has the value {i}.", f"Item {i + 100} is unrelated to item {i}."]} for i in range(n)]


@pytest.fixture(scope="module")
def gen(tiny_dir) -> Generator:
    comp = Compressor.from_pretrained(tiny_dir / "hub")
    return Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp)


def test_end_to_end_report_and_resume(gen, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows()))
    out = tmp_path / "run"
    report = evaluate(data, generator=gen, shots=2, output=out, batch_size=4, max_new_tokens=6)
    assert set(report.scores) == {"compressed", "full", "closed"}
    for mode, s in report.scores.items():
        assert 0 <= s["exact_match"] <= 1 and 0 <= s["f1"] <= 1 and s["questions"] == 10
        assert s["total_seconds"] > 0 and s["prefill_seconds"] > 0
        preds = report.predictions[mode]
        assert len(preds) == 10 and {"question", "prediction", "answers", "exact_match"} <= set(preds[0])
        assert all("\n\n" not in p["prediction"] for p in preds)
        assert {p["row"] for p in preds}.isdisjoint(report.config["example_rows"])
    positions = {m: s["mean_prompt_positions"] for m, s in report.scores.items()}
    assert positions["closed"] < positions["compressed"] < positions["full"]  # what compression buys
    assert report.scores["compressed"]["mean_tokens_saved"] > 0 and report.scores["full"]["mean_tokens_saved"] == 0
    table = report.table()
    assert "EM %" in table and "compressed" in table
    assert json.loads((out / "report.json").read_text())["scores"]["full"]["questions"] == 10
    assert "| compressed |" in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 0
    # a killed run continues: drop the last predictions of one mode, truncate a line, run again
    lines = (out / "predictions-full.jsonl").read_text().splitlines()
    (out / "predictions-full.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])
    again = evaluate(data, generator=gen, shots=2, output=out, batch_size=4, max_new_tokens=6)
    assert [p["prediction"] for p in again.predictions["full"]] == [p["prediction"] for p in report.predictions["full"]]
    assert again.scores["full"]["exact_match"] == report.scores["full"]["exact_match"]
    with pytest.raises(ValueError, match="another run"):
        evaluate(data, generator=gen, shots=3, output=out, max_new_tokens=6)


def test_limit_modes_and_passages_from_a_store(gen, tmp_path):
    rows = qa_rows(8)
    comp = gen.compressor
    with ContextStore(tmp_path / "s", compressor=comp, codec="bottleneck-float32") as store:
        for i, r in enumerate(rows):
            store.add_many([f"r{i}-{k}" for k in range(2)], comp.compress(r["passages"]))
    by_text = evaluate(rows, generator=gen, modes=["compressed"], shots=1, limit=3, max_new_tokens=4)
    by_id = [dict(r, passage_ids=[f"r{i}-0", f"r{i}-1"], passages=None) for i, r in enumerate(rows)]
    from_store = evaluate(by_id, generator=gen, modes=["compressed"], shots=1, limit=3, max_new_tokens=4,
                          store=ContextStore(tmp_path / "s", compressor=comp))
    assert from_store.scores["compressed"]["questions"] == 3
    assert [p["prediction"] for p in from_store.predictions["compressed"]] == \
        [p["prediction"] for p in by_text.predictions["compressed"]]
    with pytest.raises(ValueError, match="'full' needs the passages"):
        evaluate(by_id, generator=gen, modes=["full"], shots=1, store=ContextStore(tmp_path / "s", compressor=comp))
    with pytest.raises(ValueError, match="modes"):
        evaluate(rows, generator=gen, modes=["open"])


def test_bad_rows_name_their_place(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answers": ["a"], "passages": ["p"]}) + "\n" +
                    json.dumps({"question": "q2", "answers": [], "passages": ["p"]}) + "\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:2: 'answers'"):
        load_rows(path)
    with pytest.raises(ValueError, match="needs 'passages'"):
        load_rows([{"question": "q", "answers": ["a"]}])


def test_cli_eval(tiny_dir, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(6)))
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "eval", "--encoder", str(tiny_dir / "hub"),
                          "--decoder", str(tiny_dir / "llama-decoder"), "--data", str(data), "--shots", "1",
                          "--limit", "3", "--max-new-tokens", "4", "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "EM %" in out.stdout and "closed" in out.stdout and (tmp_path / "run" / "report.md").is_file()


def test_each_batch_is_generated_once_and_its_prefill_timed(gen, monkeypatch):
    calls = []
    generate_ids = gen.generate_ids

    def counting(prompts, **kwargs):
        calls.append(kwargs.get("max_new_tokens"))
        return generate_ids(prompts, **kwargs)

    monkeypatch.setattr(gen, "generate_ids", counting)
    report = evaluate(qa_rows(10), generator=gen, modes=["full"], shots=2, batch_size=4, max_new_tokens=8,
                      min_new_tokens=8)
    assert calls == [8, 8]  # 8 scored rows in batches of 4: no extra one-token run for the prefill
    s = report.scores["full"]
    assert 0 < s["prefill_seconds"] < s["total_seconds"]
