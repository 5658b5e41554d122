"""Sharded serving, measured: agreement, latency and failures of ``python -m service.cluster``.

    python benchmarks/cluster.py prepare --out runs/cluster --images 3000      # world + unsharded + --shards 3
    python benchmarks/cluster.py run --dir runs/cluster --text 200 --image 50   # prints JSON figures

``run`` serves the unsharded index and the sharded root with ``python -m service``'s app (uvicorn threads in
this process), and the sharded root with ``service.cluster.deploy`` on a local Ray cluster (the code path of
``python -m service.cluster --ray local``), then:

* agreement: for every query, the sharded answers' scores at each rank are >= the unsharded ones (within
  1e-5), every returned id's score equals its HAT score in the unsharded index (re-ranked here directly), and
  top-1 agrees with the unsharded top-1;
* latency: one client, p50/p99 per path;
* failures: 8 clients for ``--load-seconds`` while a replica of shard 00 is killed 3 times (``--replicas 2``),
  then both replicas of shard 01 killed: failures, 5xx, partial answers and the time until answers are whole
  again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOL = 1e-5


def cmd_prepare(args) -> None:
    world = args.out / "world"
    py = [sys.executable, "-m"]
    subprocess.run([*py, "training.synthetic", "--out", str(world), "--seed", str(args.seed), "--train", "0",
                    "--val", "0", "--test", str(args.images)], cwd=REPO, check=True)  # fmt: skip
    for name, extra in (("plain", []), ("sharded", ["--shards", "3"])):
        started = time.perf_counter()
        subprocess.run([*py, "index_builder", "build", "--gallery", str(world / "manifest.jsonl"), "--model",
                        str(args.model), "--out", str(args.out / name), "--no-progress", *extra], cwd=REPO,
                       check=True)  # fmt: skip
        print(f"{name}: built in {time.perf_counter() - started:.1f} s", flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Uvicorn:
    """``python -m service``'s app on a loopback port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def text_search(client: httpx.Client, query: str, k: int, candidates: int) -> dict:
    r = client.post("/search/text", json={"query": query, "k": k, "candidates": candidates})
    r.raise_for_status()
    return r.json()


def image_search(client: httpx.Client, data: bytes, k: int, candidates: int) -> dict:
    r = client.post("/search/image", files={"image": data}, data={"k": str(k), "candidates": str(candidates)})
    r.raise_for_status()
    return r.json()


def direct_scores(model, index, kind: str, query, ids: list[str]) -> np.ndarray:
    """HAT scores of ``ids`` for ``query`` in the unsharded ``index``, re-ranked directly (no first stage)."""
    import torch

    from service.search import decode_image

    table = "images" if kind == "text" else "captions"
    rows = dict(index.db.execute(f"SELECT id, row FROM {table} WHERE id IN ({','.join('?' * len(ids))})", ids))
    picked = np.array([rows[i] for i in ids], dtype=np.int64)
    with torch.inference_mode():
        if kind == "text":
            levels, lengths = model.encode_text_strings([query])
            n = int(lengths[0])
            return index.rerank_images([t[:, :n] for t in levels], n, picked).numpy()
        pixels = decode_image(query, model.config.image.image_size, 89_478_485)
        return index.rerank_captions(model.encode_images(pixels), picked).numpy()


def agreement(urls: dict, model, plain_index, queries: list, k: int, candidates: int) -> dict:
    """Per path: queries whose rank-wise scores are >= the unsharded ones, whose scores are the ids' HAT scores,
    and whose top-1 is the unsharded top-1."""
    out = {}
    clients = {name: httpx.Client(base_url=url, timeout=120) for name, url in urls.items()}
    answers = {name: [] for name in urls}
    for kind, q in queries:
        for name, c in clients.items():
            body = text_search(c, q, k, candidates) if kind == "text" else image_search(c, q, k, candidates)
            answers[name].append(body)
    for name in urls:
        if name == "plain":
            continue
        ge = same = top1 = partial = 0
        worst = 0.0
        for (kind, q), mine, ref in zip(queries, answers[name], answers["plain"], strict=True):
            mine_scores = [r["score"] for r in mine["results"]]
            ref_scores = [r["score"] for r in ref["results"]]
            ge += all(a >= b - TOL for a, b in zip(mine_scores, ref_scores, strict=False))
            direct = direct_scores(model, plain_index, kind, q, [r["id"] for r in mine["results"]])
            err = float(np.max(np.abs(direct - np.array(mine_scores)))) if mine_scores else 0.0
            worst = max(worst, err)
            same += err <= TOL
            top1 += bool(mine["results"]) and mine["results"][0]["id"] == ref["results"][0]["id"]
            partial += bool(mine.get("partial"))
        n = len(queries)
        out[name] = {"queries": n, "scores_ge_unsharded": ge, "scores_are_hat_scores": same,
                     "max_score_error": worst, "top1_agrees": top1, "top1_agreement": round(top1 / n, 4),
                     "partial": partial}  # fmt: skip
    for c in clients.values():
        c.close()
    return out


def latency(url: str, queries: list[str], k: int, candidates: int) -> dict:
    with httpx.Client(base_url=url, timeout=120) as c:
        for q in queries[:5]:
            text_search(c, q, k, candidates)  # warm-up
        ms, fan_out = [], []
        for q in queries:
            t = time.perf_counter()
            body = text_search(c, q, k, candidates)
            ms.append((time.perf_counter() - t) * 1000.0)
            fan_out.append(body["timings_ms"].get("fan_out", 0.0))
    return {"queries": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "fan_out_p50_ms": round(float(np.median(fan_out)), 1)}


class Load:
    """``clients`` threads sending text searches until stopped; every answer recorded with its time."""

    def __init__(self, url: str, queries: list[str], clients: int) -> None:
        self.records: list[tuple[float, int, bool, list]] = []  # (time, status, partial, missing)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(url, queries, i), daemon=True) for i in range(clients)]

    def _run(self, url: str, queries: list[str], seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/search/text", json={"query": rng.choice(queries), "k": 10, "candidates": 100})
                    body = r.json() if r.status_code == 200 else {}
                    self.records.append((time.monotonic(), r.status_code, bool(body.get("partial")),
                                         body.get("missing_shards", [])))  # fmt: skip
                except httpx.HTTPError as exc:
                    self.records.append((time.monotonic(), -1, False, [str(exc)]))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)


def replicas(deployment: str) -> list:
    import ray

    # Serve names its replica actors SERVE_REPLICA::<app>#<deployment>#<id>; named actors are listed by the GCS
    # (ray.util.state would need the dashboard, which these clusters do not run).
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"::hat#{deployment}#" in a["name"]]  # fmt: skip
    alive = []
    for name in names:
        with contextlib.suppress(ValueError):  # gone since the listing
            alive.append(ray.get_actor(name, namespace="serve"))
    return alive


def wait_replicas(deployment: str, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(replicas(deployment)) < count and time.monotonic() < deadline:
        time.sleep(1)


def kill(deployment: str, how_many: int) -> int:
    import ray

    victims = replicas(deployment)[:how_many]
    for actor in victims:
        ray.kill(actor, no_restart=True)
    return len(victims)


def failures(url: str, queries: list[str], seconds: float, clients: int = 8) -> dict:
    """8 clients for ``seconds`` while one replica of shard-00 is killed 3 times; then both of shard-01."""
    out: dict = {}
    with Load(url, queries, clients) as load:
        start = time.monotonic()
        kills = []
        for _ in range(3):
            time.sleep(seconds / 4)
            wait_replicas("shard-00", 2)  # the replica killed before has been replaced
            kills.append((round(time.monotonic() - start, 1), kill("shard-00", 1)))
        time.sleep(max(0.0, seconds - (time.monotonic() - start)))
    recs = load.records
    out["replica_kills"] = {"seconds": seconds, "clients": clients, "kills_at_s": kills, "requests": len(recs),
                            "failed": sum(s != 200 for _, s, _, _ in recs),
                            "partial": sum(p for _, _, p, _ in recs),
                            "req_per_s": round(len(recs) / seconds, 1)}  # fmt: skip
    wait_replicas("shard-00", 2)
    wait_replicas("shard-01", 2)
    with Load(url, queries, clients) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        killed = kill("shard-01", 2)
        deadline = killed_at + 120
        whole_again = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            later = [r for r in load.records if r[0] > killed_at + 0.5]
            partial_seen = [r for r in later if r[2]]
            if partial_seen:
                tail = [r for r in later if r[0] > partial_seen[-1][0]]
                if len(tail) >= 20 and all(r[1] == 200 and not r[2] for r in tail):
                    whole_again = round(partial_seen[-1][0] - killed_at, 1)
                    break
        time.sleep(2)
    recs = [r for r in load.records if r[0] > killed_at]
    out["shard_down"] = {"killed_replicas": killed, "requests": len(recs),
                         "status_5xx": sum(500 <= s < 600 for _, s, _, _ in recs),
                         "errors": sum(s == -1 for _, s, _, _ in recs),
                         "partial": sum(p for _, _, p, _ in recs),
                         "missing_shards_seen": sorted({m for r in recs for m in r[3] if isinstance(m, int)}),
                         "whole_again_after_s": whole_again}  # fmt: skip
    return out


def cmd_run(args) -> None:
    import ray

    from index_format import open_index
    from model import load_model
    from service.app import create_app
    from service.cluster.deployments import deploy
    from service.settings import Settings

    world = args.dir / "world"
    data = json.loads((world / "dataset.json").read_text())["images"]
    rng = random.Random(args.seed)
    picked = rng.sample(data, args.text)
    texts = [rng.choice(im["sentences"])["raw"] for im in picked]
    images = [(world / "images" / im["filename"]).read_bytes() for im in rng.sample(data, args.image)]
    queries = [("text", t) for t in texts] + [("image", b) for b in images]
    model = load_model(args.model)
    common = {"model": str(args.model), "reload_interval": 0}
    servers = {
        "plain": Uvicorn(create_app(Settings(index_root=str(args.dir / "plain"), **common), model=model)),
        "sharded": Uvicorn(create_app(Settings(index_root=str(args.dir / "sharded"), **common), model=model)),
    }
    for s in servers.values():
        wait_ready(s.url)
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="WARNING")
    port = _port()
    started = time.perf_counter()
    deploy(Settings(index_root=str(args.dir / "sharded"), port=port, **common), 3, args.replicas)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    figures: dict = {"cluster_start_s": round(time.perf_counter() - started, 1)}
    urls = {name: s.url for name, s in servers.items()} | {"cluster": url}
    plain_index = open_index(args.dir / "plain")
    figures["agreement"] = agreement(urls, model, plain_index, queries, args.k, args.candidates)
    print(json.dumps(figures["agreement"]), flush=True)
    figures["latency"] = {name: latency(u, texts[: args.latency_queries], args.k, args.candidates)
                          for name, u in urls.items()}  # fmt: skip
    print(json.dumps(figures["latency"]), flush=True)
    if args.load_seconds > 0:
        figures["failures"] = failures(url, texts, args.load_seconds)
    print(json.dumps(figures, indent=1))
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    for s in servers.values():
        s.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="generate the world and build it unsharded and with --shards 3")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--images", type=int, default=3000)
    prep.add_argument("--seed", type=int, default=5)
    prep.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    run = sub.add_parser("run", help="agreement, latency and failure figures")
    run.add_argument("--dir", type=Path, required=True)
    run.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    run.add_argument("--text", type=int, default=200)
    run.add_argument("--image", type=int, default=50)
    run.add_argument("--k", type=int, default=10)
    run.add_argument("--candidates", type=int, default=100)
    run.add_argument("--replicas", type=int, default=2)
    run.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    run.add_argument("--latency-queries", type=int, default=100)
    run.add_argument("--load-seconds", type=float, default=60)
    run.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    {"prepare": cmd_prepare, "run": cmd_run}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
