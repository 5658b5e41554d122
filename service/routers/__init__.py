"""The routes of the service, one ``APIRouter`` per concern, included by ``service.app.create_app``.

Handlers get the settings, the engine and the metrics through the dependencies of service/dependencies.py.
"""

from __future__ import annotations

from fastapi import APIRouter

from . import admin, docs, gallery, page, search

ROUTERS: tuple[APIRouter, ...] = (page.router, docs.router, admin.router, gallery.router, search.router)
REQUEST_BODIES = search.REQUEST_BODIES

__all__ = ["REQUEST_BODIES", "ROUTERS"]
