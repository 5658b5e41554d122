"""The FastAPI application: ``create_app(settings)``.

The model and the index are loaded by the app's lifespan, in the background: ``/healthz`` answers at once,
``/readyz`` says 503 with the reason until both are loaded. Searches run in worker threads (at most
``HAT_WORKERS`` at a time), never on the event loop. The routes are in service/routers/; they get the settings,
the engine and the metrics from ``app.state`` through the dependencies of service/dependencies.py.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .asgi import HTTPMiddleware, ResponseWatch
from .batching import Batcher
from .errors import ServiceError, error_body
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware, route_label
from .openapi import document_request_bodies
from .requests import upload_limit_message, validation_details
from .routers import REQUEST_BODIES, ROUTERS
from .settings import Settings
from .state import Engine

logger = logging.getLogger("service")
JSON_BODY_LIMIT = 64 * 1024  # every body but an image upload: a query of HAT_MAX_QUERY_CHARS fits many times
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small form fields beside the image


def create_app(
    settings: Settings | None = None, *, model=None, engine: Callable[[Metrics], Engine] | None = None
) -> FastAPI:
    """The search service. ``model`` (an already loaded ``HATModel``) skips loading ``settings.model``;
    ``engine`` makes the engine from the app's metrics instead (``python -m service.cluster``'s, whose model and
    index live in Ray Serve deployments)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.resolved_device()  # a CUDA request on a machine without CUDA stops the start-up here
        import torch

        torch.set_num_threads(settings.torch_threads(os.cpu_count()))
        app.state.limiter = limiter = anyio.CapacityLimiter(settings.search_slots)
        app.state.batchers = {
            kind: Batcher(
                functools.partial(app.state.engine.run_batch, searches),
                max_batch=settings.max_batch,
                wait_ms=settings.batch_wait_ms,
                limiter=limiter,
                on_batch=functools.partial(metrics.batch, kind),
                on_submit=app.state.engine.idle_workers.count_requests,  # how busy the service is (wide encoding)
            )
            for kind, searches in (("text", "search_texts"), ("image", "search_images"))
        }
        await app.state.engine.start()
        try:
            yield
        finally:
            await app.state.engine.stop()

    # /docs is service/routers/docs.py (Swagger UI's files served from here, not a CDN); no /redoc.
    app = FastAPI(title="HAT Search", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    app.state.engine = engine(metrics) if engine else Engine(settings, metrics, model=model)
    _install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    document_request_bodies(app, settings, REQUEST_BODIES)

    def limit_for(path: str) -> tuple[int, str]:
        if path == "/search/image":
            return settings.max_upload_bytes + MULTIPART_OVERHEAD, upload_limit_message(settings)
        return JSON_BODY_LIMIT, f"the request body is larger than the limit of {JSON_BODY_LIMIT} bytes"

    # Added innermost first: metrics see every response, including CORS preflights, 413s and 500s.
    app.add_middleware(InternalErrorMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


# ------------------------------------------------------------------------------------------------ errors


def _error_response(request: Request, status: int, code: str, message: str, details=None, headers=None) -> Response:
    request.app.state.metrics.error(route_label(request.scope), code)
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _install_error_handlers(app: FastAPI) -> None:
    """Every error as the service's JSON error body (service/errors.py), counted by code."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return _error_response(request, exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _error_response(request, exc.status_code, code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        details = validation_details(exc.errors())
        return _error_response(request, 422, "validation_error", details[0]["message"], details)

    @app.exception_handler(Exception)  # only for failures in the middlewares outside InternalErrorMiddleware
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(request, 500, "internal_error", INTERNAL_ERROR_MESSAGE)


INTERNAL_ERROR_MESSAGE = "internal error (logged by the server)"


class InternalErrorMiddleware(HTTPMiddleware):
    """An unexpected exception in a route becomes a JSON 500 that ends the request here.

    Starlette's outermost ``ServerErrorMiddleware`` (where ``exception_handler(Exception)`` runs) answers and
    then re-raises, and uvicorn closes a connection whose application raised: the client's next request on
    the same keep-alive connection then failed (19 of 20 in a repeat test). Answered here, inside it, the
    exception goes no further and the connection stays usable.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = ResponseWatch(send)
        try:
            await self.app(scope, receive, watch)
        except Exception:
            if watch.started:  # part of a response is out: nothing valid can follow, let the server close
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            self.metrics.error(route_label(scope), "internal_error")
            response = JSONResponse(error_body("internal_error", INTERNAL_ERROR_MESSAGE), status_code=500)
            await response(scope, receive, send)
