"""The searches: ``POST /search/text`` (text -> images) and ``POST /search/image`` (image -> captions, or
image -> images).

Both refuse at once while the service is not ready (before reading a body that could not be searched anyway),
read their request through a dependency (service/requests.py), and run through :func:`run_search`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from .. import openapi as doc
from ..batching import Batcher
from ..dependencies import ImageBatcherDep, MetricsDep, TextBatcherDep, require_ready
from ..metrics import Metrics
from ..openapi import RequestBodies
from ..requests import ImageQueryDep, TextQueryDep
from ..schemas import ImageSearchResponse, TextSearchResponse, image_form_model, text_request_model

router = APIRouter(dependencies=[Depends(require_ready)])
TEXT_PATH, IMAGE_PATH = "/search/text", "/search/image"


async def run_search(batcher: Batcher, metrics: Metrics, label: str, request: tuple) -> tuple[dict[str, Any], str]:
    """What every search does: submit the request to its batcher (it runs, with others that arrive together,
    in a worker thread on a lease of the model and the serving index), add the time spent before its batch
    started (``queue``, of which ``batch_wait`` gathering the batch) and the encoder's share per request to its
    timings, and record them under ``label``. Returns its output and the index version searched."""
    (out, version), batch = await batcher.submit(request)
    timings = out["timings_ms"]
    out["timings_ms"] = {
        "queue": batch.queue_ms,
        "batch_wait": batch.batch_wait_ms,
        **timings,
        "encode_share": round(timings["encode"] / batch.size, 3),
        "total": round(timings["total"] + batch.queue_ms, 3),
    }
    metrics.stages(label, out["timings_ms"])
    return out, version


@router.post(
    TEXT_PATH,
    response_model_exclude_unset=True,  # a text search's results are images: no caption fields
    responses=doc.responses(400, 413, 415, 422, 503, ok=TextSearchResponse),
)
async def search_text_route(query: TextQueryDep, batcher: TextBatcherDep, metrics: MetricsDep) -> TextSearchResponse:
    """Text -> images: JSON ``{"query", "k", "candidates"}``; results re-ranked by the HAT score. Concurrent
    queries are encoded together (service/batching.py); a query's results do not depend on its batch."""
    params = query.params
    out, version = await run_search(batcher, metrics, "text", (query.query, params))
    return TextSearchResponse(**out, index_version=version, query=query.query, k=params.k, candidates=params.candidates)


@router.post(
    IMAGE_PATH,
    response_model_exclude_unset=True,  # image results have no caption fields
    responses=doc.responses(400, 413, 415, 422, 503, ok=ImageSearchResponse),
)
async def search_image_route(
    query: ImageQueryDep, batcher: ImageBatcherDep, metrics: MetricsDep
) -> ImageSearchResponse:
    """Image -> captions (or ``target=image``: image -> images): multipart ``image`` + ``k``, ``candidates``.
    Concurrent uploads are encoded together; each is decoded on its own."""
    params, target = query.params, query.target
    out, version = await run_search(batcher, metrics, f"image_{target}", (query.data, target, params))
    candidates = params.candidates if target == "captions" else params.k
    return ImageSearchResponse(**out, index_version=version, k=params.k, candidates=candidates)


# The request bodies, documented by their models under the limits of the app's settings (service/openapi.py):
# they are read by dependencies, so FastAPI does not know them.
REQUEST_BODIES: RequestBodies = {
    (TEXT_PATH, "post"): ("application/json", text_request_model),
    (IMAGE_PATH, "post"): ("multipart/form-data", image_form_model),
}
