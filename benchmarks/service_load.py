"""Search service latency and throughput over real HTTP on loopback, and the galleries to measure it on.

    python benchmarks/service_load.py run --url http://127.0.0.1:8000 --queries DIR/world/manifest.jsonl \\
        [--clients 8] [--duration 30 | --requests N] [--warmup 20] [--image-fraction 0.2 --image-dir DIR]
    python benchmarks/service_load.py serve --index DIR/index --model models/demo [--port P] [--env HAT_X=V]
        [load options as for run]
    python benchmarks/service_load.py prepare-demo --out DIR [--images 10000]
    python benchmarks/service_load.py prepare-base --out DIR [--images 10000] [--store pq:1]

``run`` drives a running service: ``--clients`` threads, each with one keep-alive httpx connection, send
``POST /search/text`` (``{"query", "k", "candidates"}``) and, for ``--image-fraction`` of the requests,
``POST /search/image`` (a PNG from ``--image-dir``), back to back, for ``--duration`` seconds or ``--requests``
requests after ``--warmup`` unmeasured ones. Queries and request kinds follow one seeded sequence. It reports
requests, errors (any non-200, or a transport error by its name), throughput, client-side latency
p50/p90/p99/max in ms and the mean of the server's own ``timings_ms`` per stage. The server's ``total`` leaves
out the wait for a search worker (HAT_WORKERS) and HTTP: client latency minus it is mostly queueing. The load
generator runs on the same machine and takes CPU from the server: its CPU seconds are printed.
``serve`` starts ``python -m service`` (HAT_RELOAD_INTERVAL=0), waits for ``/readyz``, runs the load, stops it;
it also samples the server's resident memory (VmRSS of its process and any below it, every 0.25 s) and reports
it after the warm-up, at the end, its peak and the growth in between.
``prepare-demo``: a generated world of ``--images`` test images and its index built with the demo model.
``prepare-base``: HAT-base sizes (Swin-B + bert-base, D = 768, random weights saved as DIR/model) with a
gallery index of random image token features (low-rank plus noise, fitted to what the random model produces
on a few images; encoding 10K images on CPU would take hours) and real text features of generated captions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CAPTIONS_PER_IMAGE = 5



@dataclass
class Sample:
    kind: str  # "text" or "image"
    status: int | str  # HTTP status, or the exception's name
    ms: float
    end: float  # perf_counter at the response
    timings: dict | None  # the server's timings_ms


class Plan:
    """The shared request sequence, the same for every run with the same seed: ``take`` -> (kind, payload)."""

    def __init__(self, queries: list[str], images: list[bytes], image_fraction: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.pools = {"text": self.rng.sample(queries, len(queries)), "image": images}
        self.fraction, self.lock, self.taken, self.used = image_fraction, threading.Lock(), 0, {"text": 0, "image": 0}

    def take(self, limit: float) -> tuple[str, str | bytes] | None:
        with self.lock:
            if self.taken >= limit:
                return None
            self.taken += 1
            kind = "image" if self.pools["image"] and self.rng.random() < self.fraction else "text"
            self.used[kind] += 1
            return kind, self.pools[kind][(self.used[kind] - 1) % len(self.pools[kind])]


def send(client: httpx.Client, kind: str, payload, args: argparse.Namespace) -> Sample:
    start = time.perf_counter()
    try:
        if kind == "text":
            r = client.post("/search/text", json={"query": payload, "k": args.k, "candidates": args.candidates})
        else:
            form = {"k": str(args.k), "candidates": str(args.candidates), "target": args.target}
            r = client.post("/search/image", files={"image": ("query.png", payload, "image/png")}, data=form)
    except httpx.HTTPError as exc:
        end = time.perf_counter()
        return Sample(kind, type(exc).__name__, (end - start) * 1000, end, None)
    end = time.perf_counter()
    timings = r.json().get("timings_ms") if r.status_code == 200 else None
    return Sample(kind, r.status_code, (end - start) * 1000, end, timings)


def new_client(url: str, timeout: float) -> httpx.Client:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)  # one keep-alive connection
    return httpx.Client(base_url=url, timeout=timeout, limits=limits, trust_env=False)


def client_loop(url: str, plan: Plan, barrier: threading.Barrier, clock: dict, out: list, args) -> None:
    with new_client(url, args.timeout) as client:
        try:
            client.get("/healthz")  # opens the connection before any timing
            while (job := plan.take(args.warmup)) is not None:
                send(client, *job, args)
        finally:
            barrier.wait()  # a client that failed still releases the others (the run then has fewer clients)
        limit = args.warmup + args.requests if args.requests else float("inf")
        while time.perf_counter() < clock["deadline"] and (job := plan.take(limit)) is not None:
            out.append(send(client, *job, args))


def run_load(url: str, args: argparse.Namespace) -> dict:
    """Runs the load phase against ``url``; returns the summary (also printed)."""
    plan = Plan(read_queries(args.queries), read_images(args.image_dir), args.image_fraction, args.seed)
    clock: dict = {}

    def started() -> None:  # the barrier's action: after the warm-up, once every client is waiting
        clock["start"] = time.perf_counter()
        clock["deadline"] = clock["start"] + (args.duration if not args.requests else float("inf"))
        clock["cpu"] = time.process_time()

    barrier = threading.Barrier(args.clients, action=started)
    outs: list[list[Sample]] = [[] for _ in range(args.clients)]
    threads = [threading.Thread(target=client_loop, args=(url, plan, barrier, clock, outs[i], args), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = [s for o in outs for s in o]
    wall = max((s.end for s in samples), default=clock["start"]) - clock["start"]
    # Throughput counts the responses within the window: with --duration, the requests still in flight when the
    # deadline passed are timed but not counted (fewer clients were busy after it); with --requests, every one.
    window = min(wall, clock["deadline"] - clock["start"])
    kinds = {"all": samples, "text": [s for s in samples if s.kind == "text"],
             "image": [s for s in samples if s.kind == "image"]}
    summary = {kind: summarize(part, clock["start"], window) for kind, part in kinds.items() if part or kind == "all"}
    summary["load"] = {"clients": args.clients, "window_s": round(window, 2), "wall_s": round(wall, 2),
                       "started_perf": clock["start"], "ended_perf": clock["start"] + wall,
                       "warmup": args.warmup, "k": args.k, "candidates": args.candidates,
                       "client_cpu_s": round(time.process_time() - clock["cpu"], 2)}
    print_summary(summary)
    return summary


def summarize(samples: list[Sample], start: float, window: float) -> dict:
    ms = np.array([s.ms for s in samples]) if samples else np.zeros(1)
    errors = Counter(str(s.status) for s in samples if s.status != 200)
    stages: dict[str, list[float]] = {}
    for s in samples:
        for stage, value in (s.timings or {}).items():
            stages.setdefault(stage, []).append(value)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "requests": len(samples),
        "errors": sum(errors.values()),
        "errors_by_status": dict(errors),
        "throughput_rps": round(sum(s.end - start <= window for s in samples) / window, 2) if window > 0 else 0.0,
        "latency_ms": {"p50": round(p50, 1), "p90": round(p90, 1), "p99": round(p99, 1),
                       "max": round(float(ms.max()), 1), "mean": round(float(ms.mean()), 1)},
        "server_timings_ms_mean": {k: round(float(np.mean(v)), 2) for k, v in stages.items()},
    }


def print_summary(summary: dict) -> None:
    load = summary["load"]
    print(f"\n{load['clients']} clients, {load['window_s']} s window ({load['wall_s']} s to the last response) after "
          f"{load['warmup']} warm-up requests; k={load['k']}, candidates={load['candidates']}; "
          f"load generator CPU {load['client_cpu_s']} s")
    print(f"{'':<6} {'requests':>8} {'errors':>6} {'req/s':>7} | {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} ms | "
          "server stage means (ms)")
    for kind in ("all", "text", "image"):
        if kind in summary:
            r, lat = summary[kind], summary[kind]["latency_ms"]
            stages = " ".join(f"{k}={v}" for k, v in r["server_timings_ms_mean"].items())
            print(f"{kind:<6} {r['requests']:8d} {r['errors']:6d} {r['throughput_rps']:7.2f} | {lat['p50']:7.1f} "
                  f"{lat['p90']:7.1f} {lat['p99']:7.1f} {lat['max']:7.1f} ms | {stages}")
            if r["errors"]:
                print(f"       errors by status: {r['errors_by_status']}")


def read_queries(path: Path) -> list[str]:
    """Captions of a builder manifest (JSONL with ``captions`` or ``text``), or one query per line."""
    lines = [x for x in map(str.strip, path.read_text().splitlines()) if x]
    rows = [json.loads(x) if x.startswith("{") else {"text": x} for x in lines]
    out = [q for row in rows for q in [*(row.get("captions") or []), row.get("text")] if q]
    if not out:
        raise SystemExit(f"{path}: no queries")
    return out


def read_images(folder: Path | None, limit: int = 200) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.png"))[:limit]] if folder else []


def describe(url: str) -> None:
    """The machine and what the server serves."""
    print(f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    with new_client(url, 30) as client:
        ready = client.get("/readyz")
        if ready.status_code != 200:
            raise SystemExit(f"{url} is not ready: {ready.text}")
        info = client.get("/index").json()
    print(f"server {url}: index {info['version']}: {info['images']} images, {info['captions']} captions, "
          f"store {info['manifest'].get('store')}, model {info['model_identity'][:12]}")



def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the service was not ready within {timeout} s")


class RssSampler:
    """The server's resident memory (VmRSS), sampled every ``every`` seconds in a thread: its process and every
    process under it (``HAT_PROCESSES``' search processes), summed."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every, self.samples = pid, every, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def read(self) -> tuple[float, float]:
        """(VmRSS, RssAnon) in MB: all resident pages, and those not backed by a file. The index's memory-mapped
        features count in VmRSS as queries touch them (the page cache, reclaimable); a leak shows in RssAnon."""
        rss = anon = 0.0
        for n, pid in enumerate(self.tree()):
            try:
                with open(f"/proc/{pid}/status") as fh:
                    kb = {line.split(":")[0]: int(line.split()[1]) for line in fh
                          if line.startswith(("VmRSS:", "RssAnon:"))}  # fmt: skip
            except OSError:
                if n == 0:
                    raise  # the server itself is gone
                continue  # a child that just exited
            rss, anon = rss + kb["VmRSS"] / 1024, anon + kb["RssAnon"] / 1024
        return rss, anon

    def tree(self) -> list[int]:
        """The server's pid, then its descendants' (from /proc/PID/task/TID/children)."""
        pids, i = [self.pid], 0
        while i < len(pids):
            try:
                tasks = os.listdir(f"/proc/{pids[i]}/task")
            except OSError:
                tasks = []
            for tid in tasks:
                try:
                    with open(f"/proc/{pids[i]}/task/{tid}/children") as fh:
                        pids += [int(c) for c in fh.read().split()]
                except OSError:
                    continue
            i += 1
        return pids

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.perf_counter(), *self.read()))
            except (OSError, KeyError):
                return
            self.stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def report(self, start: float, end: float) -> dict:
        """Resident memory over the measured phase (after the warm-up): first and last samples, peak, and two
        growths, each between medians of a tenth of the samples (single samples swing by several percent as the
        allocator takes and returns memory): ``growth_pct`` from the first tenth to the last, and
        ``settled_growth_pct`` from the middle tenth (45-55% of the phase) to the last, which leaves out the
        early ramp while the allocator's arenas reach their working size and keeps what a leak does: grow on.
        ``anon_*`` the same for the anonymous part (heap, tensors: where a leak would show)."""
        during = [s[1:] for s in self.samples if start <= s[0] <= end] or [s[1:] for s in self.samples[-1:]]
        tenth = max(1, len(during) // 10)
        middle = max(0, len(during) // 2 - tenth // 2)

        def growth(col: int, first: int = 0) -> float:
            head = float(np.median([s[col] for s in during[first : first + tenth]]))
            tail = float(np.median([s[col] for s in during[-tenth:]]))
            return round(100 * (tail - head) / head, 2)

        return {"after_warmup": round(during[0][0], 1), "end": round(during[-1][0], 1),
                "peak": round(max(s[0] for s in during), 1), "growth_pct": growth(0),
                "settled_growth_pct": growth(0, middle),
                "anon_after_warmup": round(during[0][1], 1), "anon_end": round(during[-1][1], 1),
                "anon_min": round(min(s[1] for s in during), 1), "anon_max": round(max(s[1] for s in during), 1),
                "anon_growth_pct": growth(1), "anon_settled_growth_pct": growth(1, middle),
                "anon_by_fifth": [round(during[min(len(during) - 1, i * (len(during) - 1) // 5)][1], 1)
                                  for i in range(6)],
                "anon_series": [round(s[1], 1) for s in during[:: max(1, len(during) // 100)]],
                "samples": len(during)}


def cmd_serve(args: argparse.Namespace) -> dict:
    from service.settings import Settings

    with socket.socket() as sock:  # a free port, unless one is given
        sock.bind(("127.0.0.1", args.port))
        port = sock.getsockname()[1]
    env = {**os.environ, "HAT_INDEX_ROOT": str(args.index), "HAT_MODEL": str(args.model), "HAT_PORT": str(port),
           "HAT_HOST": "127.0.0.1", "HAT_RELOAD_INTERVAL": "0"}
    env.update(dict(e.split("=", 1) for e in args.env))
    print(f"settings: {Settings.from_env(env)}")
    url = f"http://127.0.0.1:{port}"
    log = args.log or Path(f"/tmp/service_load-{port}.log")
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=REPO, stdout=fh, stderr=fh)
    print(f"server pid {proc.pid}, log {log}", flush=True)
    burner = None
    try:
        started = time.perf_counter()
        wait_ready(url, proc, args.ready_timeout)
        print(f"ready after {time.perf_counter() - started:.1f} s")
        describe(url)
        if args.busy_neighbour:  # one process spinning on a core for the whole load (warm-up included)
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            print(f"busy neighbour pid {burner.pid}", flush=True)
        with RssSampler(proc.pid) as rss:
            summary = run_load(url, args)
        summary["server_rss_mb"] = rss.report(summary["load"]["started_perf"], summary["load"]["ended_perf"])
        print(f"server resident memory (MB): {summary['server_rss_mb']}")
        return summary
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()



def cmd_prepare_demo(args: argparse.Namespace) -> None:
    world, index = args.out / "world", args.out / "index"
    py = [sys.executable, "-m"]
    subprocess.run([*py, "training.synthetic", "--out", str(world), "--seed", str(args.seed), "--train", "0",
                    "--val", "0", "--test", str(args.images)], cwd=REPO, check=True)
    subprocess.run([*py, "index_builder", "build", "--gallery", str(world / "manifest.jsonl"), "--model",
                    str(args.model), "--out", str(index), "--workers", str(args.workers)], cwd=REPO, check=True)
    print(f"serve it: python benchmarks/service_load.py serve --index {index} --model {args.model} "
          f"--queries {world / 'manifest.jsonl'} --image-dir {world / 'images'}")


def base_model(out: Path):
    """HAT-base with random weights (seed 0), saved in float16 and reloaded: the identity the server will see."""
    import torch

    from model import HATModel, HATTokenizer, load_model, save_model
    from training import paper_model_config

    torch.manual_seed(0)
    m = HATModel(paper_model_config()).eval()
    m.tokenizer = HATTokenizer()
    save_model(m, out, dtype="float16")
    return load_model(out)


def scenes(out: Path, n: int, seed: int) -> tuple[list[Path], list[str]]:
    """``n`` generated scene PNGs (query images, one doubles as every gallery item's file) and their captions."""
    from training.synthetic import BACKGROUNDS, captions, draw_scene, random_scene

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths, texts = [], []
    for i in range(n):
        scene = random_scene(rng)
        paths.append(out / f"q_{i:03d}.png")
        draw_scene(scene, 146, rng.choice(BACKGROUNDS)).save(paths[-1])
        texts += captions(rng, scene)
    return paths, texts


def calibrate(model, paths: list[Path], rank: int = 16) -> list[tuple]:
    """Per level: (mean token, low-rank factor [rank, D], noise std) of the model's image tokens on ``paths``."""
    import torch

    from model import load_image, preprocess_image

    with torch.inference_mode():
        pixels = torch.stack([preprocess_image(load_image(p), model.config.image.image_size) for p in paths])
        levels = model.encode_images(pixels)
    out = []
    for x in levels:
        flat = x.float().reshape(-1, x.shape[-1]).numpy()
        mu = flat.mean(0)
        _, s, vt = np.linalg.svd(flat - mu, full_matrices=False)
        factor = (s[:rank, None] / np.sqrt(len(flat))) * vt[:rank]
        noise = float(np.sqrt((s[rank:] ** 2).sum() / len(flat) / flat.shape[1]))
        norm = float(np.linalg.norm(flat, axis=1).mean())
        out.append((mu.astype(np.float32), factor.astype(np.float32), noise, norm))
    return out


def encode_pool(model, texts: list[str]) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Real text features of ``texts``: per caption, per level ``[L_i, D]`` float16; global ``[P, G]``."""
    import torch

    tokens, vectors = [], []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            levels, lengths = model.encode_text_strings(texts[start : start + 64])
            vectors.append(model.global_texts(levels, lengths).float().numpy())
            for b, n in enumerate(lengths.tolist()):
                tokens.append([x[b, :n].to(torch.float16).numpy() for x in levels])
    return tokens, np.concatenate(vectors)


def write_shard(out: Path, first: int, n: int, calib, pool, meta: dict, rng: np.random.Generator) -> Path:
    """One shard in the builder's format (see ``index_builder.encode.encode_shard``), committed by a rename."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for level, (mu, factor, noise, _) in enumerate(calib):
        tokens = meta["image_tokens"][level]
        arr = np.lib.format.open_memmap(tmp / f"image.l{level + 1}.npy", "w+", np.float16, (n, tokens, len(mu)))
        for b in range(0, n, 50):  # 50 images at a time bounds the float32 temporaries (~120 MB at level 1)
            rows = min(50, n - b) * tokens
            x = rng.standard_normal((rows, len(factor)), dtype=np.float32) @ factor
            x += noise * rng.standard_normal((rows, len(mu)), dtype=np.float32) + mu
            arr[b : b + rows // tokens] = x.reshape(-1, tokens, len(mu))
        arr.flush()
        del arr
    vectors = rng.standard_normal((n, meta["global_dim"]), dtype=np.float32)
    np.save(tmp / "image.global.npy", vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    texts, (tokens, pool_global) = meta["texts"], pool
    ids = [f"base_{i:06d}" for i in range(first, first + n)]
    per = CAPTIONS_PER_IMAGE
    picks = [(per * i + j) % len(texts) for i in range(first, first + n) for j in range(per)]
    for level in range(len(calib)):
        np.save(tmp / f"caption.l{level + 1}.npy", np.concatenate([tokens[p][level] for p in picks]))
    np.save(tmp / "caption.offsets.npy", np.concatenate([[0], np.cumsum([len(tokens[p][0]) for p in picks])]))
    np.save(tmp / "caption.global.npy", pool_global[picks])
    summary = {
        "items": [{"id": i, "path": meta["image_path"], "metadata": {}} for i in ids],
        "captions": [{"id": f"{ids[c // per]}#{c % per}", "image_id": ids[c // per], "text": texts[p], "metadata": {}}
                     for c, p in enumerate(picks)],
        "skipped": [],
    }
    (tmp / "shard.json").write_text(json.dumps(summary))
    os.rename(tmp, out)
    return out


def cmd_prepare_base(args: argparse.Namespace) -> None:
    from index_builder import (
        BuildOptions,
        IndexRoot,
        StoreSpec,
        gallery_rows,
        model_info,
        open_index,
        train_store,
        write_manifest,
        write_segment,
        write_version,
    )
    from index_format import DEFAULT_STORE

    started = time.perf_counter()
    model = base_model(args.out / "model")
    info = model_info(model)
    paths, texts = scenes(args.out / "queries", max(8, args.caption_pool // CAPTIONS_PER_IMAGE), args.seed)
    calib = calibrate(model, paths[:4])
    print(f"model {info['identity'][:12]} saved in {time.perf_counter() - started:.0f} s; token norm (model) per "
          f"level: {[round(c[3], 2) for c in calib]}", flush=True)
    pool = encode_pool(model, texts[: args.caption_pool])
    meta = {**info, "texts": texts[: args.caption_pool], "image_path": str(paths[0].resolve())}
    spec = StoreSpec.parse(args.store or DEFAULT_STORE)
    root, rng = IndexRoot(args.out / "index"), np.random.default_rng(args.seed)
    with root.lock():
        staging = root.staging / "synthetic-base"
        shutil.rmtree(staging, ignore_errors=True)
        shards = [write_shard(staging / f"shard-{s:05d}", first, min(args.chunk, args.images - first), calib, pool,
                              meta, rng) for s, first in enumerate(range(0, args.images, args.chunk))]
        fake = np.load(shards[0] / "image.l1.npy", mmap_mode="r")[:4].astype(np.float32)
        print(f"wrote {args.images} images in {len(shards)} shards at {time.perf_counter() - started:.0f} s; "
              f"token norm (generated) level 1: {np.linalg.norm(fake, axis=-1).mean():.2f}", flush=True)
        books = train_store(shards, spec, info["levels"], info["image_tokens"])
        segment = write_segment(root, shards, spec, info, books)
        seg = json.loads((root.segments / segment / "segment.json").read_text())
        manifest = write_manifest(info, args.out / "model", spec, BuildOptions(store=spec.label()), [], "build", None)
        manifest["synthetic"] = "random image token features: benchmarks/service_load.py prepare-base"
        rows = gallery_rows(0, seg["images"]), gallery_rows(0, seg["captions"])
        version = write_version(root, [segment], *rows, manifest, 3)
        shutil.rmtree(staging, ignore_errors=True)
    index = open_index(root.root, expect_identity=model.identity)
    size = sum(f.stat().st_size for f in (root.segments / segment).iterdir()) / 2**30
    print(f"published {version}: {index.num_images} images, {index.num_captions} captions, store {spec.label()}, "
          f"segment {size:.2f} GiB, {time.perf_counter() - started:.0f} s in all")
    index.close()
    (args.out / "queries.txt").write_text("\n".join(texts) + "\n")
    print(f"serve it: python benchmarks/service_load.py serve --index {root.root} --model {args.out / 'model'} "
          f"--queries {args.out / 'queries.txt'} --image-dir {args.out / 'queries'}")


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", type=Path, required=True, help="builder manifest (captions) or one query per line")
    p.add_argument("--image-dir", type=Path, help="PNG files for POST /search/image")
    p.add_argument("--image-fraction", type=float, default=0.0, help="share of image searches (needs --image-dir)")
    p.add_argument("--target", default="captions", choices=["captions", "image"])
    p.add_argument("--json", type=Path, help="write the summary here")
    for name, kind, default, text in (
        ("clients", int, 1, "concurrent clients, one connection each"),
        ("duration", float, 30.0, "seconds measured (unless --requests)"),
        ("requests", int, 0, "measure this many requests instead of a duration"),
        ("warmup", int, 20, "unmeasured requests first"),
        ("k", int, 10, "results per search"),
        ("candidates", int, 100, "first-stage candidates re-ranked"),
        ("seed", int, 0, "seed of the query order"),
        ("timeout", float, 120.0, "seconds per request"),
    ):
        p.add_argument(f"--{name}", type=kind, default=default, help=text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load a running service")
    run.add_argument("--url", required=True)
    serve = sub.add_parser("serve", help="start python -m service, load it, stop it")
    serve.add_argument("--index", type=Path, required=True)
    serve.add_argument("--model", default=str(REPO / "models" / "demo"))
    serve.add_argument("--port", type=int, default=0, help="default: a free port")
    serve.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (repeatable)")
    serve.add_argument("--ready-timeout", type=float, default=300.0)
    serve.add_argument("--log", type=Path, help="server log (default /tmp/service_load-PORT.log)")
    serve.add_argument("--busy-neighbour", action="store_true",
                       help="run one CPU-burning process beside the server during the load")
    for p in (run, serve):
        add_load_args(p)
    demo = sub.add_parser("prepare-demo", help="generated world + index with the demo model")
    demo.add_argument("--model", default=str(REPO / "models" / "demo"))
    demo.add_argument("--workers", type=int, default=2)
    base = sub.add_parser("prepare-base", help="HAT-base random model + random-feature gallery index")
    base.add_argument("--store", default=None, help="feature store (default: the builder's, DEFAULT_STORE)")
    base.add_argument("--chunk", type=int, default=500, help="images per shard")
    base.add_argument("--caption-pool", type=int, default=300, help="distinct encoded captions, reused cyclically")
    for p, seed in ((demo, 2), (base, 0)):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--images", type=int, default=10_000)
        p.add_argument("--seed", type=int, default=seed)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in ("prepare-demo", "prepare-base"):
        args.out.mkdir(parents=True, exist_ok=True)
        (cmd_prepare_demo if args.command == "prepare-demo" else cmd_prepare_base)(args)
        return 0
    if args.image_fraction > 0 and not args.image_dir:
        raise SystemExit("--image-fraction needs --image-dir")
    if args.command == "run":
        describe(args.url)
    summary = run_load(args.url, args) if args.command == "run" else cmd_serve(args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["all"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
