"""The gallery files: ``GET /images/{image_id}``, looked up by id in the serving index."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from .. import openapi as doc
from ..dependencies import EngineDep
from ..errors import ServiceError
from ..page import PAGE_HEADERS

router = APIRouter()


@router.get(
    "/images/{image_id:path}", response_model=None, responses=doc.responses(404, 503, **{"200": doc.IMAGE_FILE_OK})
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
