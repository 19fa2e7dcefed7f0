"""The benchmark entry point runs (toy sizes) and writes its JSON and markdown, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arccompress.compressor import padding_fraction, plan_batches

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_bench_runs_at_small_scale(preset, tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--preset", preset, "--scale", "small", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / f"{preset}.json").read_text())
    assert result["passages"]["tokens_per_s"] > 0 and result["end_to_end"]["ttft_ratio"] > 0
    assert 0 < result["passages"]["fraction_of_matmul_rate"] and result["passages"]["fraction_of_peak"] is None  # CPU
    assert result["load"]["peak_rss_gb"] > 0
    assert "| measure | value |" in (tmp_path / f"{preset}.md").read_text()


def test_store_benchmark_runs_at_small_scale(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH.parent / "bench_store.py"), "--scale", "small", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "store-small.json").read_text())
    rows = {(r["encoder"], r["codec"], r.get("bits_per_dim")): r for r in result["codecs"] if "unavailable" not in r}
    exact = [r for (_, codec, _), r in rows.items() if codec == "decoder-float32"]
    assert exact and all(r["relative_l2_error"] == 0 and r["identical_generations"] == 1 for r in exact)
    reads = result["reads"]["format 4"]
    assert reads["get_many_5_median_ms"] > 0 and reads["store_part_median_ms"] > 0 and reads["contexts"] == 20_000
    for part in ("reads", "concurrent", "commits"):  # format 3 runs from git history (a shallow clone has none)
        assert result[part]["format 3"].get("not_run") or result[part]["format 3"], part
    commits = result["commits"]["format 4"]
    assert commits["commits"] == 2_000 and commits["ratio_last_to_first"] > 0 and commits["compaction"]["fragments"] == 1
    assert result["concurrent"]["format 4"]["four"]["contexts"] == 4 * result["concurrent"]["format 4"]["one"]["contexts"]
    text = (tmp_path / "store-small.md").read_text()
    assert "| encoder | codec |" in text and "| measure | format 3 | format 4 |" in text


def test_corpus_benchmark_runs_at_small_scale(tmp_path):
    pytest.importorskip("ray")
    out = subprocess.run([sys.executable, str(BENCH.parent / "bench_corpus.py"), "--preset", "cpu", "--scale", "small",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "corpus-cpu-small.json").read_text())
    assert result["local"]["tokens"] == result["ray"]["tokens"] > 0 and result["ray"]["workers"] == 2


def test_plan_batches_respects_every_bound():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 400) for _ in range(500)]
    batches = plan_batches(lengths, batch_size=32, max_tokens_per_batch=4096)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 32 and (len(b) == 1 or len(b) * longest <= 4096)
        assert len(b) * longest - sum(lengths[i] for i in b) <= 0.05 * len(b) * longest
    assert padding_fraction(lengths, batches) < 0.05
    assert plan_batches([5000, 3], 8, 1000) == [[0], [1]]  # a sequence over the budget goes alone


GPU_SECTIONS = ["environment", "golden-float32", "golden-bfloat16", "determinism", "attention-kernels",
                "batched-vs-alone", "throughput", "store-write", "oom-split", "ttft", "generate-4bit"]


def test_gpu_check_runs_through_run_gpu_on_the_cpu(tmp_path):
    """The first GPU visit's command, dry: run_gpu.sh's check step runs gpu_check.py at toy sizes on the CPU, every
    section passes or says why it is skipped, and each result is on disk."""
    import os

    env = os.environ | {"PYTHON": sys.executable, "DEVICE": "cpu", "SCALE": "small", "OUT": str(tmp_path),
                        "STEPS": "environment check"}
    out = subprocess.run(["bash", str(BENCH.parent / "run_gpu.sh")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = (tmp_path / "run-gpu-summary.md").read_text()
    assert "| environment | ok |" in summary and "| check | ok |" in summary, summary
    lines = [json.loads(line) for line in (tmp_path / "gpu-check-cpu-small.jsonl").read_text().splitlines()]
    assert lines[0]["section"] == "run" and lines[0]["device"] == "cpu" and lines[0]["scale"] == "small"
    sections = {line["section"]: line for line in lines[1:]}
    assert list(sections) == GPU_SECTIONS
    assert sections["attention-kernels"]["status"] == "skipped" and "CUDA" in sections["attention-kernels"]["summary"]
    assert all(s["status"] == "ok" for name, s in sections.items() if name != "attention-kernels"), sections
    result = {name: s.get("result", {}) for name, s in sections.items()}
    assert result["golden-float32"]["within_tolerance"] and result["golden-float32"]["token_ids_checked"]
    assert result["golden-bfloat16"]["within_tolerance"] and result["determinism"]["differing"] == 0
    assert result["oom-split"]["split"] and result["oom-split"]["within_tolerance"]
    assert all(r["stored"] == result["store-write"]["contexts"] + 1 for r in result["store-write"]["threads"].values())
    assert result["throughput"]["tokens_per_s"] > 0 and result["ttft"]["ratio"] > 0
    assert result["generate-4bit"]["finite_logits"]
    assert "| golden-float32 | ok |" in (tmp_path / "gpu-check-cpu-small.md").read_text()


def test_gpu_check_records_a_failed_section_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import gpu_check

    def broken(self):
        raise RuntimeError("the device fell over\nsecond line")

    monkeypatch.setattr(gpu_check.Check, "determinism", broken)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--scale", "small", "--out", str(tmp_path),
                                      "--sections", "batched-vs-alone,determinism"])
    assert gpu_check.main() == 1
    lines = [json.loads(line) for line in (tmp_path / "gpu-check-cpu-small.jsonl").read_text().splitlines()]
    assert [(x["section"], x.get("status")) for x in lines[1:]] == [("determinism", "ERROR"), ("batched-vs-alone", "ok")]
    assert lines[1]["error"] == "RuntimeError: the device fell over" and "broken" in lines[1]["traceback"]
    assert "| determinism | ERROR | RuntimeError: the device fell over |" in (tmp_path / "gpu-check-cpu-small.md").read_text()
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--scale", "small", "--out", str(tmp_path),
                                      "--sections", "throughput", "--budget", "0"])
    assert gpu_check.main() == 0
    last = json.loads((tmp_path / "gpu-check-cpu-small.jsonl").read_text().splitlines()[-1])
    assert last["status"] == "skipped" and "budget" in last["summary"]
