"""Import paths that moved in arccompress 0.4, kept working for one release with a DeprecationWarning.

Each old module is a stand-in whose names are looked up in the modules that now hold them, so that
`from arccompress.vllm import VLLMGenerator` still works and says where to import from instead. An import hook
(`install`, done by `import arccompress`) makes the stand-ins; nothing is imported before a name is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    "arccompress.engine": ("arccompress.engines.base", "arccompress.engines.text"),
    "arccompress.generation": ("arccompress.engines.transformers",),
    "arccompress.vllm": ("arccompress.engines.vllm", "arccompress.engines.remote.vllm_server",
                         "arccompress.engines.decoder_files"),
    "arccompress.vllm.generator": ("arccompress.engines.vllm",),
    "arccompress.vllm.client": ("arccompress.engines.remote.vllm_server",),
    "arccompress.vllm.decoder": ("arccompress.engines.decoder_files",),
    "arccompress.client": ("arccompress.engines.remote.service",),
    "arccompress.wire": ("arccompress.engines.remote.http",),
    "arccompress.openai_api": ("arccompress.engines.remote.replies",),
    "arccompress.runtime": ("arccompress.devices", "arccompress.console"),
    "arccompress.codec": ("arccompress.store.codec",),
}


class MovedModule(types.ModuleType):
    """An old module: its names, found in the modules that hold them now."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"Moved: import from {' or '.join(targets)}.")
        self.__targets = targets

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for target in self.__targets:
            module = importlib.import_module(target)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (it moved to "
                             f"{' or '.join(self.__targets)})")


class MovedPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The import hook: an old path becomes its stand-in, with a DeprecationWarning naming the new one."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        package = any(other.startswith(f"{fullname}.") for other in MOVED)
        return importlib.machinery.ModuleSpec(fullname, self, is_package=package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        warnings.warn(f"{module.__name__} moved: import from {' or '.join(MOVED[module.__name__])} (the old path "
                      "goes away in the next release)", DeprecationWarning, stacklevel=2)


def install() -> None:
    """Put the hook on the import path, once."""
    if not any(isinstance(finder, MovedPaths) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedPaths())  # before any finder that could still see an old file
