"""Search processes (``HAT_PROCESSES``): each batch of searches runs in one of N worker processes instead of a
thread of the server's own process.

Why: a re-rank at the demo model's sizes is hundreds of small torch operations, and each holds Python's global
interpreter lock between them. Two search threads in one process (with the event loop as a third) then wait for
each other: measured on 2 cores, 100-candidate re-ranks ran 218-223 a second on two threads of one process and
319-336 a second in two processes (benchmarks/search_processes.py; docs/benchmarks.md, "Search processes"). A
process of its own per search takes the lock out of the way; the server's process keeps HTTP, validation,
batching, metrics and index reloads, so every endpoint, metric and reload behaves as with threads.

Each worker process loads the model itself (``HAT_MODEL``, checked to have the server's identity) with the query
encoder precision the server chose, so every process encodes alike, and opens index versions as the batches name
them (the directory the server's lease holds; the two most recent stay open). A batch is sent whole (a pickled
list of requests) and its outcomes come back whole: results, or the ``ServiceError`` one request failed with.
A process that dies mid-batch (killed, out of memory) fails only that batch, with a 503 naming what happened, and
is replaced in the background; the others keep serving.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .errors import ServiceError

logger = logging.getLogger("service")

OPEN_VERSIONS = 2  # index versions a worker keeps open (the serving one and the one it replaced)
START_TIMEOUT = 600.0  # seconds for a worker to load the model (HAT-base with the ONNX export: ~30 s here)
FREE_TIMEOUT = 30.0  # seconds a batch waits for a worker while dead ones are being replaced


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to answer searches as the server would."""

    model: str  # HAT_MODEL
    identity: str  # the server's model identity; a worker that loads another model refuses to start
    text_precision: str  # the query encoder precision the server runs (never "auto": every process alike)
    threads: int  # torch (and ONNX Runtime) threads of the worker
    rerank_dtype: str  # HAT_RERANK_DTYPE
    max_image_pixels: int


class _Worker:
    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self.conn.close()


class SearchProcesses:
    """``count`` worker processes; :meth:`run` hands a batch to a free one (blocking while all are busy)."""

    def __init__(self, config: WorkerConfig, count: int) -> None:
        if count < 1:
            raise ValueError(f"need at least one search process, got {count}")
        self.config = config
        self.count = count
        self._context = multiprocessing.get_context("spawn")  # no fork of a process with torch's threads running
        self._free: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self.replaced = 0  # workers that died and were replaced

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start every worker and wait until each has loaded the model (raises ``RuntimeError`` naming why one
        could not). Blocking: call it from a thread."""
        pending = [self._spawn() for _ in range(self.count)]
        try:
            for worker in pending:
                self._await_ready(worker)
        except BaseException:
            for worker in pending:
                worker.stop(timeout=1.0)
            raise
        for worker in pending:
            self._adopt(worker)

    def _spawn(self) -> _Worker:
        here, there = self._context.Pipe()
        process = self._context.Process(target=serve, args=(there, self.config), name="hat-search", daemon=True)
        process.start()
        there.close()
        return _Worker(process, here)

    def _await_ready(self, worker: _Worker) -> None:
        if not worker.conn.poll(START_TIMEOUT):
            raise RuntimeError(f"a search process did not start within {START_TIMEOUT:.0f} s")
        try:
            kind, detail = worker.conn.recv()
        except EOFError:
            code = worker.process.exitcode
            raise RuntimeError(f"a search process exited while starting (exit code {code})") from None
        if kind != "ready":
            raise RuntimeError(f"a search process could not start: {detail}")

    def _adopt(self, worker: _Worker) -> None:
        with self._lock:
            if self._closed:
                worker.stop(timeout=1.0)
                return
            self._all.append(worker)
        self._free.put(worker)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.stop()

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers serving now (for tests and the operator)."""
        with self._lock:
            return [w.process.pid for w in self._all if w.process.pid is not None]

    # ------------------------------------------------------------------------------------------ searching

    def run(self, searches: str, key: str, directory: Path, requests: list[tuple]) -> list[Any]:
        """The outcomes of ``search.<searches>`` for ``requests`` on the index version at ``directory`` (named
        ``key``), computed by a free worker process."""
        try:  # one is free at once but while a dead one is being replaced (the batchers' limiter counts them)
            worker = self._free.get(timeout=FREE_TIMEOUT)
        except queue.Empty:
            dead = self.count - len(self.pids)
            error = ServiceError(503, "search_process_failed", f"no search process became free within "
                                 f"{FREE_TIMEOUT:g} s ({dead} being replaced)")  # fmt: skip
            return [error] * len(requests)
        try:
            worker.conn.send((searches, key, str(directory), requests))
            outcomes = worker.conn.recv()
        except (EOFError, OSError) as exc:  # the process died under this batch
            self._replace(worker)
            code = worker.process.exitcode
            why = f"exit code {code}" if code is not None else type(exc).__name__
            error = ServiceError(503, "search_process_failed", f"the search process answering this request died "
                                 f"({why}); it is being replaced, try again")  # fmt: skip
            return [error] * len(requests)
        except BaseException:  # this batch's message failed to (un)pickle whole; the process itself is fine
            self._free.put(worker)
            raise
        self._free.put(worker)
        return outcomes

    def _replace(self, dead: _Worker) -> None:
        with self._lock:
            if dead in self._all:
                self._all.remove(dead)
            closed = self._closed
        dead.process.join(1.0)
        if dead.process.is_alive():
            dead.process.kill()
        dead.conn.close()
        if closed:
            return
        self.replaced += 1
        logger.error("search process %s died (exit code %s); starting another", dead.process.pid,
                     dead.process.exitcode)  # fmt: skip
        threading.Thread(target=self._restart, name="hat-search-restart", daemon=True).start()

    def _restart(self) -> None:
        delay = 1.0
        while True:
            with self._lock:
                if self._closed:
                    return
            worker = self._spawn()
            try:
                self._await_ready(worker)
            except RuntimeError as exc:
                worker.stop(timeout=1.0)
                logger.error("%s; retrying in %.0f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
                continue
            self._adopt(worker)
            logger.info("search process %s started", worker.process.pid)
            return


# ---------------------------------------------------------------------------------------------- the worker


def serve(conn: Connection, config: WorkerConfig) -> None:
    """A worker process's life: load the model, say ``ready`` (or why not), then answer batches until told to
    stop (``None``) or the server goes away."""
    try:
        model, options = _load(config)
    except BaseException as exc:  # the server reports it; nothing else to do here
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    states: OrderedDict[tuple[str, str], Any] = OrderedDict()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            break
        if message is None:
            break
        searches, key, directory, requests = message
        try:
            outcomes = _search(model, options, states, searches, key, directory, requests)
        except ServiceError as exc:
            outcomes = [exc] * len(requests)
        except Exception as exc:  # a bug: as in the server's own threads, the batch fails (a 500, logged there)
            traceback.print_exc()
            outcomes = [RuntimeError(f"search process: {type(exc).__name__}: {exc}")] * len(requests)
        try:
            conn.send(outcomes)
        except (OSError, ValueError):  # the server went away
            break
        except Exception as exc:  # an outcome that does not pickle (a bug): the batch fails, the process lives
            traceback.print_exc()
            conn.send([RuntimeError(f"search process: unpicklable outcome: {type(exc).__name__}: {exc}")]
                      * len(requests))  # fmt: skip
    for state in states.values():
        state.index.close()


def _load(config: WorkerConfig):
    import torch

    from model import load_model, use_text_precision

    from .search import DTYPES, SearchOptions

    torch.set_num_threads(config.threads)
    model = load_model(config.model, device="cpu")
    if model.identity != config.identity:
        raise RuntimeError(f"{config.model} is not the server's model (identity {model.identity[:12]}, the "
                           f"server's {config.identity[:12]})")  # fmt: skip
    use_text_precision(model, config.text_precision)
    options = SearchOptions(rerank_dtype=DTYPES[config.rerank_dtype], max_image_pixels=config.max_image_pixels)
    return model, options


def _search(model, options, states: OrderedDict, searches: str, key: str, directory: str, requests: list[tuple]):
    from index_format import open_index

    from . import search
    from .state import IndexState

    name = (key, directory)
    state = states.get(name)
    if state is None:
        try:
            index = open_index(Path(directory), expect_identity=model.identity)
        except Exception as exc:  # the server opened it: gone since (pruned), or unreadable here
            raise ServiceError(503, "search_process_failed", f"the search process could not open index version "
                               f"{key or directory}: {type(exc).__name__}: {exc}") from exc  # fmt: skip
        state = IndexState(index=index, version=str(index.version), key=key, loaded_at=time.time())
        states[name] = state
        while len(states) > OPEN_VERSIONS:
            _, old = states.popitem(last=False)
            old.index.close()
    states.move_to_end(name)
    return list(getattr(search, searches)(model, state, requests, options))
