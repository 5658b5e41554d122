"""FastAPI dependencies of the routes: what ``create_app`` put on ``app.state``, read per request.

They are coroutines so that FastAPI calls them on the event loop, not in a thread. Tests (and embedding code)
replace them with ``app.dependency_overrides[get_settings] = ...``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .batching import Batcher
from .errors import NotReadyError
from .metrics import Metrics
from .settings import Settings
from .state import Engine


async def get_settings(request: Request) -> Settings:
    """The settings of this app."""
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    """The engine of this app: the model, the serving index and the search options."""
    return request.app.state.engine


async def get_metrics(request: Request) -> Metrics:
    """The metrics of this app."""
    return request.app.state.metrics


async def get_text_batcher(request: Request) -> Batcher:
    """The batcher of text searches (made by the app's lifespan, on the search workers' limiter)."""
    return request.app.state.batchers["text"]


async def get_image_batcher(request: Request) -> Batcher:
    """The batcher of image searches."""
    return request.app.state.batchers["image"]


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TextBatcherDep = Annotated[Batcher, Depends(get_text_batcher)]
ImageBatcherDep = Annotated[Batcher, Depends(get_image_batcher)]


async def require_ready(engine: EngineDep) -> None:
    """Refuses (503, with the reason) while the model or an index is not loaded, before a body is read."""
    if reason := engine.not_ready_reason():
        raise NotReadyError(reason)
