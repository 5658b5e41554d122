"""Dynamic batching: concurrent requests gathered for a few milliseconds and run as one batch.

A :class:`Batcher` takes items from the event loop (``await batcher.submit(item)``) and runs them in batches in
worker threads: ``run_batch(items) -> outcomes``, one outcome per item, either its result or the exception it
alone failed with (a failing query never fails the others of its batch). A batch starts once it holds
``max_batch`` items, or ``wait_ms`` after its first item arrived and a worker is free; items that arrive while
the batch waits for a worker join it. So a query alone waits at most ``wait_ms`` more than before, and under
load the queries that queue anyway share one forward of the encoder.

The batcher knows nothing of searching: the service's text and image searches use it (service/state.py), and so
can any other deployment that wants the same gathering (a Ray Serve query encoder, for one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread


@dataclass(frozen=True)
class BatchInfo:
    """How one item was run: the size of its batch, the milliseconds it spent before the batch started
    (``queue``) and the part of them spent gathering the batch (``batch_wait``)."""

    size: int
    queue_ms: float
    batch_wait_ms: float


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    arrived: float


class Batcher:
    """Gathers items into batches of at most ``max_batch``, run by ``run_batch`` in a thread that holds one of
    ``limiter``'s tokens (the service's search workers)."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch: int,
        wait_ms: float,
        limiter: anyio.CapacityLimiter,
        on_batch: Callable[[int], None] | None = None,
        on_submit: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or wait_ms < 0:
            raise ValueError(f"max_batch must be at least 1 and wait_ms at least 0, got {max_batch}, {wait_ms}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.limiter = limiter
        self.on_batch = on_batch
        self.on_submit = on_submit  # called with +1 when an item is submitted and -1 when its submit returns
        self._queue: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._collector: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # batches running (kept referenced until done)

    async def submit(self, item: Any) -> tuple[Any, BatchInfo]:
        """Runs ``item`` in the next batch; returns its result and how it was batched, or raises its exception."""
        future = asyncio.get_running_loop().create_future()
        if self.on_submit is not None:
            self.on_submit(1)
        try:
            self._queue.append(_Pending(item, future, time.perf_counter()))
            self._arrived.set()
            if self._collector is None or self._collector.done():
                self._collector = asyncio.create_task(self._collect())
            return await future
        finally:
            if self.on_submit is not None:
                self.on_submit(-1)

    async def _collect(self) -> None:
        """Forms batches while items are queued; each batch runs in its own task, so batches can overlap up to
        the limiter's number of workers."""
        while self._queue:
            first = self._queue[0].arrived
            while len(self._queue) < self.max_batch and (left := first + self.wait_s - time.perf_counter()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), timeout=left)
                except TimeoutError:
                    break
            token = object()  # the batch's own claim on a worker, released by the task that runs it
            await self.limiter.acquire_on_behalf_of(token)  # items arriving meanwhile join this batch
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            started = time.perf_counter()
            self._tasks.add(task := asyncio.create_task(self._run(batch, token, started, first + self.wait_s)))
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Pending], token: object, started: float, gathered: float) -> None:
        try:
            outcomes = await anyio.to_thread.run_sync(self._call, [p.item for p in batch])
        except Exception as exc:  # the batch itself failed (a bug): every item gets the exception
            outcomes = [exc] * len(batch)
        finally:
            self.limiter.release_on_behalf_of(token)
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():  # the request went away (client disconnected)
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                queue_ms = (started - pending.arrived) * 1000.0
                wait_ms = max(0.0, (min(started, gathered) - pending.arrived) * 1000.0)
                pending.future.set_result((outcome, BatchInfo(len(batch), round(queue_ms, 3), round(wait_ms, 3))))

    def _call(self, items: list[Any]) -> Sequence[Any]:
        outcomes = self.run_batch(items)
        if len(outcomes) != len(items):
            raise RuntimeError(f"run_batch returned {len(outcomes)} outcomes for {len(items)} items")
        return outcomes
