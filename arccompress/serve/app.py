"""The HTTP face of the service: a FastAPI app speaking OpenAI's API, with documents instead of tensors.

`build_app(config)` assembles it: the routes (`routes`), the middlewares that count, bound, admit, cancel and time
each request (`lifetime`), OpenAI's error schema for every failure (`refusals`), and the schema of what the routes
read and answer (`openapi`). Its lifespan loads the models when the app starts and releases them when it stops:
mounted in another app, enter `app.router.lifespan_context(app)` from yours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..errors import InputError
from ..version import __version__
from .config import ServiceConfig
from .lifetime import BodyLimit, RequestLifetime, RequestMetrics
from .openapi import declare
from .refusals import add_error_handlers
from .routes import ENDPOINTS, ROUTES, router
from .service import Service


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The service's models loaded while the app runs."""
    service: Service = app.state.service
    await service.start()
    try:
        yield
    finally:
        await service.stop()


def build_app(config: ServiceConfig | None = None, *, service: Service | None = None,
              scrape: Callable[[], Awaitable[bytes]] | None = None) -> FastAPI:
    """The service's ASGI app, for `config` (or a `Service` made already). `scrape`: what `/metrics` answers
    (default: this service's registry; a Ray Serve replica gives every replica's)."""
    if (config is None) == (service is None):
        raise InputError("give build_app a ServiceConfig or a Service")
    service = service or Service(config)  # type: ignore[arg-type]
    app = FastAPI(title="arccompress", version=__version__, lifespan=lifespan)
    app.state.service, app.state.scrape = service, scrape
    # outermost last: metrics see every request; the body limit reads the body; then a request is admitted
    app.add_middleware(RequestLifetime, max_requests=service.config.max_queued_requests,
                       timeout=service.config.request_timeout, metrics=service.metrics)
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics, paths=ROUTES)
    add_error_handlers(app)
    app.include_router(router)
    declare(app, bodies={e.path: e.request for e in ENDPOINTS}, streams={e.path: e.chunk for e in ENDPOINTS})
    return app
