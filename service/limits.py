"""Request body limits, as a pure ASGI middleware.

A body is refused with 413 before it is read when its ``Content-Length`` is over the limit, and while it
streams when it is sent without one (chunked) or lies about its length: ``receive`` counts the bytes and
raises ``BodyTooLargeError`` as soon as the count passes the limit, so at most one chunk beyond it is held.

A refused body is drained before the connection closes (a "lingering close", as nginx and Apache do): the 413
is sent first, then what the client is still sending is read and discarded, for at most ``LINGER_SECONDS`` in
all and ``LINGER_IDLE_SECONDS`` between chunks, and only then is the response finished and the connection
closed. Closing a socket with unread data in it makes the kernel answer with a reset, which throws away the
413 the client has not read yet: clients that send the whole body before reading (httpx, urllib, requests)
then saw "connection reset" or "broken pipe" instead of the error. A client that asked ``Expect:
100-continue`` is answered at once and not drained: it has not sent the body and will not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .asgi import HTTPMiddleware, ResponseWatch
from .errors import BodyTooLargeError, ServiceError, error_body

# Bounds of the drain after a refusal (nginx's lingering_time / lingering_timeout are 30 s / 5 s): a client
# cannot hold a connection open with an endless body for longer than this.
LINGER_SECONDS = 10.0
LINGER_IDLE_SECONDS = 2.0


class BodyLimitMiddleware(HTTPMiddleware):
    """Refuses request bodies larger than ``limit_for(path)`` bytes with a JSON 413.

    ``limit_for(path)`` -> ``(bytes, message)``: the limit and what the 413 tells the client.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], tuple[int, str]]) -> None:
        super().__init__(app)
        self.limit_for = limit_for

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit, refusal = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared == -1:
            await _send_error(send, ServiceError(400, "bad_request", "Content-Length header is not a valid length"))
            return
        if declared is not None and declared > limit:
            await _refuse(scope, receive, send, BodyTooLargeError(refusal))
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(refusal)
            return message

        watch = ResponseWatch(send)
        try:
            await self.app(scope, counting_receive, watch)
        except BodyTooLargeError as exc:  # raised where no exception handler turned it into a response
            if watch.started:
                raise
            await _refuse(scope, receive, send, exc)


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


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers", []) if key == name), None)


async def _send_error(send: Send, exc: ServiceError, close: bool = False, finished: bool = True) -> None:
    """The JSON error response; ``finished=False`` leaves it open (an empty last chunk ends it)."""
    body = json.dumps(error_body(exc.code, exc.message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        # The unread body stays on the connection: tell the client it will not be reused.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": not finished})


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: ServiceError) -> None:
    """Sends the error, drains the rest of the request body (bounded in time), then ends the response and
    closes the connection, so that the client reads the error instead of a reset."""
    if (_header(scope, b"expect") or b"").lower() == b"100-continue":
        await _send_error(send, exc, close=True)  # the client waits for "100 Continue" and sends no body
        return
    await _send_error(send, exc, close=True, finished=False)
    await drain_body(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def drain_body(receive: Receive) -> int:
    """Reads and discards request body chunks until the body ends, the client goes away, or the linger bounds
    pass; returns the bytes discarded."""
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(receive(), timeout=min(left, LINGER_IDLE_SECONDS))
        except TimeoutError:
            break
        if message["type"] != "http.request":
            break
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return drained
