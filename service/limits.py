"""Request body limits, as a pure ASGI middleware.

A body is refused with 413 before it is read when its ``Content-Length`` is over the limit, and while it
streams when it is sent without one (chunked) or lies about its length: ``receive`` counts the bytes and
raises ``BodyTooLargeError`` as soon as the count passes the limit, so at most one chunk beyond it is held.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyTooLargeError, ServiceError, error_body


class BodyLimitMiddleware:
    """Refuses request bodies larger than ``limit_for(path)`` bytes with a JSON 413.

    ``limit_for(path)`` -> ``(bytes, message)``: the limit and what the 413 tells the client.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], tuple[int, str]]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, refusal = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared == -1:
            await _send_error(send, ServiceError(400, "bad_request", "Content-Length header is not a valid length"))
            return
        if declared is not None and declared > limit:
            await _send_error(send, BodyTooLargeError(refusal), close=True)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(refusal)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError as exc:  # raised where no exception handler turned it into a response
            if started:
                raise
            await _send_error(send, exc, close=True)


def _content_length(scope: Scope) -> int | None:
    """The declared length; None when absent, -1 when malformed."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


async def _send_error(send: Send, exc: ServiceError, close: bool = False) -> None:
    body = json.dumps(error_body(exc.code, exc.message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        # The unread body stays on the connection: tell the client it will not be reused.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
