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
    assert result["reads"]["get_many_5_median_ms"] > 0 and result["reads"]["contexts"] == 20_000
    assert "| encoder | codec |" in (tmp_path / "store-small.md").read_text()


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
