"""The arccompress command line, run as a user would: a subprocess, stdout, stderr and exit codes."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest

from arccompress.cli import main


def run(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arccompress.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=env)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    rows = [{"id": f"d{i}", "text": f"Document {i} is about the number {i * 11}. " * (i + 2)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_help_everywhere(capsys):
    for cmd in ([], ["compress"], ["ask"], ["eval"], ["info"], ["convert"], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--help"])
        assert exit_.value.code == 0 and "usage: arccompress" in capsys.readouterr().out


def test_demo_runs_the_whole_pipeline_and_leaves_nothing(tmp_path):
    env = os.environ | {"TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "ARCCOMPRESS_CACHE": str(tmp_path / "cache")}
    out = run("demo", env=env)
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout and "compress" in out.stdout and "generate" in out.stdout
    assert "Generator(" in out.stdout and "Traceback" not in out.stderr
    assert "Loading weights" not in out.stderr and "Writing model shards" not in out.stderr  # quiet by default
    # the tiny checkpoints are cached, /tmp stays clean; torch makes its own compile cache there (torchinductor_<user>,
    # one per user, reused) when transformers imports torch._dynamo, unless the environment already names one
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")] == ["cache"]


def test_compress_is_resumable_and_ask_answers(tiny_dir, docs, tmp_path):
    store = tmp_path / "store"
    out = run("compress", "--encoder", tiny_dir / "hub", "--jsonl", docs, "--store", store, "--batch-size", "2",
              "--codec", "int8", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "compressed 5 texts (0 already stored)" in out.stdout and "bytes per token" in out.stdout
    assert "bottleneck-int8" in out.stdout and "in 3 data files" in out.stdout
    with open(docs, "a") as f:
        f.write(json.dumps({"id": "d5", "text": "One more."}) + "\n")
    out = run("compress", "--encoder", tiny_dir / "hub", "--jsonl", docs, "--store", store, "--no-progress")
    assert "compressed 1 texts (5 already stored)" in out.stdout, out.stderr
    info = run("info", store)
    assert info.returncode == 0 and "contexts         6" in info.stdout and "bottleneck-int8" in info.stdout
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
        (["info", "/no/such/dir"], "no such folder"),
        (["compress", "--encoder", "{hub}", "--jsonl", "/no/file.jsonl", "--store", "{tmp}/s"], "no such source file"),
        (["compress", "--encoder", "{hub}", "--jsonl", "{bad}", "--store", "{tmp}/s"], r"bad.jsonl:2: not JSON"),
        (["compress", "--encoder", "{hub}", "--jsonl", "{array}", "--store", "{tmp}/s"], r"array.jsonl:1: a JSON list"),
        (["compress", "--encoder", "{hub}", "--jsonl", "{late}", "--store", "{tmp}/s"],
         r"late.jsonl:71 \(id 'x70'\): the text is empty"),
        (["compress", "--encoder", "{hub}", "--files", "{empty}", "--store", "{tmp}/s2"], "empty"),
        (["compress", "--encoder", "{hub}", "--jsonl", "{late}", "--store", "{tmp}/s", "--device", "nope"],
         "unknown device 'nope'"),
        (["compress", "--encoder", "{hub}", "--jsonl", "{late}", "--store", "{tmp}/s", "--codec", "float8"],
         "unknown codec"),
        (["ask", "--encoder", "{hub}", "--decoder", "{dec}", "--store", "{tmp}/none", "--ids", "x",
          "--question", "q"], "no store at"),
        (["ask", "--encoder", "{hub}", "--decoder", "{tmp}/no-decoder", "--text", "t", "--question", "q"],
         "no decoder folder at"),
        (["ask", "--encoder", "{hub}", "--decoder", "{dec}", "--store", "{tmp}", "--question", "q"],
         "--store needs --ids"),
        (["ask", "--encoder", "{hub}", "--decoder", "{dec}", "--text", "t", "--ids", "x", "--question", "q"],
         "--ids reads a store: it goes with --store, not with --text"),
        (["ask", "--tiny", "--encoder", "{hub}", "--text", "t", "--question", "q"], "--tiny chooses the models"),
        (["ask", "--decoder", "{dec}", "--text", "t", "--question", "q"], "give --encoder"),
        (["ask", "--encoder", "{hub}", "--decoder", "{dec}", "--text", "t", "--question", "q", "--examples", "{ex}"],
         r"ex.jsonl:1: an example needs document, question and answer; missing answer"),
    ],
)
def test_user_errors_are_one_line_on_stderr(tiny_dir, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{oops\n')
    array = tmp_path / "array.jsonl"
    array.write_text('["not", "an", "object"]\n')
    late = tmp_path / "late.jsonl"
    late.write_text("".join(json.dumps({"id": f"x{i}", "text": "" if i == 70 else f"text {i}"}) + "\n" for i in range(80)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    ex = tmp_path / "ex.jsonl"
    ex.write_text(json.dumps({"document": "d", "question": "q"}) + "\n")
    fill = {"hub": tiny_dir / "hub", "dec": tiny_dir / "llama-decoder", "tmp": tmp_path, "bad": bad, "empty": empty,
            "array": array, "late": late, "ex": ex}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err), err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "s" / "data").exists()  # nothing was compressed


def test_batch_size_must_be_positive(tiny_dir, docs, tmp_path):
    for value in ("-1", "0", "x"):
        out = run("compress", "--encoder", tiny_dir / "hub", "--jsonl", docs, "--store", tmp_path / "s",
                  "--batch-size", value)
        assert out.returncode == 2 and "--batch-size" in out.stderr and "Traceback" not in out.stderr
        assert not (tmp_path / "s").exists()


def test_cuda_without_a_gpu_is_one_line(tiny_dir, docs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = run("compress", "--encoder", tiny_dir / "hub", "--jsonl", docs, "--store", tmp_path / "s", "--device", "cuda")
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr and "Traceback" not in out.stderr


def test_user_error_from_a_real_process_has_no_traceback():
    out = run("info", "/no/such/dir")
    assert out.returncode == 2 and "no such folder" in out.stderr and "Traceback" not in out.stderr


INTERRUPTED_INSIDE_A_LIBRARY = """
import os, signal, sys, time
from arccompress import cli

def command(args):  # Ctrl-C lands inside library code that {what}
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except BaseException:
        {then}
    print("finished")
    return 0

cli.info.run_info = command
sys.exit(cli.main(["info", "x"]))
"""


@pytest.mark.parametrize("what, then", [
    ("is half imported and fails later", 'raise RecursionError("maximum recursion depth exceeded")'),
    ("turns errors into ValueError", 'raise ValueError("bad value")'),
    ("swallows every interrupt and goes on",
     "try: os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n        except BaseException: pass"),
])
def test_ctrl_c_inside_a_library_is_still_one_line(what, then):
    """Whatever a library makes of the KeyboardInterrupt (another exception, or nothing: then a second Ctrl-C
    exits at once), the command exits 130 with the one line, never a traceback or a false 'error:'."""
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_INSIDE_A_LIBRARY.format(what=what, then=then)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 130 and out.stderr.strip() == "arccompress: interrupted", out.stderr
    assert "finished" not in out.stdout


def test_ctrl_c_is_one_line_at_any_moment(tiny_dir, docs, tmp_path):
    """SIGINT during start-up (imports) and during work: exit 130, one line, no traceback (progress bars off, so
    that stderr holds nothing else)."""
    for delay in (0.3, 3.0):
        proc = subprocess.Popen([sys.executable, "-m", "arccompress.cli", "compress", "--encoder", str(tiny_dir / "hub"),
                                 "--jsonl", str(docs), "--store", str(tmp_path / f"s{delay}"), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # finished before the signal: nothing to check
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip().count("\n") == 0, err


def test_an_internal_error_is_a_bug_with_its_traceback(monkeypatch, capsys):
    from arccompress.cli import info

    def broken(args):
        return {}["missing"]  # a KeyError inside the package: a bug, not the user's input

    monkeypatch.setattr(info, "run_info", broken)
    assert main(["info", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'missing'" in err and "internal error" in err


def test_debug_shows_the_traceback_of_a_user_error(capsys):
    assert main(["info", "/no/such/dir", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("no such folder (neither a context store nor a checkpoint)")


def test_tiny_models_on_every_model_command(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Passage {i} about rivers."}) + "\n" for i in range(3)))
    out = run("compress", "--tiny", "--jsonl", docs, "--store", tmp_path / "s")
    assert out.returncode == 0, out.stderr
    out = run("ask", "--tiny", "--store", tmp_path / "s", "--ids", "d0", "d2", "--question", "Which river?")
    assert out.returncode == 0 and "prompt" in out.stderr, out.stderr
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answers": ["a"], "passages": [f"p {i}"]}) + "\n"
                            for i in range(4)))
    out = run("eval", "--tiny", "--data", data, "--shots", "1", "--modes", "compressed", "--no-progress")
    assert out.returncode == 0 and "compressed" in out.stdout, out.stderr


def test_info_on_contexts_stored_without_their_text_says_so(tiny_dir, tmp_path, capsys):
    """A store whose contexts came without their text (added that way, or converted from a store that did not keep
    it) has no raw-text size to compare with: `info` says so, instead of "vs 0.00"."""
    from dataclasses import replace

    from arccompress import Compressor, ContextStore

    comp = Compressor.from_pretrained(tiny_dir / "hub", device="cpu")
    made = comp.compress(["A first passage about rivers.", "A second one about mountains."])
    with ContextStore(tmp_path / "bare", compressor=comp) as store:
        store.add_many(["a", "b"], [replace(c, text=None) for c in made])
    assert main(["info", str(tmp_path / "bare")]) == 0
    out = capsys.readouterr().out
    assert "raw text of unknown size" in out and "vs 0.00" not in out
    with ContextStore(tmp_path / "bare", compressor=comp) as store:
        store.add("c", comp.compress("A third passage, with its text."))
    assert main(["info", str(tmp_path / "bare")]) == 0
    out = capsys.readouterr().out
    assert "of raw UTF-8 text" in out and re.search(r"known for \d+ of the \d+ tokens", out)
