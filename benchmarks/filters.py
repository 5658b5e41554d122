"""What metadata filters, match strength and explanations cost, in process (the service's own search functions on
an opened index, no HTTP).

    python benchmarks/filters.py prepare --out DIR [--images 10000]
    python benchmarks/filters.py run --index DIR/index --queries DIR/world/manifest.jsonl [--model models/demo]
    python benchmarks/filters.py maps [--rows 1000000]

``prepare``: a generated world of ``--images`` scenes, indexed with the demo model; every image's metadata is
``{"group": i % 100, "decile": i % 10, "half": i % 2, "tags": [...]}``, so ``{"group": 7}`` keeps 1% of the
gallery, ``{"decile": 3}`` 10% and ``{"half": 0}`` 50%.
``run``: text searches (k 10, 100 candidates, one at a time) without a filter, with each filter, and explained;
the median and 90th percentile of the search functions' total and their stages (the first search of each case,
which builds a filter key's map, apart); the response's size and the time to build and serialise it (pydantic,
as the route does). Indexes without the ``group`` key (e.g.
``benchmarks/service_load.py prepare-base``) run the unfiltered and explained cases only.
``maps``: for ``--rows`` items, the time of a filter's first use (its key's map built from metadata.sqlite) and
of the next, and the memory the maps take.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FILTERS = {"1%": {"group": 7}, "10%": {"decile": 3}, "50%": {"half": 0}, "1% of a list": {"tags": "g7"}}


def cmd_prepare(args: argparse.Namespace) -> None:
    world, index = args.out / "world", args.out / "index"
    py = [sys.executable, "-m"]
    subprocess.run([*py, "training.synthetic", "--out", str(world), "--seed", str(args.seed), "--train", "0",
                    "--val", "0", "--test", str(args.images)], cwd=REPO, check=True)  # fmt: skip
    lines = (world / "manifest.jsonl").read_text().splitlines()
    with open(args.out / "gallery.jsonl", "w") as fh:
        for i, line in enumerate(lines):
            item = json.loads(line)
            item["image"] = str((world / item["image"]).resolve())
            item["metadata"] = {"group": i % 100, "decile": i % 10, "half": i % 2, "tags": [f"g{i % 100}", "all"]}
            fh.write(json.dumps(item) + "\n")
    started = time.perf_counter()
    subprocess.run([*py, "index_builder", "build", "--gallery", str(args.out / "gallery.jsonl"), "--model",
                    str(args.model), "--out", str(index), "--workers", str(args.workers), "--allow-outside-root",
                    "--no-progress"], cwd=REPO, check=True)  # fmt: skip
    manifest = json.loads((index / "current" / "manifest.json").read_text())
    print(f"built in {time.perf_counter() - started:.0f} s; timings {manifest['timings']}")
    print(f"run it: python benchmarks/filters.py run --index {index} --queries {args.out / 'gallery.jsonl'}")


def _queries(path: Path, n: int) -> list[str]:
    texts = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            texts += json.loads(line).get("captions", [])[:1]
        elif line:
            texts.append(line)
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.choice(len(texts), min(n, len(texts)), replace=False)]


def _stats(samples: list[dict]) -> dict:
    out = {}
    for stage in samples[0]:
        values = sorted(s[stage] for s in samples if stage in s)
        out[stage] = (round(statistics.median(values), 2), round(values[int(0.9 * (len(values) - 1))], 2))
    return out


def cmd_run(args: argparse.Namespace) -> None:
    import threading

    import torch

    from index_format import open_index
    from model import load_model
    from service.schemas import TextSearchResponse
    from service.search import SearchOptions, SearchParams, search_texts
    from service.state import IndexState

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    started = time.perf_counter()
    index = open_index(args.index, expect_identity=model.identity)
    opened = time.perf_counter() - started
    print(f"{index.num_images} images, {index.num_captions} captions; opened in {opened * 1000:.0f} ms; "
          f"strength: {index.strength.method}")  # fmt: skip
    state = IndexState(index=index, version=index.version, key="", loaded_at=time.time(), lock=threading.Lock())
    options = SearchOptions(rerank_dtype=getattr(torch, args.dtype), max_image_pixels=89_478_485)
    queries = _queries(args.queries, args.rounds)
    cases: dict[str, dict] = {"no filter": {}}
    if "group" in index.filters.keys("images"):
        cases.update({f"filter {name}": {"filter": flt} for name, flt in FILTERS.items()})
    cases["explain"] = {"explain": True}
    for name, extra in cases.items():
        flt = extra.get("filter")
        checked = {k: (v,) for k, v in flt.items()} if flt else None
        params = SearchParams(k=args.k, candidates=args.candidates, filter=checked, explain=bool(extra.get("explain")))
        warm = search_texts(model, state, [(queries[0], params)], options)[0]["timings_ms"]  # the key's map built
        samples, sizes, serialise = [], [], []
        for query in queries:
            out = search_texts(model, state, [(query, params)], options)[0]
            samples.append(out["timings_ms"])
            started = time.perf_counter()
            body = TextSearchResponse(**out, index_version=index.version, query=query, k=args.k,
                                      candidates=args.candidates).model_dump_json(exclude_unset=True)  # fmt: skip
            serialise.append((time.perf_counter() - started) * 1000)
            sizes.append(len(body))
        matches = out.get("filter_matches")
        print(f"{name:>18}: (median, p90) ms {_stats(samples)}; response {statistics.median(sizes) / 1024:.1f} kB, "
              f"built+serialised {statistics.median(serialise):.2f} ms"
              + (f"; matches {matches}; first use of the key {warm['filter']:.1f} ms" if flt else ""))
    index.close()


def cmd_maps(args: argparse.Namespace) -> None:
    """The maps for ``--rows`` items with the prepare command's metadata (and a unique ``uid``), from a
    metadata.sqlite written as the builder writes it: each filter's first use (its key's map built) and the
    next (the map cached), for images and captions."""
    import resource

    from index_format.filters import GalleryFilters

    path = Path(args.tmp) / "maps.sqlite"
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE images (row INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, path TEXT, metadata TEXT)")
    db.execute("CREATE TABLE captions (row INTEGER PRIMARY KEY, id TEXT NOT NULL, image_id TEXT, text TEXT, "
               "metadata TEXT)")  # fmt: skip
    db.executemany("INSERT INTO images VALUES (?, ?, '', ?)", (
        (i, f"img-{i}", json.dumps({"group": i % 100, "decile": i % 10, "half": i % 2, "tags": [f"g{i % 100}", "all"],
                                    "uid": f"u{i}"}))
        for i in range(args.rows)))  # fmt: skip
    db.executemany("INSERT INTO captions VALUES (?, ?, ?, 'c', '{}')",
                   ((c, f"img-{c // 5}#{c % 5}", f"img-{c // 5}") for c in range(5 * args.rows)))  # fmt: skip
    db.execute("CREATE INDEX captions_image ON captions (image_id)")
    db.commit()
    db.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    filters = GalleryFilters(path, args.rows, 5 * args.rows)
    print(f"{args.rows} images, 5 captions each: opened in {(time.perf_counter() - started) * 1000:.1f} ms")
    cases = [*FILTERS.items(), ("unique uid", {"uid": "u123"})]
    for kind in ("images", "captions"):
        for name, flt in cases:
            checked = {k: (v,) for k, v in flt.items()}
            times = []
            for _ in range(2):
                started = time.perf_counter()
                rows = filters.rows(kind, checked)
                times.append((time.perf_counter() - started) * 1000)
            print(f"  {name:>14} {kind:>8}: {len(rows):>8} rows; first use {times[0]:8.1f} ms, then {times[1]:7.2f} ms")
    started = time.perf_counter()
    unknown = filters.unknown("images", {"colour": "red"})
    print(f"  unknown key {unknown}: {(time.perf_counter() - started) * 1000:.0f} ms; all keys listed in "
          f"{_timed(lambda: filters.keys('images')):.0f} ms")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss
    print(f"  peak resident memory grew {grown:.0f} MB with every map built")
    filters.close()
    path.unlink()


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


OPTIONS = {  # subcommand -> (help, [(flag, add_argument keywords)])
    "prepare": ("generated world with filterable metadata, indexed with the demo model", [
        ("--out", {"type": Path, "required": True}), ("--images", {"type": int, "default": 10_000}),
        ("--seed", {"type": int, "default": 1}), ("--workers", {"type": int, "default": 2}),
        ("--model", {"default": str(REPO / "models" / "demo")})]),
    "run": ("latency of filtered and explained text searches", [
        ("--index", {"type": Path, "required": True}),
        ("--queries", {"type": Path, "required": True, "help": "a gallery manifest (first captions) or a text file"}),
        ("--model", {"default": str(REPO / "models" / "demo")}), ("--rounds", {"type": int, "default": 50}),
        ("--k", {"type": int, "default": 10}), ("--candidates", {"type": int, "default": 100}),
        ("--dtype", {"default": "float32", "choices": ["float32", "bfloat16"]}),
        ("--threads", {"type": int, "default": max(1, min(2, os.cpu_count() or 1))})]),
    "maps": ("time and memory of the metadata maps for many items", [
        ("--rows", {"type": int, "default": 1_000_000}), ("--tmp", {"default": "/tmp"})]),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (text, options) in OPTIONS.items():
        command = sub.add_parser(name, help=text)
        for flag, keywords in options:
            command.add_argument(flag, **keywords)
    args = p.parse_args(argv)
    {"prepare": cmd_prepare, "run": cmd_run, "maps": cmd_maps}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
