"""The search page: ``GET /``, its script ``GET /page.js``, its style sheet ``GET /page.css`` and an empty
``GET /favicon.ico`` (not in the schema)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ..dependencies import SettingsDep
from ..page import PAGE_CSS, PAGE_HEADERS, PAGE_JS, page_html
from ..schemas import RequestLimits

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page(settings: SettingsDep) -> HTMLResponse:
    """The search page, with the service's request limits."""
    return HTMLResponse(page_html(RequestLimits.of(settings)), headers=PAGE_HEADERS)


@router.get("/page.js")
async def page_js() -> Response:
    """The page's script."""
    return Response(PAGE_JS, media_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/page.css")
async def page_css() -> Response:
    """The page's style sheet."""
    return Response(PAGE_CSS, media_type="text/css; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/favicon.ico")
async def favicon() -> Response:
    """No icon; answering keeps browsers' automatic request out of the 404s."""
    return Response(status_code=204)
