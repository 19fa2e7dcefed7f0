"""The service as a Ray Serve application: one engine per replica, Ray Serve's routing and autoscaling in front.

    from arccompress.serve import ServiceConfig, deployment
    from ray import serve
    serve.run(deployment(ServiceConfig(encoder=..., decoder=..., store="/shared/wiki-store"), num_replicas=4,
                         ray_actor_options={"num_gpus": 1}), route_prefix="/")

Each replica builds the same app as `arccompress serve` (its lifespan loads the models on the replica); the store
must be on a file system every node sees, as for the Ray Data corpus job that wrote it.
"""

from __future__ import annotations

from typing import Any

from .app import build_app
from .config import ServiceConfig


class ServiceReplica:
    """One replica: the config travels to the replica, the app (and its models) is built there."""

    def __init__(self, config: ServiceConfig):
        self.config = config

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.config)


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
