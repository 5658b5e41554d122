"""``service.cluster.ClusterEngine`` without Ray: its fan-out, merge, retry, deadline and partial answers, with
stand-ins for the deployment handles that run the real per-shard code on a real sharded index (the Ray paths
themselves are tests/service/test_cluster.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from index_format import open_index
from service import search
from service.cluster import ClusterEngine
from service.cluster.engine import SHARD_ATTEMPTS
from service.errors import ServiceError
from service.metrics import Metrics
from service.search import SearchOptions, SearchParams
from service.settings import Settings


class _Call:
    """What ``handle.method.remote(...)`` returns: awaitable, cancellable."""

    def __init__(self, coro) -> None:
        self.coro = coro
        self.cancelled = False

    def __await__(self):
        return self.coro.__await__()

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.issued: list[_Call] = []

    def remote(self, *args):
        async def run():
            return await self.fn(*args)

        self.issued.append(_Call(run()))
        return self.issued[-1]


class _Shard:
    """A shard searcher stand-in: ``behaviour`` is "ok", "dead" (every call fails), "flaky" (the first call
    fails, as when a replica dies under it), "flakier" (the first three fail: the router picked the dead replica
    again), "hang" (never answers), "stuck" (the first call never answers, as when the router handed it to a
    replica as it died; later calls answer) or "blocking" (answers after holding the event loop for 0.4 s)."""

    def __init__(self, part, behaviour: str = "ok") -> None:
        self.part, self.behaviour, self.calls = part, behaviour, 0
        self.lock = threading.Lock()
        options = SearchOptions.from_settings(Settings())
        self.rank_images = _Method(self._wrap(lambda t, p: search.rank_images(part, self.lock, t, p, options, "cpu")))
        self.image_answers = _Method(self._wrap(lambda i, a: search.image_answers(part, self.lock, i, a, options,
                                                                                    "cpu")))  # fmt: skip

    def _wrap(self, fn):
        async def call(*args):
            self.calls += 1
            fails = {"dead": 10**9, "flaky": 1, "flakier": 3}.get(self.behaviour, 0)
            if self.calls <= fails:
                raise RuntimeError("replica died")
            if self.behaviour == "hang" or (self.behaviour == "stuck" and self.calls == 1):
                await asyncio.sleep(3600)
            if self.behaviour == "blocking":
                time.sleep(0.4)  # holds the caller's event loop, as a slow callback on it would
                return fn(*args)
            return await asyncio.to_thread(fn, *args)  # a replica works elsewhere, not on the caller's loop

        return call


class _Encoder:
    def __init__(self, model) -> None:
        async def texts(queries):
            return search.encode_texts(model, queries)

        async def images(uploads, max_pixels):
            return search.encode_images(model, uploads, max_pixels)

        async def spans(texts):
            return [model.tokenizer.spans(t) for t in texts]

        self.encode_texts, self.encode_images, self.spans = _Method(texts), _Method(images), _Method(spans)


@pytest.fixture(scope="module")
def sharded(sharded_root):
    index = open_index(sharded_root)
    yield index
    index.close()


def _engine(model, sharded, behaviours, **settings) -> ClusterEngine:
    shards = [_Shard(part, b) for part, b in zip(sharded.parts, behaviours, strict=True)]
    settings = {"shard_timeout": 1.0, "shard_hedge": 0.3} | settings
    return ClusterEngine(Settings(**settings), Metrics(), _Encoder(model), shards, "unused")


def _search(engine: ClusterEngine, queries: list[str]):
    params = SearchParams(k=5, candidates=10)
    return asyncio.run(engine._search("search_texts", [(q, params) for q in queries]))


def _local(model, sharded, queries):
    class State:
        index, lock = sharded, threading.Lock()

    params = SearchParams(k=5, candidates=10)
    return search.search_texts(model, State, [(q, params) for q in queries], SearchOptions.from_settings(Settings()))


def test_whole_answers_equal_the_local_ones(demo_model, sharded, world):
    queries = [world["items"][i]["captions"][0] for i in world["base_ids"][:4]] + ["\u200b"]
    engine = _engine(demo_model, sharded, ["stuck", "flaky", "flakier"])
    got = _search(engine, queries)  # retries and a hedged call hide the deaths
    assert [shard.calls for shard in engine.searchers] == [2, 2, 4]
    want = _local(demo_model, sharded, queries)
    for g, w in zip(got[:4], want[:4], strict=True):
        assert [r["id"] for r in g["results"]] == [r["id"] for r in w["results"]]
        assert [r["score"] for r in g["results"]] == [r["score"] for r in w["results"]]
        assert g["partial"] is False and g["missing_shards"] == [] and g["timings_ms"]["fan_out"] > 0
    assert isinstance(got[4], ServiceError) and got[4].code == "empty_query"


@pytest.mark.parametrize("behaviour", ["dead", "hang"])
def test_a_missing_shard_gives_flagged_partial_answers(demo_model, sharded, world, behaviour):
    query = world["items"][world["base_ids"][0]]["captions"][0]
    engine = _engine(demo_model, sharded, ["ok", behaviour, "ok"])
    started = time.monotonic()
    (got,) = _search(engine, [query])
    waited = time.monotonic() - started
    assert got["partial"] is True and got["missing_shards"] == [1]
    others = {m["id"] for p in (sharded.parts[0], sharded.parts[2]) for m in p.images(range(p.num_images))}
    assert got["results"] and {r["id"] for r in got["results"]} <= others
    # both get SHARD_ATTEMPTS calls: a failing shard its retries (left out well before the 1 s deadline), a
    # hanging one its hedged calls (at 0.3, 0.6 and 0.9 s), left out at the deadline and the calls cancelled
    assert engine.searchers[1].calls == SHARD_ATTEMPTS
    assert waited >= 1.0 if behaviour == "hang" else waited < 1.0
    assert [c.cancelled for c in engine.searchers[1].rank_images.issued] == [behaviour == "hang"] * SHARD_ATTEMPTS
    (refused,) = _search(_engine(demo_model, sharded, ["ok", behaviour, "ok"], partial_results=False), [query])
    assert isinstance(refused, ServiceError) and refused.status == 503 and refused.code == "shards_unavailable"


def test_hedges_keep_their_schedule_when_the_loop_is_held_up(demo_model, sharded, world):
    """Hedged calls are due at fixed times after the first call (0.3, 0.6, 0.9 s), not a hedge after the loop
    happened to wake: a loop held up for 0.4 s by another shard's answer still gets all of them in before the
    1 s deadline (counted from the late wake-up they would be at 0.4, 0.7 and 1.0 s, and the last one lost)."""
    query = world["items"][world["base_ids"][0]]["captions"][0]
    engine = _engine(demo_model, sharded, ["blocking", "hang", "ok"])
    (got,) = _search(engine, [query])
    assert got["partial"] is True and got["missing_shards"] == [1]
    assert engine.searchers[1].calls == SHARD_ATTEMPTS


def test_service_error_crosses_processes():
    import pickle

    err = pickle.loads(pickle.dumps(ServiceError(422, "invalid_query", "bad", [{"x": 1}])))
    assert (err.status, err.code, err.message, err.details) == (422, "invalid_query", "bad", [{"x": 1}])


def test_explained_captions_of_an_image_search_equal_the_local_ones(demo_model, sharded, world):
    """Image -> captions with ``explain``: the words of each explained caption come from the encoder's
    tokenizer, so the answer is the one ``python -m service`` gives."""
    data = Path(world["items"][world["base_ids"][3]]["image"]).read_bytes()
    params = SearchParams(k=3, candidates=10, explain=True)
    got = asyncio.run(_engine(demo_model, sharded, ["ok"] * 3)._search("search_images", [(data, "captions", params)]))

    class State:
        index, lock = sharded, threading.Lock()

    options = SearchOptions.from_settings(Settings())
    want = search.search_images(demo_model, State, [(data, "captions", params)], options)
    assert [r["id"] for r in got[0]["results"]] == [r["id"] for r in want[0]["results"]]
    for g, w in zip(got[0]["results"], want[0]["results"], strict=True):
        assert g["explain"] is not None and g["explain"] == w["explain"]
