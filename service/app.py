"""The FastAPI application: ``create_app(settings)``.

The model and the index are loaded by the app's lifespan, in the background: ``/healthz`` answers at once,
``/readyz`` says 503 with the reason until both are loaded. Searches run in worker threads (at most
``HAT_WORKERS`` at a time), never on the event loop.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from . import openapi as doc
from .errors import NotReadyError, ServiceError, error_body
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware, route_label
from .page import PAGE_HTML, PAGE_JS
from .requests import (
    check_query,
    parse_image_form,
    parse_json_body,
    search_params,
    upload_limit_message,
    validation_details,
)
from .search import search_image, search_text
from .settings import Settings
from .state import Engine

logger = logging.getLogger("service")
JSON_BODY_LIMIT = 64 * 1024  # every body but an image upload: a query of HAT_MAX_QUERY_CHARS fits many times
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small form fields beside the image
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' "
    "blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def get_settings(request: Request) -> Settings:
    """The settings of this app (a dependency: tests may override it)."""
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]


def create_app(settings: Settings | None = None, *, model=None) -> FastAPI:
    """The search service. ``model`` (an already loaded ``HATModel``) skips loading ``settings.model``."""
    settings = settings or Settings.from_env()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.resolved_device()  # a CUDA request on a machine without CUDA stops the start-up here
        import torch

        # Default: the cores shared by the concurrent searches (measured: 2 searches x 2 threads on 2 cores
        # collapse to ~0.8 s a query next to a busy neighbour process, 1 thread each stays at ~25 ms).
        torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // settings.workers))
        app.state.limiter = anyio.CapacityLimiter(settings.workers)
        await app.state.engine.start()
        try:
            yield
        finally:
            await app.state.engine.stop()

    app = FastAPI(title="HAT Search", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = Engine(settings, metrics, model=model)
    _install_error_handlers(app)
    _add_routes(app)
    _add_gallery_routes(app)
    _add_search_routes(app)

    def limit_for(path: str) -> tuple[int, str]:
        if path == "/search/image":
            return settings.max_upload_bytes + MULTIPART_OVERHEAD, upload_limit_message(settings)
        return JSON_BODY_LIMIT, f"the request body is larger than the limit of {JSON_BODY_LIMIT} bytes"

    # Added innermost first: metrics see every response, including CORS preflights and 413s.
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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(request, 500, "internal_error", "internal error (logged by the server)")


# ------------------------------------------------------------------------------------------------ routes


def _add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML, headers=PAGE_HEADERS)

    @app.get("/page.js", include_in_schema=False)
    async def page_js() -> Response:
        return Response(PAGE_JS, media_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # no icon; answering keeps browsers' automatic request out of the 404s

    @app.get("/healthz", response_model=None, responses=doc.responses(ok=doc.HealthResponse))
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=None,
        responses=doc.responses(
            ok=doc.ReadyResponse, **{"503": {"model": doc.NotReadyResponse, "description": "Not ready, and why."}}
        ),
    )
    async def readyz(engine: EngineDep) -> Response:
        """Readiness: 200 once the model and an index are loaded, else 503 with the reason."""
        reason = engine.not_ready_reason()
        state = engine.state
        if reason or state is None:
            body = {"ready": False, "reason": reason, **error_body("not_ready", reason or "not ready")}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"ready": True, "index_version": state.version, "model": engine.model.identity})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_text(request: Request, engine: EngineDep) -> PlainTextResponse:
        text = request.app.state.metrics.render(_gauges(engine))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/index", response_model=None, responses=doc.responses(503, ok=doc.IndexInfo))
    async def index_info(engine: EngineDep) -> dict[str, Any]:
        """The serving index: version, counts and the builder's manifest (segment list left out)."""
        with engine.lease() as (model, state):
            manifest = {k: v for k, v in state.index.manifest.items() if k != "segments"}
            return {
                "version": state.version,
                "images": state.index.num_images,
                "captions": state.index.num_captions,
                "loaded_at": state.loaded_at,
                "model_identity": model.identity,
                "refused_versions": dict(engine.refused),
                "manifest": manifest,
            }


def _add_gallery_routes(app: FastAPI) -> None:
    @app.get(
        "/images/{image_id:path}",
        response_model=None,
        responses=doc.responses(404, 503, **{"200": doc.IMAGE_FILE_OK}),
    )
    async def image_file(image_id: str, engine: EngineDep) -> Response:
        """The gallery file of image ``image_id`` (looked up in the index, never joined to a path)."""
        with engine.lease() as (_, state), state.lock:
            item = state.index.image_by_id(image_id)
        if item is None:
            raise ServiceError(404, "not_found", f"no image with id {image_id!r} in the index")
        path = _regular_file(item["path"])
        if path is None:
            raise ServiceError(404, "image_file_missing", f"the file of image {image_id!r} is not available")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600", **PAGE_HEADERS})

    @app.post(
        "/admin/reload",
        response_model=None,
        responses=doc.responses(403, 404, 409, 503, ok=doc.ReloadResponse),
        openapi_extra={"parameters": [doc.ADMIN_KEY_PARAMETER]},
    )
    async def admin_reload(request: Request, settings: SettingsDep, engine: EngineDep) -> dict[str, Any]:
        """Check ``current`` now and serve it (retrying a version refused before). Header ``X-Admin-Key``."""
        if settings.admin_key is None:
            raise ServiceError(404, "not_found", "no such route: admin endpoints are off (HAT_ADMIN_KEY is unset)")
        given = request.headers.get("x-admin-key", "").encode("latin-1")
        if not hmac.compare_digest(given, settings.admin_key.encode("utf-8")):
            raise ServiceError(403, "forbidden", "missing or wrong X-Admin-Key")
        if engine.model is None:
            raise ServiceError(503, "not_ready", engine.not_ready_reason() or "model not loaded")
        if not settings.index_root:
            raise ServiceError(409, "no_index", "HAT_INDEX_ROOT is not set")
        return await engine.check(force=True)


def _regular_file(path: str) -> str | None:
    """``path`` if it is still what the builder recorded: a regular file reached without following a symbolic
    link. The builder stores every image's fully resolved path, so a link found there now was put in place after
    the build and could lead anywhere (outside the gallery): such a file is not served, nor a directory, device,
    FIFO or missing file."""
    try:
        if Path(path).resolve(strict=True) != Path(path):
            return None
        return path if stat.S_ISREG(os.lstat(path).st_mode) else None
    except (OSError, RuntimeError):
        return None


def _gauges(engine: Engine) -> list[tuple[str, str, dict[str, str], float]]:
    state = engine.state
    gauges = [("hat_ready", "1 when the model and an index are loaded.", {}, 0.0 if engine.not_ready_reason() else 1.0)]
    if engine.model is not None:
        gauges.append(("hat_model_info", "The loaded model.", {"identity": engine.model.identity}, 1.0))
    if state is not None:
        gauges += [
            ("hat_index_images", "Images in the serving index.", {}, float(state.index.num_images)),
            ("hat_index_captions", "Captions in the serving index.", {}, float(state.index.num_captions)),
            ("hat_index_info", "The serving index version.", {"version": state.version}, 1.0),
            ("hat_index_loaded_timestamp_seconds", "When the serving index was loaded.", {}, state.loaded_at),
        ]
    gauges.append(("hat_index_refused_versions", "Index versions refused since start.", {}, float(len(engine.refused))))
    return gauges


# ------------------------------------------------------------------------------------------------ search


def _queued(search):
    """``search`` with the time it waited for a worker added to its timings (``queue``, and in ``total``)."""
    submitted = time.perf_counter()

    def run(*args):
        waited = round((time.perf_counter() - submitted) * 1000.0, 3)
        out = search(*args)
        timings = out["timings_ms"]
        out["timings_ms"] = {"queue": waited, **timings, "total": round(timings["total"] + waited, 3)}
        return out

    return run


def _add_search_routes(app: FastAPI) -> None:
    settings = app.state.settings  # the documented limits are the ones this app enforces

    @app.post(
        "/search/text",
        response_model=None,
        responses=doc.responses(400, 413, 415, 422, 503, ok=doc.TextSearchResponse),
        openapi_extra={"requestBody": doc.text_request_body(settings)},
    )
    async def search_text_route(request: Request, settings: SettingsDep, engine: EngineDep) -> dict[str, Any]:
        """Text -> images: JSON ``{"query", "k", "candidates"}``; results re-ranked by the HAT score."""
        if reason := engine.not_ready_reason():
            raise NotReadyError(reason)
        body = await parse_json_body(request)
        query = check_query(body.query, settings)
        params = search_params(body.k, body.candidates, settings)
        with engine.lease() as (model, state):
            out = await anyio.to_thread.run_sync(
                _queued(search_text), model, state, query, params, limiter=request.app.state.limiter
            )
            request.app.state.metrics.stages("text", out["timings_ms"])
            return {
                **out,
                "index_version": state.version,
                "query": query,
                "k": params.k,
                "candidates": params.candidates,
            }

    @app.post(
        "/search/image",
        response_model=None,
        responses=doc.responses(400, 413, 415, 422, 503, ok=doc.ImageSearchResponse),
        openapi_extra={"requestBody": doc.image_request_body(settings)},
    )
    async def search_image_route(request: Request, settings: SettingsDep, engine: EngineDep) -> dict[str, Any]:
        """Image -> captions (or ``target=image``: image -> images): multipart ``image`` + ``k``, ``candidates``."""
        if reason := engine.not_ready_reason():
            raise NotReadyError(reason)  # before reading an upload that could not be searched anyway
        form = await parse_image_form(request, settings)
        with engine.lease() as (model, state):
            out = await anyio.to_thread.run_sync(
                _queued(search_image),
                model,
                state,
                form.data,
                form.target,
                form.params,
                settings.max_image_pixels,
                limiter=request.app.state.limiter,
            )
            request.app.state.metrics.stages(f"image_{out['target']}", out["timings_ms"])
            candidates = form.params.candidates if form.target == "captions" else form.params.k
            return {**out, "index_version": state.version, "k": form.params.k, "candidates": candidates}
