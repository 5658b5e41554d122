"""The ingress's engine: readiness and versions from the shard deployments, searches fanned out to them."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_format import shard_dir, shard_of, shard_version

from .. import search
from ..errors import NotReadyError, ServiceError
from ..metrics import Metrics
from ..settings import Settings
from ..state import Engine, IndexState

logger = logging.getLogger("service.cluster")

# Calls to one shard per search at most (retries after failures and hedges after HAT_SHARD_HEDGE), and the
# pauses before a retry.
SHARD_ATTEMPTS = 4
RETRY_PAUSES = (0.05, 0.15, 0.4)


@dataclass(frozen=True)
class RemoteModel:
    """What the ingress knows of the encoder deployment's model."""

    identity: str
    device: str
    image_size: int


class ClusterIndex:
    """The served index as the shard deployments report it: counts, versions, a manifest summary; image files'
    metadata is read from the owning shard's ``metadata.sqlite`` (the ingress serves the image files, so it sees
    the index and the gallery anyway)."""

    def __init__(self, root: Path, infos: list[dict]) -> None:
        self.root = root
        self.infos = infos
        self.parts = [None] * len(infos)  # searched remotely; one per shard
        self.version = shard_version(i["version"] for i in infos)
        self.model_identity = infos[0]["identity"]
        self.num_images = sum(i["images"] for i in infos)
        self.num_captions = sum(i["captions"] for i in infos)
        self.manifest = {
            "sharded": {"shards": len(infos)},
            "version": self.version,
            "model": infos[0]["model"],
            "store": infos[0]["store"],
            "counts": {"images": self.num_images, "captions": self.num_captions},
            "shards": [{k: i[k] for k in ("shard", "version", "images", "captions")} for i in infos],
        }
        self._db: dict[int, sqlite3.Connection] = {}

    def image_by_id(self, image_id: str) -> dict | None:
        shard = shard_of(image_id, len(self.infos)) if len(self.infos) > 1 else 0
        if shard not in self._db:
            base = shard_dir(self.root, shard) if len(self.infos) > 1 else self.root
            path = base / "versions" / self.infos[shard]["version"] / "metadata.sqlite"
            self._db[shard] = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        row = self._db[shard].execute("SELECT row, id, path, metadata FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            return None
        return {"row": row[0], "id": row[1], "path": row[2], "metadata": None}

    def close(self) -> None:
        for db in self._db.values():
            db.close()


class ClusterEngine(Engine):
    """An :class:`Engine` whose model and index live in Ray Serve deployments: the encoder and one searcher
    deployment per shard (handles given). The app around it is ``python -m service``'s own."""

    def __init__(self, settings: Settings, metrics: Metrics, encoder, searchers: list, root: str) -> None:
        super().__init__(settings, metrics, model=None)
        self.encoder = encoder
        self.searchers = searchers
        self.root = Path(root)
        self.shard_infos: list[dict | None] = [None] * len(searchers)
        self.loop: asyncio.AbstractEventLoop | None = None

    # ----------------------------------------------------------------------------------- status

    def shard_status(self) -> list[dict[str, Any]]:
        """Per shard: ready (a replica answered the last poll), its version and counts."""
        out = []
        for s, info in enumerate(self.shard_infos):
            entry: dict[str, Any] = {"shard": s, "ready": info is not None}
            if info is not None:
                entry.update(version=info["version"], images=info["images"], captions=info["captions"],
                             node=info.get("node"))
            out.append(entry)
        return out

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._spawn(self._boot(), "hat-cluster-boot")

    async def _boot(self) -> None:
        while self.model is None:
            try:
                info = await self.encoder.info.remote()
                self.model = RemoteModel(**info)
                logger.info("encoder ready: model %s on %s", self.model.identity[:12], self.model.device)
            except Exception as exc:  # replicas still starting, or failing: /readyz says so meanwhile
                self.model_error = None
                self.index_error = f"the encoder is not ready ({type(exc).__name__}: {exc})"
                await asyncio.sleep(1.0)
        while True:
            try:
                await self.check()
            except Exception:  # a poller that dies would stop reloads and readiness
                logger.exception("shard poll failed")
            await asyncio.sleep(max(self.settings.reload_interval, 0.2))

    async def _shard_info(self, s: int) -> dict | None:
        try:
            return await asyncio.wait_for(_awaited(self.searchers[s].info.remote()), self.settings.shard_timeout)
        except Exception as exc:  # no live replica, or a replica failing: the shard shows as not ready
            logger.debug("shard %02d: no answer (%s)", s, exc)
            return None

    async def check(self, force: bool = False) -> dict[str, Any]:
        """Ask every shard for its version; serve the new set when it changed (all shards known)."""
        infos = await asyncio.gather(*(self._shard_info(s) for s in range(len(self.searchers))))
        self.shard_infos = list(infos)
        old = self.state
        known = [
            info if info is not None else (old.index.infos[s] if old is not None else None)
            for s, info in enumerate(infos)
        ]
        waiting = [f"{s:02d}" for s, info in enumerate(known) if info is None or info.get("error")]
        if waiting:
            reasons = "; ".join(f"{s:02d}: {i['error']}" for s, i in enumerate(known) if i and i.get("error"))
            self.index_error = f"shard(s) {', '.join(waiting)} not ready" + (f" ({reasons})" if reasons else "")
            return {"changed": False, "version": old.version if old else None, "previous": None}
        wrong = [f"{s:02d}" for s, i in enumerate(known) if i["identity"] != self.model.identity]
        if wrong:
            self.index_error = f"shard(s) {', '.join(wrong)} were built by another model than the encoder's"
            return {"changed": False, "version": old.version if old else None, "previous": None}
        key = shard_version(i["version"] for i in known)
        if old is not None and old.key == key:
            return {"changed": False, "version": old.version, "previous": old.version}
        self.state = IndexState(index=ClusterIndex(self.root, known), version=key, key=key, loaded_at=time.time())
        self.index_error = None
        self.metrics.reload("success")
        logger.info("serving %d shards: %s", len(known), key)
        if old is not None:
            self._retiring.add(old)
            self._spawn(self._retire(old), "hat-index-retire")
        return {"changed": True, "version": key, "previous": old.version if old else None}

    # ----------------------------------------------------------------------------------- searching

    def run_batch(self, searches: str, requests: list[tuple]) -> list[tuple[dict, str] | Exception]:
        """Run in a batcher's worker thread: the fan-out runs on the replica's event loop (deployment handles
        belong to it) and this thread waits for it."""
        try:
            with self.lease() as (_, state):
                future = asyncio.run_coroutine_threadsafe(self._search(searches, requests), self.loop)
                outcomes = future.result()
        except NotReadyError as exc:
            return [exc] * len(requests)
        return [o if isinstance(o, Exception) else (o, state.version) for o in outcomes]

    async def _search(self, searches: str, requests: list[tuple]) -> list[dict | Exception]:
        started = time.perf_counter()
        if searches == "search_texts":
            features = await self.encoder.encode_texts.remote([query for query, _ in requests])
            if isinstance(features, Exception):
                return [features] * len(requests)
            asks: Any = [params for _, params in requests]
            method = "rank_images"
        else:
            features = await self.encoder.encode_images.remote([data for data, _, _ in requests],
                                                               self.settings.max_image_pixels)  # fmt: skip
            asks = [(target, params) for _, target, params in requests]
            method = "image_answers"
        encoded = time.perf_counter()
        per_part = await asyncio.gather(*(self._ask(s, method, features, asks) for s in range(len(self.searchers))))
        fan_out_ms = round((time.perf_counter() - encoded) * 1000.0, 3)
        if searches == "search_texts":
            outcomes = search.answer_texts(features, asks, per_part)
        else:
            outcomes = search.answer_images(features, asks, per_part, spans_of=await self._spans(per_part))
        missing = [s for s, answer in enumerate(per_part) if answer is None]
        if missing and not self.settings.partial_results:
            error = ServiceError(503, "shards_unavailable", f"shard(s) {', '.join(f'{s:02d}' for s in missing)} "
                                 "did not answer in time (HAT_PARTIAL_RESULTS=false)")  # fmt: skip
            return [o if isinstance(o, Exception) else error for o in outcomes]
        for outcome in outcomes:
            if isinstance(outcome, dict):
                timings = outcome["timings_ms"]
                timings["fan_out"] = fan_out_ms  # wall time of the shards' answers (they ran side by side)
                work = sum(v for k, v in timings.items() if k in ("decode", "encode"))
                timings["total"] = round(work + fan_out_ms, 3)
                outcome["partial"] = bool(missing)
                outcome["missing_shards"] = missing
        logger.debug("batch of %d in %.1f ms", len(requests), (time.perf_counter() - started) * 1000.0)
        return outcomes

    async def _spans(self, per_part: list) -> Any:
        """``spans_of`` for the explained captions among the shards' answers: their words' spans, from the
        encoder's tokenizer in one call (None when nothing is explained)."""
        texts = sorted({entry["text"] for answers in per_part if answers for answer in answers if answer
                        for entry in answer.entries if entry.get("explain") is not None})  # fmt: skip
        if not texts:
            return None
        table = dict(zip(texts, await self.encoder.spans.remote(texts), strict=True))
        return table.__getitem__

    async def _ask(self, s: int, method: str, features, asks) -> list | None:
        """Shard ``s``'s answers, or None when it has no live replica within ``HAT_SHARD_TIMEOUT``.

        A call to a replica that dies under it fails (``ActorDiedError``): it is sent again after a short pause
        (``RETRY_PAUSES``: the router may pick the dead replica again before it learns of the death). A call
        unanswered after ``HAT_SHARD_HEDGE`` seconds (a stalled replica) is sent once more while the first keeps
        running, and the first answer wins. At most ``SHARD_ATTEMPTS`` calls in all, all inside the deadline;
        the calls left over are cancelled. A shard whose every call fails is left out after about 0.6 s."""
        deadline = time.monotonic() + self.settings.shard_timeout
        pending: dict[asyncio.Task, Any] = {}
        calls, failures, next_call = 0, 0, time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    logger.warning("shard %02d: no answer to %s within %.1f s (%d calls)", s, method,
                                   self.settings.shard_timeout, calls)  # fmt: skip
                    return None
                if next_call is not None and now >= next_call and calls < SHARD_ATTEMPTS:
                    response = getattr(self.searchers[s], method).remote(features, asks)
                    pending[asyncio.ensure_future(_awaited(response))] = response
                    calls += 1
                    # the hedge is due a fixed time after this call was due, not after the loop woke up to send
                    # it: a loop held up by other work must not push every later hedge past the deadline
                    next_call = next_call + self.settings.shard_hedge if calls < SHARD_ATTEMPTS else None
                if not pending and next_call is None:
                    return None  # every call failed
                wake = min(deadline, next_call) if next_call is not None else deadline
                if not pending:  # a pause before a retry
                    await asyncio.sleep(max(wake - time.monotonic(), 0.0))
                    continue
                done, _ = await asyncio.wait(pending, timeout=max(wake - time.monotonic(), 0.0),
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                for task in done:
                    pending.pop(task)
                    if task.exception() is None:
                        return task.result()
                    failures += 1
                    logger.warning("shard %02d: %s failed (call %d of at most %d): %s", s, method, failures,
                                   SHARD_ATTEMPTS, task.exception())  # fmt: skip
                    if calls < SHARD_ATTEMPTS:  # again soon, not only at the hedge time
                        pause = RETRY_PAUSES[min(failures, len(RETRY_PAUSES)) - 1]
                        soon = time.monotonic() + pause
                        next_call = soon if next_call is None else min(next_call, soon)
        finally:
            for task, response in pending.items():
                response.cancel()
                task.cancel()
                task.add_done_callback(_retrieved)  # a cancelled call's error is expected, not news


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


async def _awaited(response):
    return await response
