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


def test_the_lancedb_example_retrieves_stored_rows_and_answers_from_them(tmp_path):
    """A store opened by LanceDB as a table, with a vector column added beside the contexts: the vector search's
    rows become the Generator's contexts (issue 25)."""
    out = subprocess.run([sys.executable, str(EXAMPLES / "lancedb_retrieval.py"), "--tiny", "--db", str(tmp_path)],
                         capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("retrieved ['nantes', ") and "\nA: " in out.stdout
    import lancedb

    from arccompress import ContextStore

    table = lancedb.connect(tmp_path).open_table("passages")
    assert table.count_rows() == 5 and "vector" in table.schema.names
    store = ContextStore(tmp_path / "passages.lance")
    rows = table.search([0.0] * 255 + [1.0], vector_column_name="vector").limit(5).to_arrow()
    ids = rows.column("id").to_pylist()
    assert [c.embeddings.tolist() for c in store.contexts(rows)] == [c.embeddings.tolist() for c in store.get_many(ids)]
