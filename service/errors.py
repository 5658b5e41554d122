"""Errors the service answers with, and the JSON shape of every error response.

Every error response is ``{"error": {"code": str, "message": str}}`` (validation errors add ``"details"``),
with a 4xx status, or 503 while the service is not ready.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses: ``status`` (HTTP), a stable machine ``code`` and a human ``message``."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class NotReadyError(ServiceError):
    """The model or the index is not loaded (yet); the message says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, "not_ready", reason)


class BodyTooLargeError(ServiceError):
    """The request body (or the uploaded image) is larger than the service accepts."""

    def __init__(self, message: str) -> None:
        super().__init__(413, "payload_too_large", message)


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}
