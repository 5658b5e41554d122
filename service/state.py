"""What the service serves from: the model, and the current index held in one immutable ``IndexState``.

Hot reload: a background task polls ``IndexRoot(root).current_version()``. A new version is opened beside
the serving one (checked against the model's identity), then published with a single attribute assignment
(``engine.state = new``). A request reads ``engine.state`` once, at its start, and uses that object to the
end, so requests in flight finish on the old index; the old one is closed after a grace period, once no
request holds it. A version that fails to open is refused, logged with its reason and not tried again
(until ``POST /admin/reload`` asks for it explicitly); the old version keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from index_format import (
    GalleryIndex,
    IndexFormatError,
    IndexRoot,
    ShardedIndex,
    current_versions,
    open_index,
    read_shards,
    shard_version,
)

from . import search
from .errors import NotReadyError, ServiceError
from .metrics import Metrics
from .processes import SearchProcesses, WorkerConfig
from .search import SearchOptions
from .settings import Settings
from .sharing import IdleWorkers
from .startup import serving_line

logger = logging.getLogger("service")


@dataclass(frozen=True, eq=False)
class IndexState:
    """One open index version. Immutable but for the count of requests using it."""

    index: GalleryIndex | ShardedIndex
    version: str  # the manifest's version
    key: str  # the name ``current`` points at ("" for an index directory served without a root)
    loaded_at: float
    directory: Path | None = None  # where it was opened from (what search processes open)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one SQLite connection, shared by threads
    users: list[int] = field(default_factory=lambda: [0])  # requests holding this state
    users_lock: threading.Lock = field(default_factory=threading.Lock)


def adopt_text_precision(model, precision: str, wide_threads: int = 0) -> str:
    """Run ``model``'s query encoder in ``precision`` (``HAT_TEXT_PRECISION``; ``auto`` measures, on CPU only),
    with a wide session of ``wide_threads`` threads where the encoder has one (``HAT_WIDE_ENCODE``); log what was
    measured and chosen; return the precision in use (``onnx (2 threads while the other workers are idle)`` when a
    wide session was kept)."""
    from model import use_text_precision

    if model.device.type != "cpu":
        return "float32"
    started = time.perf_counter()
    choice = use_text_precision(model, precision, wide_threads)
    if precision == "auto" or choice.wide_ms is not None:  # what was timed, and what it decided
        logger.info("%s (set up in %.1f s)", choice.describe(), time.perf_counter() - started)
    wide = f" ({choice.wide_threads} threads while the other workers are idle)" if choice.wide_threads else ""
    return choice.chosen + wide


class Engine:
    """Holds the model, the current ``IndexState`` and the server's search options; loads, polls and swaps."""

    def __init__(self, settings: Settings, metrics: Metrics, model=None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.idle_workers = IdleWorkers(settings.workers)  # searches running; idle workers' cores lent to them
        self.search_options = SearchOptions.from_settings(settings, self.idle_workers)  # the same for every request
        self.model = model
        self.text_precision: str | None = None  # what the query encoder runs in, when this engine loaded it
        self.model_error: str | None = None
        self.processes: SearchProcesses | None = None  # HAT_PROCESSES > 0: the searches' worker processes
        self.processes_error: str | None = None
        self.state: IndexState | None = None
        self.index_error: str | None = None
        self.refused: dict[str, str] = {}  # version name -> why it was refused
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._retiring: set[IndexState] = set()

    # ------------------------------------------------------------------------------------------ status

    def not_ready_reason(self) -> str | None:
        """None when searches can be answered, else why not."""
        if self.model_error:
            return f"the model failed to load: {self.model_error}"
        if self.model is None:
            return f"loading the model {self.settings.model}"
        if self.processes_error:
            return f"the search processes failed to start: {self.processes_error}"
        if self.settings.processes and self.processes is None:
            return f"starting {self.settings.processes} search process{'es' if self.settings.processes > 1 else ''}"
        if self.state is not None:
            return None
        if not self.settings.index_root:
            return "HAT_INDEX_ROOT is not set: no index to search"
        return f"no index loaded: {self.index_error or 'loading'}"

    def shard_status(self) -> list[dict[str, Any]] | None:
        """Per-shard readiness where shards are served by other processes (``service.cluster``); None here."""
        return None

    @contextmanager
    def lease(self) -> Iterator[tuple[Any, IndexState]]:
        """The model and the state of this moment, held for one request (raises ``NotReadyError``)."""
        state, model = self.state, self.model
        reason = self.not_ready_reason()
        if state is None or model is None or reason:
            raise NotReadyError(reason or "not ready")
        with state.users_lock:
            state.users[0] += 1
        try:
            yield model, state
        finally:
            with state.users_lock:
                state.users[0] -= 1

    def run_batch(self, searches: str, requests: list[tuple]) -> list[tuple[dict, str] | Exception]:
        """A batch of searches on one lease, run in a worker thread by a batcher: ``searches`` names the batch
        function of service/search.py (``search_texts``, ``search_images``); each outcome is ``(result, index
        version)`` or the exception that request failed with."""
        try:
            with self.lease() as (model, state), self.idle_workers.search():
                if self.processes is not None:
                    outcomes = self.processes.run(searches, state.key, state.directory, requests)
                else:
                    outcomes = getattr(search, searches)(model, state, requests, self.search_options)
        except NotReadyError as exc:
            return [exc] * len(requests)
        return [o if isinstance(o, Exception) else (o, state.version) for o in outcomes]

    # ------------------------------------------------------------------------------------------ start/stop

    async def start(self) -> None:
        """Start loading in the background (the server answers /healthz and /readyz meanwhile)."""
        self._spawn(self._boot(), "hat-boot")

    def _spawn(self, coro, name: str) -> None:
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        states = {s for s in (self.state, *self._retiring) if s is not None}
        self.state = None
        self.idle_workers.close()
        if self.processes is not None:
            processes, self.processes = self.processes, None
            await anyio.to_thread.run_sync(processes.close)
        for state in states:
            state.index.close()

    async def _boot(self) -> None:
        if self.model is None:
            try:
                self.model = await anyio.to_thread.run_sync(self._load_model, abandon_on_cancel=True)
            except Exception as exc:  # any failure is reported by /readyz; the process stays up to say so
                self.model_error = str(exc) or type(exc).__name__
                logger.error("model %s failed to load: %s", self.settings.model, self.model_error)
                return
        if self.settings.processes:
            try:
                await anyio.to_thread.run_sync(self._start_processes, abandon_on_cancel=True)
            except Exception as exc:  # reported by /readyz, as a model that fails to load
                self.processes_error = str(exc) or type(exc).__name__
                logger.error("search processes failed to start: %s", self.processes_error)
                return
        if self.settings.index_root:
            # A failure is logged; /readyz says why, and the poller picks up the next published version.
            with contextlib.suppress(ServiceError):
                await self.check(force=True)
            if self.settings.reload_interval > 0:
                self._spawn(self._poll(), "hat-index-poll")
        state = self.state
        logger.info("%s", serving_line(self.settings, self.model, state and state.index, self.not_ready_reason(),
                                       text_precision=self.text_precision))  # fmt: skip

    def _load_model(self):
        from model import load_model

        device = self.settings.resolved_device()
        start = time.perf_counter()
        model = load_model(self.settings.model, device=device)
        logger.info(
            "model %s (%s) loaded on %s in %.1f s",
            self.settings.model,
            model.identity[:12],
            device,
            time.perf_counter() - start,
        )
        self.text_precision = adopt_text_precision(model, self.settings.text_precision, self.wide_threads())
        return model

    def _start_processes(self) -> None:
        import torch

        config = WorkerConfig(
            model=self.settings.model, identity=self.model.identity, text_precision=self.text_precision or "float32",
            threads=torch.get_num_threads(), rerank_dtype=self.settings.rerank_dtype,
            max_image_pixels=self.settings.max_image_pixels,
        )  # fmt: skip
        start = time.perf_counter()
        processes = SearchProcesses(config, self.settings.processes)
        processes.start()
        self.processes = processes
        logger.info("%d search processes started in %.1f s (pids %s)", processes.count, time.perf_counter() - start,
                    ", ".join(map(str, processes.pids)))  # fmt: skip

    def wide_threads(self) -> int:
        """Threads a query may encode on while the other search workers are idle: their threads and its own
        (``HAT_WIDE_ENCODE``); 0 when off or with one worker."""
        import torch

        if not self.settings.wide_encode or self.settings.workers < 2 or self.settings.processes:
            return 0
        return torch.get_num_threads() * self.settings.workers

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                await self.check()
            except ServiceError:
                pass  # already logged and counted; keep polling
            except Exception:  # a poller that dies would silently stop reloads
                logger.exception("index poll failed")

    # ------------------------------------------------------------------------------------------ reload

    def _target(self) -> tuple[str, Path] | None:
        """(key, directory) of what should be served now, or None when nothing is published. A sharded root's
        key names every shard's ``current``: a new version of any shard reopens the index."""
        sharded = read_shards(self.settings.index_root)
        if sharded is not None:
            versions = current_versions(self.settings.index_root)
            waiting = [f"{i:02d}" for i, v in enumerate(versions) if v is None]
            if waiting:
                where = f"{self.settings.index_root}: shard(s) {', '.join(waiting)}"
                raise IndexFormatError(f"{where}: nothing published yet")
            return shard_version(versions), Path(self.settings.index_root)
        root = IndexRoot(self.settings.index_root)
        name = root.current_version()
        if name:
            return name, root.versions / name
        if (root.root / "manifest.json").is_file():  # a single version directory given as the root
            return "", root.root
        return None

    async def check(self, force: bool = False) -> dict[str, Any]:
        """Serve the version ``current`` points at, if it is not served already.

        ``force`` retries a version refused before. Returns ``{"changed", "version", "previous"}``; raises
        ``ServiceError`` (409) when the new version cannot be opened (the old one keeps serving).
        """
        async with self._reload_lock:
            old = self.state
            try:
                target = self._target()
                nothing = f"nothing published under {self.settings.index_root} (no 'current' version)"
            except IndexFormatError as exc:
                target, nothing = None, str(exc)
            if target is None:
                self.index_error = nothing
                if old is None:
                    raise ServiceError(409, "no_index", self.index_error)
                return {"changed": False, "version": old.version, "previous": old.version}
            key, directory = target
            if old is not None and old.key == key:
                return {"changed": False, "version": old.version, "previous": old.version}
            if key in self.refused and not force:
                return {"changed": False, "version": old.version if old else None, "previous": None}
            new = await anyio.to_thread.run_sync(self._open, key, directory)
            self.state = new  # the swap: one assignment; requests that started earlier keep `old`
            self.index_error = None
            self.metrics.reload("success")
            logger.info(
                "serving index version %s (%d images, %d captions)%s",
                new.version,
                new.index.num_images,
                new.index.num_captions,
                f", replacing {old.version}" if old else "",
            )
            if old is not None:
                self._retiring.add(old)
                self._spawn(self._retire(old), "hat-index-retire")
            return {"changed": True, "version": new.version, "previous": old.version if old else None}

    def _open(self, key: str, directory: Path) -> IndexState:
        try:
            gpu = self.model.device.type == "cuda"
            index = open_index(directory, expect_identity=self.model.identity, gpu=gpu)
        except Exception as exc:  # whatever is wrong with a new version, refuse it and keep the old one
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, IndexFormatError) else str(exc)
            self.refused[key] = reason
            if self.state is None:
                self.index_error = reason
            self.metrics.reload("refused")
            logger.error("index version %s refused: %s", key or directory, reason)
            raise ServiceError(409, "index_refused", f"index version {key or directory} refused: {reason}") from exc
        self.refused.pop(key, None)
        return IndexState(index=index, version=str(index.version), key=key, loaded_at=time.time(), directory=directory)

    async def _retire(self, state: IndexState) -> None:
        """Close a replaced index after the grace period, once no request holds it (at most 10 grace periods)."""
        await asyncio.sleep(self.settings.reload_grace)
        deadline = time.monotonic() + 10 * max(self.settings.reload_grace, 1.0)
        while state.users[0] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self._retiring.discard(state)
        with state.lock:
            state.index.close()
        logger.info("closed index version %s", state.version)
