"""The arccompress command line, run as a user would: a subprocess, stdout, stderr and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from arccompress.cli import main


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arccompress.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": f"Document {i} is about the number {i * 11}. " * (i + 2)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_help_everywhere(capsys):
    for cmd in ([], ["compress"], ["ask"], ["info"], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--help"])
        assert exit_.value.code == 0 and "usage: arccompress" in capsys.readouterr().out


def test_demo_runs_the_whole_pipeline():
    out = run("demo")
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout and "compress" in out.stdout and "generate" in out.stdout
    assert "Traceback" not in out.stderr


def test_compress_is_resumable_and_ask_answers(tiny_dir, docs, tmp_path):
    store = tmp_path / "store"
    out = run("compress", "--encoder", tiny_dir / "hub", "--jsonl", docs, "--store", store, "--batch-size", "2",
              "--store-dtype", "float16", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "compressed 5 documents (0 already stored)" in out.stdout and "bytes/token" in out.stdout
    assert len(list((store / "shards").glob("*.safetensors"))) == 3
    with open(docs, "a") as f:
        f.write(json.dumps({"id": "d5", "text": "One more."}) + "\n")
    out = run("compress", "--encoder", tiny_dir / "hub", "--jsonl", docs, "--store", store, "--no-progress")
    assert "compressed 1 documents (5 already stored)" in out.stdout
    out = run("ask", "--encoder", tiny_dir / "hub", "--decoder", tiny_dir / "llama-decoder", "--store", store,
              "--ids", "d1", "d2", "--question", "Which number?", "--max-new-tokens", "5")
    assert out.returncode == 0, out.stderr
    assert "embeddings" in out.stderr and "\n\n" not in out.stdout.strip()
    text = tmp_path / "doc.txt"
    text.write_text("A file document.")
    examples = tmp_path / "ex.jsonl"
    examples.write_text(json.dumps({"document": "Sky is blue.", "question": "Colour?", "answer": "Blue"}) + "\n")
    out = run("ask", "--encoder", tiny_dir / "hub", "--decoder", tiny_dir / "llama-decoder", "--files", text,
              "--examples", examples, "--question", "What?", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    assert "text tokens ->" in out.stderr


def test_info(tiny_dir):
    out = run("info", tiny_dir / "research")
    assert out.returncode == 0, out.stderr
    for needle in ("layout", "research", "pooling factor", "8", "parameters", "decoder hidden size"):
        assert needle in out.stdout
    multi = run("info", tiny_dir / "multi")
    assert "Llama-3.1-8B" in multi.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "/no/such/dir"], "no checkpoint directory"),
        (["compress", "--encoder", "{hub}", "--jsonl", "/no/file.jsonl", "--store", "{tmp}/s"], "No such file"),
        (["compress", "--encoder", "{hub}", "--jsonl", "{bad}", "--store", "{tmp}/s"], "not JSON"),
        (["ask", "--encoder", "{hub}", "--decoder", "{dec}", "--store", "{tmp}/none", "--ids", "x",
          "--question", "q"], "not in"),
        (["compress", "--encoder", "{hub}", "--files", "{empty}", "--store", "{tmp}/s2"], "empty"),
    ],
)
def test_user_errors_are_one_line_on_stderr(tiny_dir, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fill = {"hub": tiny_dir / "hub", "dec": tiny_dir / "llama-decoder", "tmp": tmp_path, "bad": bad, "empty": empty}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_user_error_from_a_real_process_has_no_traceback():
    out = run("info", "/no/such/dir")
    assert out.returncode == 2 and "no checkpoint directory" in out.stderr and "Traceback" not in out.stderr
