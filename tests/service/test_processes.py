"""Search processes (``HAT_PROCESSES``): searches computed in worker processes answer exactly as the server's own
threads do, a worker that dies fails only its batch (a 503 naming it) and is replaced, index reloads reach the
workers, and a worker that cannot start keeps the service not ready with the reason."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from live_server import ClientThreads, publish_while_searching

from service import Settings
from service.settings import SettingsError

TEXT = {"query": "a blue square left of a red circle", "k": 5, "candidates": 20}


def _body(r) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    body.pop("timings_ms")
    return body


def _requests(world) -> list[tuple[str, dict]]:
    """Text queries of different lengths (with a filter and an explanation among them) and image uploads."""
    ids = world["base_ids"]
    out: list[tuple[str, dict]] = []
    for n, image_id in enumerate(ids[:6]):
        caption = world["items"][image_id]["captions"][n % 5]
        query = {"query": caption if n % 2 else caption.split(",")[0], "k": 5, "candidates": 20}
        if n == 2:
            query["explain"] = True
        if n == 4:
            query["filter"] = {"split": "test"}
        out.append(("text", query))
    for n, image_id in enumerate(ids[6:9]):
        data = {"k": "4", "candidates": "12", **({"target": "image"} if n == 1 else {})}
        out.append(("image", {"data": data, "path": world["items"][image_id]["image"]}))
    return out


def _send(client, kind: str, request: dict):
    if kind == "text":
        return client.post("/search/text", json=request)
    files = {"image": ("q.png", Path(request["path"]).read_bytes())}
    return client.post("/search/image", files=files, data=request["data"])


@pytest.fixture(scope="module")
def servers(start_server, index_root):
    """The same index served with threads and with 2 search processes, both with the float32 query encoder."""
    threads = start_server(index_root=str(index_root), text_precision="float32")
    processes = start_server(index_root=str(index_root), text_precision="float32", processes=2)
    threads.wait_ready(), processes.wait_ready(timeout=120)
    return threads, processes


def test_search_processes_answer_exactly_as_threads(servers, world):
    threads, processes = servers
    requests = _requests(world)
    with threads.client() as a, processes.client() as b:
        alone = [_body(_send(a, kind, req)) for kind, req in requests]
        assert [_body(_send(b, kind, req)) for kind, req in requests] == alone
        ready = b.get("/readyz").json()
        assert ready["ready"] is True, ready
    # All at once: batched in the workers, each answer still the one it gets alone.
    with ThreadPoolExecutor(len(requests)) as pool:
        def one(i):
            with processes.client() as c:
                return _body(_send(c, *requests[i]))

        together = list(pool.map(one, range(len(requests))))
    # As with threads (tests/service/test_batching.py): the same ids in the same order, scores within 1e-5 (a
    # batch pads its captions to the longest).
    for got, want in zip(together, alone, strict=True):
        assert [h["id"] for h in got["results"]] == [h["id"] for h in want["results"]]
        for a, b in zip(got["results"], want["results"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["first_stage_score"] == pytest.approx(b["first_stage_score"], abs=1e-5)
            assert ("explanation" in a) == ("explanation" in b)
    pids = processes.app.state.engine.processes.pids
    assert len(pids) == 2 and os.getpid() not in pids


def test_a_bad_request_through_a_process_is_its_own_4xx(servers):
    _, processes = servers
    with processes.client() as c:
        r = c.post("/search/text", json={"query": "   ", "k": 3})
        assert r.status_code == 422 and r.json()["error"]["code"] in {"empty_query", "validation_error"}, r.text
        r = c.post("/search/image", files={"image": ("q.png", b"not an image")}, data={"k": "3"})
        assert r.status_code in {400, 415, 422} and "image" in r.json()["error"]["message"].lower(), r.text
        assert c.post("/search/text", json=TEXT).status_code == 200


def test_a_dead_search_process_fails_only_its_batch_and_is_replaced(servers):
    _, processes = servers
    pool = processes.app.state.engine.processes
    before = pool.pids
    os.kill(before[0], signal.SIGKILL)
    time.sleep(0.2)
    with processes.client() as c:
        codes = [c.post("/search/text", json=TEXT) for _ in range(2)]  # one of them meets the dead process
        assert sorted(r.status_code for r in codes) == [200, 503], [r.text for r in codes]
        failed = next(r for r in codes if r.status_code == 503).json()["error"]
        assert failed["code"] == "search_process_failed" and "died" in failed["message"], failed
        deadline = time.monotonic() + 60
        while len(pool.pids) < 2:
            assert time.monotonic() < deadline, "the dead search process was not replaced"
            time.sleep(0.1)
        assert before[0] not in pool.pids and before[1] in pool.pids and pool.replaced == 1
        assert all(c.post("/search/text", json=TEXT).status_code == 200 for _ in range(6))
        assert 'hat_http_errors_total{code="search_process_failed",route="/search/text"} 1.0' in c.get("/metrics").text


def test_a_batch_waits_a_bounded_time_for_a_free_process(monkeypatch, index_root, demo_model, world):
    """With every process dead and none coming back, a batch gets a 503 after ``FREE_TIMEOUT``, not a hang."""
    from service import processes as module

    config = module.WorkerConfig(model=str(world["model"]), identity=demo_model.identity, text_precision="float32",
                                 threads=1, rerank_dtype="float32", max_image_pixels=1_000_000)  # fmt: skip
    pool = module.SearchProcesses(config, 1)
    pool.start()
    try:
        gone = pool.run("search_texts", "v-gone", index_root / "versions" / "v-gone", [(TEXT["query"], None)])
        assert gone[0].status == 503 and "could not open index version v-gone" in gone[0].message, gone
        monkeypatch.setattr(module, "FREE_TIMEOUT", 0.5)
        monkeypatch.setattr(pool, "_restart", lambda: None)  # the replacement never comes
        os.kill(pool.pids[0], signal.SIGKILL)
        time.sleep(0.2)
        directory = index_root / "current"
        request = [(TEXT["query"], None)]
        died = pool.run("search_texts", "k", directory, request)
        assert died[0].status == 503 and "died" in died[0].message, died
        start = time.monotonic()
        waited = pool.run("search_texts", "k", directory, request)
        assert waited[0].status == 503 and "no search process became free within 0.5 s" in waited[0].message
        assert 0.4 < time.monotonic() - start < 10 and pool.pids == []
    finally:
        pool.close()


def test_a_search_process_that_cannot_start_keeps_the_service_not_ready(start_server, index_root, tmp_path):
    live = start_server(index_root=str(index_root), processes=1, model=str(tmp_path / "no-model"))
    deadline = time.monotonic() + 120
    with live.client() as c:
        while True:
            r = c.get("/readyz")
            reason = r.json().get("reason", "")
            if "failed to start" in reason or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 503 and "search processes failed to start" in reason and "no-model" in reason, reason
        r = c.post("/search/text", json=TEXT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text


def test_processes_are_for_the_cpu():
    with pytest.raises(SettingsError, match="HAT_PROCESSES"):
        Settings(processes=2, device="cuda")
    assert Settings(processes=2).search_slots == 2 and Settings(workers=3).search_slots == 3
    assert Settings(processes=2).torch_threads(2) == 1 and Settings(processes=2, threads=3).torch_threads(2) == 3


class _Load(ClientThreads):
    def __init__(self, url: str) -> None:
        self.url = url
        self.versions: list[str] = []
        super().__init__(2)

    def _run(self, n: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                r = c.post("/search/text", json=TEXT)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    self.versions.append(r.json()["index_version"])


@pytest.mark.slow  # runs the index builder
def test_a_reload_reaches_the_search_processes(start_server, index_root, world, run_builder):
    live = start_server(index_root=str(index_root), reload_interval=0.2, reload_grace=0.5, processes=2)
    first = live.wait_ready(timeout=120)["index_version"]
    with _Load(live.url) as load:
        publish_while_searching(live, load.versions, lambda: run_builder(
            "build", "--gallery", str(world["manifests"]["all"]), "--model", str(world["model"]),
            "--out", str(index_root), "--no-progress",
        ), timeout=60)  # fmt: skip
    assert not load.failures, load.failures[:5]
    second = live.wait_ready()["index_version"]
    assert second != first and load.versions[-1] == second and first in load.versions
    with live.client() as c:  # an image only the new version has is found through the workers
        caption = world["items"]["test_00043"]["captions"][0]
        ids = [r["id"] for r in c.post("/search/text", json={"query": caption, "k": 44}).json()["results"]]
        assert "test_00043" in ids
