"""Every example and the notebook run end to end on tiny offline checkpoints, so none of them can rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_example_runs_with_tiny_checkpoints(script, tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}  # a hub download attempt would fail loudly
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CompressedContext" in out.stdout or "A:" in out.stdout or "embeddings" in out.stdout


def test_notebook_executes_with_tiny_checkpoints():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(EXAMPLES / "tour.ipynb", as_version=4)
    os.environ["ARCCOMPRESS_TINY"] = "1"  # inherited by the kernel
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    finally:
        del os.environ["ARCCOMPRESS_TINY"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # the three plots
