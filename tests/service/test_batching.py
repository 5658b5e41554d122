"""Dynamic batching (service/batching.py): concurrent text queries share one encoder forward, and a query's
results do not depend on the batch it ran in."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import anyio
import pytest

from service.batching import Batcher


def _run(coro):
    return asyncio.run(coro)


def test_batches_are_bounded_and_a_failing_item_fails_alone():
    sizes = []

    def run(items):
        sizes.append(len(items))
        time.sleep(0.02)
        return [ValueError(f"bad {x}") if x == 3 else x * 10 for x in items]

    async def main():
        batcher = Batcher(run, max_batch=4, wait_ms=20, limiter=anyio.CapacityLimiter(1))
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)), return_exceptions=True)

    results = _run(main())
    assert sum(sizes) == 10 and max(sizes) <= 4 and sizes[0] == 4, sizes
    for i, outcome in enumerate(results):
        if i == 3:
            assert isinstance(outcome, ValueError) and str(outcome) == "bad 3"
            continue
        value, info = outcome
        assert value == i * 10 and 1 <= info.size <= 4 and 0 <= info.batch_wait_ms <= info.queue_ms


def test_a_query_alone_waits_at_most_the_wait_bound():
    def run(items):
        return items

    async def main(wait_ms):
        batcher = Batcher(run, max_batch=8, wait_ms=wait_ms, limiter=anyio.CapacityLimiter(2))
        started = time.perf_counter()
        value, info = await batcher.submit("x")
        return value, info, (time.perf_counter() - started) * 1000

    for wait_ms in (0, 30):
        value, info, elapsed_ms = _run(main(wait_ms))
        assert value == "x" and info.size == 1
        assert wait_ms <= elapsed_ms < wait_ms + 200 and info.batch_wait_ms <= wait_ms + 5, (wait_ms, elapsed_ms, info)


def test_items_arriving_while_every_worker_is_busy_join_the_next_batch():
    sizes, gate = [], threading.Event()

    def run(items):
        sizes.append(len(items))
        if len(sizes) == 1:
            gate.wait(5)  # the only worker stays busy while the others arrive
        return items

    async def main():
        batcher = Batcher(run, max_batch=16, wait_ms=0, limiter=anyio.CapacityLimiter(1))
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest)

    results = _run(main())
    assert [value for value, _ in results] == list(range(7))
    assert sizes == [1, 6], sizes


def test_the_batcher_counts_the_requests_it_holds():
    """``on_submit`` sees +1 per submitted item and -1 when its submit returns, failed and cancelled ones too; a
    batch running sees every request the batcher holds (the service's quiet rule for wide encoding)."""
    held, seen = [0], []

    def count(change):
        held[0] += change

    def run(items):
        seen.append((len(items), held[0]))
        time.sleep(0.05)
        return [ValueError("bad") if x == "bad" else x for x in items]

    async def main():
        batcher = Batcher(run, max_batch=2, wait_ms=0, limiter=anyio.CapacityLimiter(1), on_submit=count)
        await batcher.submit("alone")
        outcomes = await asyncio.gather(*(batcher.submit(x) for x in ("a", "bad", "c")), return_exceptions=True)
        assert isinstance(outcomes[1], ValueError) and held[0] == 0
        slow = asyncio.ensure_future(batcher.submit("gone"))  # a client that goes away
        await asyncio.sleep(0.01)
        assert held[0] == 1
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        assert held[0] == 0

    _run(main())
    assert seen[0] == (1, 1)  # a request alone: the batch is all there is
    assert seen[1][1] == 3 and seen[1][0] < 3  # three waiting, a batch of at most two: not alone
    assert held[0] == 0


def test_a_batcher_refuses_nonsense_bounds():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(lambda items: items, max_batch=0, wait_ms=1, limiter=anyio.CapacityLimiter(1))


# ------------------------------------------------------------------------------------------ on the server


@pytest.fixture(scope="module")
def servers(start_server, index_root):
    """The same index behind a server that batches (up to 8, gathering for 150 ms) and one that never does."""
    batched = start_server(index_root=str(index_root), max_batch=8, batch_wait_ms=150, workers=1)
    alone = start_server(index_root=str(index_root), max_batch=1, batch_wait_ms=0)
    batched.wait_ready()
    alone.wait_ready()
    return batched, alone


FAILS = "this query fails in its batch"


def _concurrently(request, n: int) -> None:
    """``request(i)`` for i < n, each in its own thread, all at once."""
    threads = [threading.Thread(target=request, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _batch_counts(server, search: str) -> tuple[float, float]:
    """(batches run, requests in them) from the server's ``hat_search_batch_size`` histogram."""
    with server.client() as c:
        metrics = c.get("/metrics").text
    count = re.search(rf'hat_search_batch_size_count\{{search="{search}"\}} (\S+)', metrics)
    total = re.search(rf'hat_search_batch_size_sum\{{search="{search}"\}} (\S+)', metrics)
    return float(count.group(1)), float(total.group(1))


def test_results_are_the_same_batched_or_alone(servers, world, monkeypatch):
    """Captions of different lengths (1 to 32+ tokens) in one batch, and one query that fails inside the batch
    (injected: the batch's search returns an error for it alone; nothing a client can send gets that far since
    the request model refuses queries with nothing to search): every other query gets what it gets alone."""
    from service import search
    from service.errors import ServiceError

    real = search.search_texts

    def one_fails(model, state, queries, options):
        outcomes = real(model, state, [("red" if q == FAILS else q, p) for q, p in queries], options)
        failed = ServiceError(422, "empty_query", "injected")
        return [failed if q == FAILS else o for (q, _), o in zip(queries, outcomes, strict=True)]

    monkeypatch.setattr(search, "search_texts", one_fails)
    batched, alone = servers
    captions = [c for item in world["items"].values() for c in item["captions"]]
    queries = ["red", captions[0], captions[7], " ".join(captions[1:4]), "a blue circle above a green square",
               FAILS, captions[12], "word " * 60]  # fmt: skip
    answers: dict[int, tuple[int, dict]] = {}

    def ask(i: int) -> None:
        with batched.client() as c:
            r = c.post("/search/text", json={"query": queries[i], "k": 10, "candidates": 40})
            answers[i] = (r.status_code, r.json())

    _concurrently(ask, len(queries))
    with alone.client() as c:
        for i, query in enumerate(queries):
            status, body = answers[i]
            if query == FAILS:
                assert status == 422 and body["error"]["message"] == "injected", body
                continue
            assert status == 200, body
            reference = c.post("/search/text", json={"query": query, "k": 10, "candidates": 40}).json()
            assert [h["id"] for h in body["results"]] == [h["id"] for h in reference["results"]], query
            for got, want in zip(body["results"], reference["results"], strict=True):
                assert got["score"] == pytest.approx(want["score"], abs=1e-5)
                assert got["first_stage_score"] == pytest.approx(want["first_stage_score"], abs=1e-5)
            assert reference["timings_ms"]["encode_share"] == reference["timings_ms"]["encode"]  # alone: size 1
    batches, total = _batch_counts(batched, "text")
    assert total == len(queries) and batches < total  # at least one batch held several queries


def test_image_uploads_batched_or_alone_and_a_bad_one_fails_alone(servers, world):
    """Uploads decoded one by one and encoded together: a corrupt upload in the batch gets its 4xx, the others
    the results they get alone (both targets)."""
    batched, alone = servers
    files = sorted((world["dir"] / "images").iterdir())[:6]
    uploads = [(f.name, f.read_bytes(), "captions" if i % 2 else "image") for i, f in enumerate(files)]
    uploads.insert(3, ("broken.png", files[0].read_bytes()[:300], "captions"))  # truncated: 422
    answers: dict[int, tuple[int, dict]] = {}

    def upload(i: int) -> None:
        name, data, target = uploads[i]
        with batched.client() as c:
            r = c.post("/search/image", files={"image": (name, data)}, data={"k": "5", "target": target})
            answers[i] = (r.status_code, r.json())

    _concurrently(upload, len(uploads))
    with alone.client() as c:
        for i, (name, data, target) in enumerate(uploads):
            status, body = answers[i]
            if name == "broken.png":
                assert status == 422 and body["error"]["code"] == "invalid_image", body
                continue
            assert status == 200, body
            reference = c.post("/search/image", files={"image": (name, data)}, data={"k": "5", "target": target})
            want = reference.json()["results"]
            assert [h["id"] for h in body["results"]] == [h["id"] for h in want], name
            assert [h["score"] for h in body["results"]] == pytest.approx([h["score"] for h in want], abs=1e-5)
    batches, total = _batch_counts(batched, "image")
    assert total == len(uploads) and batches < total
