"""`arccompress eval`: SQuAD metrics on hand-checked cases, the few-shot draw, an end-to-end run, resuming."""

from __future__ import annotations

import json

import pytest

from arccompress import Compressor, ContextStore, Generator, evaluate
from arccompress.errors import ContextNotFoundError, InputError, InputTypeError, NotFoundError
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
    assert set(report.scores) == {"compressed", "full", "closed"} and report.notes == []
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
    assert not report.scores["compressed"]["tokens_saved_estimated"]
    table = report.table()
    assert "EM %" in table and "compressed" in table
    assert json.loads((out / "report.json").read_text())["scores"]["full"]["questions"] == 10
    assert "| compressed |" in (out / "report.md").read_text() and (out / "report.png").stat().st_size > 0
    # a killed run continues: drop the last predictions of one mode, cut a line inside a UTF-8 character
    full = out / "predictions-full.jsonl"
    lines = full.read_bytes().splitlines()
    cut = (lines[6].decode()[:-3] + "é").encode()[:-1]  # the last byte of a two-byte character missing
    full.write_bytes(b"\n".join(lines[:6]) + b"\n" + cut)
    again = evaluate(data, generator=gen, shots=2, output=out, batch_size=4, max_new_tokens=6)
    assert [p["prediction"] for p in again.predictions["full"]] == [p["prediction"] for p in report.predictions["full"]]
    assert again.scores["full"]["exact_match"] == report.scores["full"]["exact_match"]
    assert again.notes == ["predictions-full.jsonl: 1 unreadable or incomplete line dropped; those questions were "
                           "asked again"]
    assert [json.loads(line)["row"] for line in full.read_text().splitlines()] == \
        [p["row"] for p in report.predictions["full"]]  # every line whole, each prediction once
    with pytest.raises(InputError, match="holds predictions of another run"):
        evaluate(data, generator=gen, shots=3, output=out, max_new_tokens=6)


def test_resume_redoes_every_line_that_does_not_hold_a_prediction(gen, tmp_path):
    rows = qa_rows(8)
    out = tmp_path / "run"
    first = evaluate(rows, generator=gen, modes=["closed"], shots=1, output=out, batch_size=8, max_new_tokens=4)
    path = out / "predictions-closed.jsonl"
    lines = path.read_text().splitlines()
    no_field = json.loads(lines[1])
    del no_field["prediction"]
    wrong_type = json.loads(lines[2]) | {"f1": "high"}
    lines[1], lines[2] = json.dumps(no_field), json.dumps(wrong_type)
    lines[3] = "{not json"
    lines[4] = lines[4][: len(lines[4]) // 2]  # a line a crash cut, in the middle of the file
    path.write_text("\n".join(lines))  # and no newline at the end: the next append must not continue it
    again = evaluate(rows, generator=gen, modes=["closed"], shots=1, output=out, batch_size=8, max_new_tokens=4)
    assert again.notes == ["predictions-closed.jsonl: 4 unreadable or incomplete lines dropped; those questions were "
                           "asked again"]
    assert [p["prediction"] for p in again.predictions["closed"]] == \
        [p["prediction"] for p in first.predictions["closed"]]
    stored = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(p["row"] for p in stored) == sorted(p["row"] for p in first.predictions["closed"])
    third = evaluate(rows, generator=gen, modes=["closed"], shots=1, output=out, batch_size=8, max_new_tokens=4)
    assert third.notes == []


def test_a_used_folder_refuses_another_run_unless_overwritten(gen, tiny_dir, tmp_path, monkeypatch):
    rows = qa_rows(6)
    out = tmp_path / "run"
    evaluate(rows, generator=gen, modes=["closed"], shots=1, output=out, max_new_tokens=4)
    changed = next(i for i in range(6) if i not in choose_examples(6, 1, 0))  # a scored row
    other_rows = [dict(r, answers=["something else"]) if i == changed else r for i, r in enumerate(rows)]
    refused = {
        "data": dict(data=other_rows),  # the same length, another answer: the case
        "sampling.max_new_tokens": dict(max_new_tokens=5),
        "batch_size": dict(batch_size=2),
        "chunk_size": dict(chunk_size=16),
    }
    for what, change in refused.items():
        kwargs = dict(data=rows, generator=gen, modes=["closed"], shots=1, output=out, max_new_tokens=4) | change
        with pytest.raises(InputError) as raised:
            evaluate(kwargs.pop("data"), **kwargs)
        message = str(raised.value)
        assert f"{what} " in message and "--overwrite (overwrite=True)" in message and "\n" not in message
    describe = gen.describe
    monkeypatch.setattr(gen, "describe", lambda: describe() | {"backend": "vllm"})
    with pytest.raises(InputError, match="backend 'transformers' -> 'vllm'"):
        evaluate(rows, generator=gen, modes=["closed"], shots=1, output=out, max_new_tokens=4)
    monkeypatch.undo()
    mistral = Generator.from_pretrained(tiny_dir / "mistral-decoder", compressor=gen.compressor)
    with pytest.raises(InputError, match="decoder_fingerprint"):
        evaluate(rows, generator=mistral, modes=["closed"], shots=1, output=out, max_new_tokens=4)
    (out / "notes.txt").write_text("the user's own file")
    replaced = evaluate(other_rows, generator=gen, modes=["closed"], shots=1, output=out, max_new_tokens=4,
                        overwrite=True)
    assert replaced.scores["closed"]["questions"] == 5 and (out / "notes.txt").exists()
    lines = (out / "predictions-closed.jsonl").read_text().splitlines()
    new = next(json.loads(line) for line in lines if json.loads(line)["row"] == changed)
    assert len(lines) == 5 and new["answers"] == ["something else"]  # the new data's


def test_passages_from_a_store_in_every_mode(gen, tmp_path):
    rows = qa_rows(8)
    comp = gen.compressor
    with ContextStore(tmp_path / "s", compressor=comp, codec="bottleneck-float32") as store:
        for i, r in enumerate(rows):
            store.add_many([f"r{i}-{k}" for k in range(2)], comp.compress(r["passages"]))
    store = ContextStore(tmp_path / "s", compressor=comp)
    by_text = evaluate(rows, generator=gen, modes=["compressed", "closed"], shots=1, limit=3, max_new_tokens=4)
    by_id = [{"question": r["question"], "answers": r["answers"], "passage_ids": [f"r{i}-0", f"r{i}-1"]}
             for i, r in enumerate(rows)]
    from_store = evaluate(by_id, generator=gen, modes=["compressed", "closed"], shots=1, limit=3, max_new_tokens=4,
                          store=store)
    for mode in ("compressed", "closed"):
        assert from_store.scores[mode]["questions"] == 3
        assert [p["prediction"] for p in from_store.predictions[mode]] == \
            [p["prediction"] for p in by_text.predictions[mode]]
    # stored contexts keep no text: what they saved is counted with their own (encoder) token counts
    saved = from_store.scores["compressed"]
    assert saved["mean_tokens_saved"] > 0 and saved["tokens_saved_estimated"]
    assert "~" in from_store.table()
    closed_only = evaluate(by_id, generator=gen, modes=["closed"], shots=1, limit=2, max_new_tokens=4)  # no store
    assert closed_only.scores["closed"]["questions"] == 2
    with pytest.raises(InputError, match=r"mode full needs the passages' text: item 0 has only 'passage_ids'; add "
                                         r"'passages' to the rows, or run --modes compressed,closed"):
        evaluate(by_id, generator=gen, shots=1, store=store)
    with pytest.raises(InputError, match=r"item 0: 'passage_ids' name contexts in a store: give the store \(--store"):
        evaluate(by_id, generator=gen, modes=["compressed"], shots=1)
    both = [dict(r, passage_ids=[f"r{i}-0", f"r{i}-1"]) for i, r in enumerate(rows)]
    mixed = evaluate(both, generator=gen, shots=1, limit=2, max_new_tokens=4, store=store)  # full reads the text
    assert mixed.scores["full"]["questions"] == 2 and mixed.scores["compressed"]["tokens_saved_estimated"]
    missing = [dict(r, passage_ids=["r0-0", "nope"]) for r in by_id]
    with pytest.raises(ContextNotFoundError, match=r"item \d: passage_ids not in the store .*'nope'"):
        evaluate(missing, generator=gen, modes=["compressed"], shots=1, store=store)
    with pytest.raises(InputError, match="unknown mode 'open'"):
        evaluate(rows, generator=gen, modes=["open"])
    with pytest.raises(InputTypeError, match="generator must be an engine"):
        evaluate(rows, generator=object())


def test_bad_rows_name_their_place_and_field(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answers": ["a"], "passages": ["p"]}) + "\n" +
                    json.dumps({"question": "q2", "answers": [], "passages": ["p"]}) + "\n")
    with pytest.raises(InputError, match=r"qa.jsonl:2: field 'answers' must be a non-empty list of strings, found "
                                         r"\[\]"):
        load_rows(path)
    cases = [
        ({"question": "q", "passage_ids": ["a"]}, r"item 0: no 'answers' field"),
        ({"answers": ["a"]}, r"item 0: no 'question' field"),
        ({"question": " ", "answers": ["a"]}, r"item 0: field 'question' must be a non-empty string"),
        ({"question": "q", "answers": ["a"], "passages": ["p", ""]}, r"item 0: field 'passages' must be a non-empty"),
        ({"question": "q", "answers": ["a"], "passage_ids": ["a", 2.5]},
         r"item 0: field 'passage_ids': id 2.5 is a float: ids must be strings or integers"),
    ]
    for row, message in cases:
        with pytest.raises(InputError, match=message):
            load_rows([row])
    assert load_rows([{"question": "q", "answer": "a", "passage_ids": [7]}])[0].passage_ids == ["7"]
    path.write_bytes(b'{"question": "q", "answers": ["a"]}\n{"question": "tab\there"}\n')
    with pytest.raises(InputError, match=r"qa.jsonl:2: not JSON \(Invalid control character at column 18\)"):
        load_rows(path)
    with pytest.raises(NotFoundError, match="no such data file"):
        load_rows(tmp_path / "none.jsonl")


def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "arccompress.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_eval(tiny_dir, tmp_path, capsys):
    from arccompress.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(6)))
    models = ["--encoder", tiny_dir / "hub", "--decoder", tiny_dir / "llama-decoder"]
    out = run_cli(*models, "--data", data, "--shots", "1", "--limit", "3", "--max-new-tokens", "4",
                  "--output", tmp_path / "run", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "EM %" in out.stdout and "closed" in out.stdout and (tmp_path / "run" / "report.md").is_file()
    # another data file of the same length into the same folder (issue 18): refused, replaced with --overwrite
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(dict(r, question=r["question"] + "?")) + "\n" for r in qa_rows(6)))
    again = ["eval", *map(str, models), "--data", str(other), "--shots", "1", "--limit", "3", "--max-new-tokens", "4",
             "--output", str(tmp_path / "run"), "--no-progress"]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert "holds predictions of another run (data '6 rows, sha256 " in err and "--overwrite" in err
    assert err.count("\n") == 1
    assert main([*again, "--overwrite"]) == 0
    assert json.loads((tmp_path / "run" / "predictions-full.jsonl").read_text().splitlines()[0])["question"][-1] == "?"


def test_cli_eval_over_a_store(tiny_dir, tmp_path, capsys):
    from arccompress import compress_corpus
    from arccompress.cli import main

    rows = qa_rows(5)
    compress_corpus([(f"r{i}-{k}", p) for i, r in enumerate(rows) for k, p in enumerate(r["passages"])],
                    tmp_path / "s", encoder=tiny_dir / "hub", show_progress=False)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "answers": r["answers"],
                                        "passage_ids": [f"r{i}-0", f"r{i}-1"]}) + "\n" for i, r in enumerate(rows)))
    common = ["eval", "--encoder", str(tiny_dir / "hub"), "--decoder", str(tiny_dir / "llama-decoder"), "--data",
              str(data), "--store", str(tmp_path / "s"), "--shots", "1", "--max-new-tokens", "3", "--no-progress"]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "mode full needs the passages' text" in err and "--modes compressed,closed" in err and "Traceback" not in err
    assert main([*common, "--modes", "compressed,closed"]) == 0
    compressed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("compressed"))
    assert "~" in compressed  # tokens saved, estimated from the stored contexts' own token counts
    for args, message in [
        (["--backend", "vllm", "--quantization", "8bit"], "vLLM quantizes in flight to 4 bits only"),
        (["--kv-cache-gib", "2"], "--kv-cache-gib set vLLM's memory: they go with --backend vllm"),
        (["--overwrite"], "--overwrite replaces the predictions in --output: give --output"),
        (["--modes", "compressed,open"], "unknown mode 'open'"),
    ]:
        assert main([*common, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1 and "Traceback" not in err, err


def test_each_batch_is_generated_once_and_its_prefill_timed(gen, monkeypatch):
    calls = []
    complete = gen.complete

    def counting(prompts, sampling, **kwargs):
        calls.append((len(prompts), sampling.max_new_tokens, kwargs))
        return complete(prompts, sampling, **kwargs)

    monkeypatch.setattr(gen, "complete", counting)
    report = evaluate(qa_rows(10), generator=gen, modes=["full"], shots=2, batch_size=4, max_new_tokens=8,
                      min_new_tokens=8)
    # 8 scored rows in batches of 4: no extra one-token run for the prefill
    assert calls == [(4, 8, {"time_prefill": True}), (4, 8, {"time_prefill": True})]
    s = report.scores["full"]
    assert 0 < s["prefill_seconds"] < s["total_seconds"]
