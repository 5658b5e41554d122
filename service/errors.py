"""Errors the service answers with, and the JSON shape of every error response (pydantic models: they build the
bodies and document them in the OpenAPI schema).

Every error response is ``{"error": {"code": str, "message": str}}`` (validation errors add ``"details"``),
with a 4xx status, or 503 while the service is not ready.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ServiceError(Exception):
    """A request the service refuses: ``status`` (HTTP), a stable machine ``code`` and a human ``message``."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def __reduce__(self):
        """Pickled as a plain ``ServiceError`` (it crosses processes in ``python -m service.cluster``)."""
        return (ServiceError, (self.status, self.code, self.message, self.details))


class NotReadyError(ServiceError):
    """The model or the index is not loaded (yet); the message says which and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, "not_ready", reason)


class BodyTooLargeError(ServiceError):
    """The request body (or the uploaded image) is larger than the service accepts."""

    def __init__(self, message: str) -> None:
        super().__init__(413, "payload_too_large", message)


class Closed(BaseModel):
    """A JSON object with exactly these fields (no others accepted or documented)."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Closed):
    field: str = Field(description="The field at fault (dotted path), or 'body'.")
    message: str
    type: str = Field(description="The validator's error type, e.g. 'missing', 'extra_forbidden'.")


class ErrorInfo(Closed):
    code: str = Field(description="Stable machine-readable code, e.g. 'empty_query', 'payload_too_large'.")
    message: str = Field(description="What is wrong, naming the field or limit.")
    details: list[ErrorDetail] | None = Field(None, description="Every validation problem (validation errors only).")


class ErrorResponse(Closed):
    error: ErrorInfo


def error_info(code: str, message: str, details: list[dict[str, Any]] | None = None) -> ErrorInfo:
    """The ``error`` object of an error response (``details`` left out when there are none)."""
    if details:
        return ErrorInfo(code=code, message=message, details=[ErrorDetail(**d) for d in details])
    return ErrorInfo(code=code, message=message)


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return ErrorResponse(error=error_info(code, message, details)).model_dump(mode="json", exclude_unset=True)
