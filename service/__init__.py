"""FastAPI search service (text -> images, image -> captions): ``create_app(settings)``, ``python -m service``.

See docs/service.md for the HTTP API and the ``HAT_*`` settings.
"""

from .settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "create_app"]


def create_app(*args, **kwargs):
    """``service.app.create_app``, imported on first use (FastAPI is not needed to read the settings)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
