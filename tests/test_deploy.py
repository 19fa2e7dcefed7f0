"""deploy/: the proxy's Dockerfile and the Kubernetes manifest say what the code does.

Every `arccompress` command line in them (the image's entrypoint with its default command, and with each container's
args) is parsed by the real CLI parser and turned into the service's config, as `arccompress serve` would; the
proxies' --upstream list names exactly the vLLM StatefulSet's pods; vLLM takes prompt embeddings, in a version with
the advisories' fixes, behind the key the proxies send, reachable from the proxies alone; no key is on a command
line. vLLM's own parser reads its command line in tests/test_proxy.py (vLLM environment).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from arccompress.cli import build_parser
from arccompress.cli.serve import config_from

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MIN_VLLM = (0, 11, 1)  # the first release with the fix of CVE-2025-62164 (GHSA-mrw7-hf4f-83pf)


def dockerfile_instructions() -> dict[str, str]:
    """The Dockerfile's instructions (continuation lines joined), the last of each kind."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    found = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found[word.upper()] = rest.strip()
    return found


def exec_form(value: str) -> list[str]:
    """An instruction's exec form (a JSON array): the only form that passes signals to the server."""
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


def manifest() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if doc]


def of_kind(kind: str) -> list[dict]:
    return [d for d in manifest() if d["kind"] == kind]


def containers(image_prefix: str) -> list[dict]:
    return [c for d in manifest() if d["kind"] in ("Deployment", "StatefulSet")
            for c in d["spec"]["template"]["spec"]["containers"] if c["image"].startswith(image_prefix)]


def serve_config(argv: list[str]):
    """The service's config from an `arccompress ...` command line, as the command builds it (models not loaded)."""
    assert argv[:2] == ["arccompress", "serve"], argv
    args = build_parser().parse_args(argv[1:])
    return config_from(args)


def test_the_images_command_is_a_serve_command_line():
    found = dockerfile_instructions()
    entrypoint = exec_form(found["ENTRYPOINT"])
    config = serve_config(entrypoint + exec_form(found["CMD"]))
    assert config.backend == "upstream" and config.upstreams == ("http://vllm:8000",)
    assert "/health" in found["HEALTHCHECK"] and found["USER"] != "root" and found["EXPOSE"] == "8000"


def test_every_proxy_container_runs_a_serve_command_line_against_the_statefulsets_pods(monkeypatch):
    monkeypatch.delenv("ARCCOMPRESS_UPSTREAM_API_KEY", raising=False)
    entrypoint = exec_form(dockerfile_instructions()["ENTRYPOINT"])
    (vllm_set,) = of_kind("StatefulSet")
    (headless,) = [s for s in of_kind("Service") if s["metadata"]["name"] == vllm_set["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"  # a DNS name per pod
    port = headless["spec"]["ports"][0]["port"]
    pods = tuple(f"http://{vllm_set['metadata']['name']}-{i}.{headless['metadata']['name']}:{port}"
                 for i in range(vllm_set["spec"]["replicas"]))
    proxies = containers("arccompress-proxy")
    assert proxies
    for container in proxies:
        assert "command" not in container  # the image's entrypoint runs, with these args
        config = serve_config(entrypoint + container["args"])
        assert config.upstreams == pods
        assert not {"--api-key", "--upstream-api-key"} & set(container["args"])  # keys come from the Secret
        names = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert {"ARCCOMPRESS_UPSTREAM_API_KEY", "ARCCOMPRESS_API_KEY"} <= names
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def vllm_version(image: str) -> tuple[int, ...]:
    tag = image.rpartition(":")[2]
    found = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", tag)
    assert found, f"pin vLLM's image to a release, not {tag!r}"
    return tuple(int(x) for x in found.groups())


def test_vllm_takes_prompt_embeds_in_a_fixed_version_from_the_proxies_alone():
    (vllm,) = containers("vllm/vllm-openai")
    assert vllm_version(vllm["image"]) >= MIN_VLLM
    assert "--enable-prompt-embeds" in vllm["args"] and "--api-key" not in vllm["args"]
    key = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in vllm["env"] if "valueFrom" in e}["VLLM_API_KEY"]
    proxy_key = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in containers("arccompress-proxy")[0]["env"]
                 if "valueFrom" in e}["ARCCOMPRESS_UPSTREAM_API_KEY"]
    assert key == proxy_key
    (policy,) = of_kind("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app": "vllm"}
    sources = [s["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for s in rule["from"]]
    proxy_labels = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "arccompress-proxy"][0]
    assert sources == [proxy_labels["spec"]["template"]["metadata"]["labels"]]


def vllm_command_line() -> list[str]:
    """The vLLM container's command line (for vLLM's own parser: tests/test_proxy.py)."""
    (vllm,) = containers("vllm/vllm-openai")
    return vllm["command"] + vllm["args"]


@pytest.mark.parametrize("flags", [["--max-model-len", "512"], ["--backend", "vllm"]])
def test_engine_flags_beside_upstreams_are_refused(flags):
    with pytest.raises(ValueError, match="give these to them"):
        serve_config(shlex.split("arccompress serve --encoder e --decoder d --upstream http://v:8000") + flags)
