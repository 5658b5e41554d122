"""The searches: ``POST /search/text`` (text -> images) and ``POST /search/image`` (image -> captions, or
image -> images).

Both refuse at once while the service is not ready (before reading a body that could not be searched anyway),
read their request through a dependency (service/requests.py), and run through :func:`run_search`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Depends

from .. import openapi as doc
from ..dependencies import EngineDep, LimiterDep, MetricsDep, TextBatcherDep, require_ready
from ..metrics import Metrics
from ..openapi import RequestBodies
from ..requests import ImageQueryDep, TextQueryDep
from ..schemas import ImageSearchResponse, TextSearchResponse, image_form_model, text_request_model
from ..search import search_image
from ..state import Engine

router = APIRouter(dependencies=[Depends(require_ready)])
TEXT_PATH, IMAGE_PATH = "/search/text", "/search/image"


async def run_search(
    engine: Engine, metrics: Metrics, limiter: anyio.CapacityLimiter, label: str, search: Callable, *args: Any
) -> tuple[dict[str, Any], str]:
    """What every search does: lease the model and the serving index, run ``search(model, state, *args,
    options)`` in a worker thread once one is free (the wait is added to its timings as ``queue``, and to
    ``total``), and record its stage timings under ``label``. Returns its output and the index version searched."""
    with engine.lease() as (model, state):
        submitted = time.perf_counter()

        def job() -> dict[str, Any]:
            waited = round((time.perf_counter() - submitted) * 1000.0, 3)
            out = search(model, state, *args, engine.search_options)
            timings = out["timings_ms"]
            out["timings_ms"] = {"queue": waited, **timings, "total": round(timings["total"] + waited, 3)}
            return out

        out = await anyio.to_thread.run_sync(job, limiter=limiter)
        metrics.stages(label, out["timings_ms"])
        return out, state.version


@router.post(
    TEXT_PATH,
    response_model_exclude_unset=True,  # a text search's results are images: no caption fields
    responses=doc.responses(400, 413, 415, 422, 503, ok=TextSearchResponse),
)
async def search_text_route(query: TextQueryDep, batcher: TextBatcherDep, metrics: MetricsDep) -> TextSearchResponse:
    """Text -> images: JSON ``{"query", "k", "candidates"}``; results re-ranked by the HAT score. Concurrent
    queries are encoded together (service/batching.py); a query's results do not depend on its batch."""
    params = query.params
    (out, version), batch = await batcher.submit((query.query, params))
    timings = out["timings_ms"]
    out["timings_ms"] = {
        "queue": batch.queue_ms,
        "batch_wait": batch.batch_wait_ms,
        **timings,
        "encode_share": round(timings["encode"] / batch.size, 3),
        "total": round(timings["total"] + batch.queue_ms, 3),
    }
    metrics.stages("text", out["timings_ms"])
    return TextSearchResponse(**out, index_version=version, query=query.query, k=params.k, candidates=params.candidates)


@router.post(
    IMAGE_PATH,
    response_model_exclude_unset=True,  # image results have no caption fields
    responses=doc.responses(400, 413, 415, 422, 503, ok=ImageSearchResponse),
)
async def search_image_route(
    query: ImageQueryDep, engine: EngineDep, metrics: MetricsDep, limiter: LimiterDep
) -> ImageSearchResponse:
    """Image -> captions (or ``target=image``: image -> images): multipart ``image`` + ``k``, ``candidates``."""
    params, target = query.params, query.target
    label = f"image_{target}"
    out, version = await run_search(engine, metrics, limiter, label, search_image, query.data, target, params)
    candidates = params.candidates if target == "captions" else params.k
    return ImageSearchResponse(**out, index_version=version, k=params.k, candidates=candidates)


# The request bodies, documented by their models under the limits of the app's settings (service/openapi.py):
# they are read by dependencies, so FastAPI does not know them.
REQUEST_BODIES: RequestBodies = {
    (TEXT_PATH, "post"): ("application/json", text_request_model),
    (IMAGE_PATH, "post"): ("multipart/form-data", image_form_model),
}
