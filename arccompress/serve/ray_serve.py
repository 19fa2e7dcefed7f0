"""The service as a Ray Serve application: one engine per replica, Ray Serve's routing and autoscaling in front.

    from arccompress.serve import ServiceConfig, deployment
    from ray import serve
    serve.run(deployment(ServiceConfig(encoder=..., decoder=..., store="/shared/wiki-store"), num_replicas=4,
                         ray_actor_options={"num_gpus": 1}), route_prefix="/")

Each replica builds the same app as `arccompress serve` (its lifespan loads the models on the replica); the store
must be on a file system every node sees, as for the Ray Data corpus job that wrote it.

Metrics: Ray Serve routes a scrape of `/metrics` to one replica, whose registry holds only its own requests. So each
replica also serves its registry on a port of its node, listed by the deployment's `MetricsBoard` (a named Ray
actor), and the replica that gets a scrape reads every listed replica at that moment: one scrape holds every
replica's series, each with a `replica` label (sum them without it for the deployment's totals). A replica that
cannot be read (it stopped) is dropped from the board.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .app import build_app
from .config import ServiceConfig
from .service import Service

SCRAPE_TIMEOUT_S = 5.0


class ServiceReplica:
    """One replica: the config travels to the replica, the app (and its models) is built there."""

    def __init__(self, config: ServiceConfig):
        self.config = config

    def __serve_build_asgi_app__(self) -> Any:
        service = Service(self.config)
        return build_app(service=service, scrape=ReplicaMetrics(service.metrics.registry).scrape)


class MetricsBoard:
    """The metrics endpoints of a deployment's replicas, by replica id (a named Ray actor, one per deployment)."""

    def __init__(self) -> None:
        self.endpoints: dict[str, str] = {}

    def register(self, replica: str, url: str) -> None:
        self.endpoints[replica] = url

    def forget(self, replica: str) -> None:
        self.endpoints.pop(replica, None)

    def listed(self) -> dict[str, str]:
        return dict(self.endpoints)


class ReplicaMetrics:
    """This replica's registry on a port of its node, listed on the deployment's board; `scrape()` reads them all."""

    def __init__(self, registry: CollectorRegistry):
        import ray
        from prometheus_client import start_http_server
        from ray import serve

        context = serve.get_replica_context()
        host = ray.util.get_node_ip_address()
        server, _ = start_http_server(0, addr=host, registry=registry)
        self.replica = context.replica_id.unique_id
        board = ray.remote(num_cpus=0)(MetricsBoard)
        self.board = board.options(name=f"arccompress-metrics:{context.app_name}:{context.deployment}",
                                   get_if_exists=True, lifetime="detached").remote()
        ray.get(self.board.register.remote(self.replica, f"http://{host}:{server.server_port}/metrics"))

    async def scrape(self) -> bytes:
        """Every listed replica's series, labelled with its replica id, in Prometheus' text format."""
        endpoints = await self.board.listed.remote()
        async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S) as client:
            answers = await asyncio.gather(*(client.get(url) for url in endpoints.values()), return_exceptions=True)
        texts = {}
        for replica, answer in zip(endpoints, answers):
            if isinstance(answer, httpx.Response) and answer.status_code == 200:
                texts[replica] = answer.text
            elif replica != self.replica:
                self.board.forget.remote(replica)  # stopped: its series leave with it
        return labelled(texts)


class _Families:
    """A collector of metric families already made."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def labelled(texts: dict[str, str]) -> bytes:
    """Prometheus texts of several replicas as one, each sample labelled `replica` with its replica's id."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            into.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))  # type: ignore[arg-type]
    return generate_latest(registry)


def deployment(config: ServiceConfig, *, num_replicas: int | str | None = None,
               autoscaling_config: dict[str, Any] | None = None, ray_actor_options: dict[str, Any] | None = None,
               max_ongoing_requests: int = 256) -> Any:
    """A bound Ray Serve application serving `config` (pass it to `ray.serve.run`). `num_replicas` (or "auto"), or
    an `autoscaling_config`; `ray_actor_options` such as {"num_gpus": 1} per replica."""
    from ray import serve

    options: dict[str, Any] = {"max_ongoing_requests": max_ongoing_requests, "name": "arccompress"}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    elif num_replicas is not None:
        options["num_replicas"] = num_replicas
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    replica = serve.deployment(serve.ingress()(ServiceReplica), **options)
    return replica.bind(config)
