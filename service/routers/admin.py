"""Operations: liveness ``/healthz``, readiness ``/readyz``, ``/metrics``, the serving ``/index`` and
``POST /admin/reload``."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .. import openapi as doc
from ..dependencies import EngineDep, MetricsDep, SettingsDep
from ..errors import ServiceError, error_info
from ..schemas import HealthResponse, IndexInfo, NotReadyResponse, ReadyResponse, ReloadResponse
from ..state import Engine

router = APIRouter()
NOT_READY_503 = {"503": {"model": NotReadyResponse, "description": "Not ready, and why."}}


@router.get("/healthz", responses=doc.responses(ok=HealthResponse))
async def healthz() -> HealthResponse:
    """Liveness: the process answers."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=None, responses=doc.responses(ok=ReadyResponse, **NOT_READY_503))
async def readyz(engine: EngineDep) -> Response:
    """Readiness: 200 once the model and an index are loaded, else 503 with the reason."""
    reason = engine.not_ready_reason()
    state = engine.state
    if reason or state is None:
        body = NotReadyResponse(ready=False, reason=reason, error=error_info("not_ready", reason or "not ready"))
        return JSONResponse(body.model_dump(mode="json", exclude_unset=True), status_code=503)
    ready = ReadyResponse(ready=True, index_version=state.version, model=engine.model.identity)
    shards = engine.shard_status()
    if shards is not None:
        ready = ready.model_copy(update={"shards": shards})
    return JSONResponse(ready.model_dump(mode="json", exclude_none=True))


@router.get("/metrics", include_in_schema=False)
async def metrics_text(engine: EngineDep, metrics: MetricsDep) -> PlainTextResponse:
    """Prometheus text format 0.0.4: the request and search counters, and the gauges of the engine."""
    text = metrics.render(_gauges(engine))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/index", responses=doc.responses(503, ok=IndexInfo))
async def index_info(engine: EngineDep) -> IndexInfo:
    """The serving index: version, counts and the builder's manifest (segment list left out)."""
    with engine.lease() as (model, state):
        return IndexInfo(
            version=state.version,
            images=state.index.num_images,
            captions=state.index.num_captions,
            loaded_at=state.loaded_at,
            model_identity=model.identity,
            refused_versions=dict(engine.refused),
            manifest={k: v for k, v in state.index.manifest.items() if k != "segments"},
        )


@router.post(
    "/admin/reload",
    responses=doc.responses(403, 404, 409, 503, ok=ReloadResponse),
    openapi_extra={"parameters": [doc.ADMIN_KEY_PARAMETER]},
)
async def admin_reload(request: Request, settings: SettingsDep, engine: EngineDep) -> ReloadResponse:
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
    return ReloadResponse(**await engine.check(force=True))


def _gauges(engine: Engine) -> list[tuple[str, str, dict[str, str], float]]:
    """``(name, help, labels, value)`` of the engine's gauges: readiness, the model, the serving index."""
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
