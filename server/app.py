"""The FastAPI application: wiring of settings, service, middleware and routes, and the lifespan.

Start-up loads the models in the background so /healthz answers at once and /readyz turns 200
only when every model is loaded, patched and warmed. A failed start calls ``on_fatal`` (by default
the process sends itself SIGTERM) so the server exits instead of idling unready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from . import demo, docs, errors, probes, routes
from .config import Settings
from .loading import StartupError, load_model
from .metrics import Metrics
from .middleware import BearerAuthMiddleware, RequestIdMiddleware, RequestMetricsMiddleware
from .service import InferenceService, Loader

log = logging.getLogger(__name__)

FatalHandler = Callable[[str], None]


def _terminate_self(message: str) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(
    settings: Settings | None = None,
    *,
    loader: Loader = load_model,
    on_fatal: FatalHandler = _terminate_self,
) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    service = InferenceService(settings, metrics, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start(service, on_fatal))
        try:
            yield
        finally:
            service.begin_draining()
            starting.cancel()
            with suppress(asyncio.CancelledError):
                await starting
            await service.stop()

    app = FastAPI(
        title="tome-serve",
        summary="Vision Transformer inference accelerated with Token Merging (ToMe)",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by docs.install from the package's own copy of Swagger UI
        redoc_url=None,  # its script would come from a CDN
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(probes.router)
    demo.install(app)
    docs.install(app)
    # Added innermost first: request id (outermost, so every answer carries it), metrics (also
    # counts 401s), auth.
    if settings.api_key is not None:
        app.add_middleware(BearerAuthMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


async def _start(service: InferenceService, on_fatal: FatalHandler) -> None:
    try:
        await service.start()
    except StartupError as exc:
        log.critical("start-up failed: %s", exc)
        on_fatal(str(exc))
    except Exception as exc:  # anything else unexpected must not leave a half-started server running
        log.critical("start-up failed", exc_info=True)
        on_fatal(f"{type(exc).__name__}: {exc}")
