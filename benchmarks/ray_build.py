"""The build on Ray against the one-process build: equality of the indexes, images/s, Ray's overhead.

    python benchmarks/ray_build.py --images 2000

Generates a gallery of ``--images`` scenes with five captions each (``training.synthetic``, cached under
``--work``), then runs ``python -m index_builder build`` on it, each run in its own process from a clean
root, the same shard size for all:

* ``one process``: the default single-process build (2 decoding workers, torch's default threads);
* ``ray 1 actor``: ``--ray local``, one encoder actor with as many torch threads as the one-process build
  (equal resources: the same cores encode, decoding tasks beside them);
* ``ray 2 actors``: two actors with one thread each (``--ray-actor-cpus 0.5`` so that two fit beside the
  decoding on a 2-core machine); ``ray 1 actor, 1 thread`` likewise alone.

Prints, per run: wall seconds of the command (Ray's start-up included), the encoding step's seconds from the
manifest, images/s of each, the overhead of Ray against one process on both, and the fields in which each
index differs from the one-process index (``index_format.compare``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from index_format import IndexRoot, compare

REPO = Path(__file__).resolve().parents[1]


def gallery(work: Path, n: int) -> Path:
    out = work / f"world-{n}"
    manifest = out / "manifest.jsonl"
    if manifest.exists():
        return manifest
    subprocess.run([sys.executable, "-m", "training.synthetic", "--out", str(out), "--seed", "21", "--train", "0",
                    "--val", "0", "--test", str(n)], check=True, cwd=REPO, capture_output=True)
    data = json.loads((out / "dataset.json").read_text())
    with open(manifest, "w") as fh:
        for im in data["images"]:
            fh.write(json.dumps({"id": im["filename"].rsplit(".", 1)[0], "image": f"images/{im['filename']}",
                                 "captions": [s["raw"] for s in im["sentences"]],
                                 "metadata": {"split": im.get("split", "test")}}) + "\n")
    return manifest


def run(manifest: Path, root: Path, extra: list[str], shard_size: int) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    cmd = [sys.executable, "-m", "index_builder", "build", "--gallery", str(manifest), "--model",
           str(REPO / "models" / "demo"), "--out", str(root), "--device", "cpu", "--shard-size", str(shard_size),
           "--no-progress", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest_json = json.loads((IndexRoot(root).current_dir() / "manifest.json").read_text())
    return {"wall_s": round(wall, 1), "encode_s": manifest_json["timings"]["encode_s"],
            "indexed": summary["indexed"], "engine": manifest_json.get("engine")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--work", default=str(REPO / "runs" / "ray-bench"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest = gallery(work, args.images)
    threads = str(torch.get_num_threads())
    runs = {
        "one process": [],
        "ray 1 actor": ["--ray", "local", "--ray-actors", "1", "--ray-threads", threads],
        "ray 2 actors": ["--ray", "local", "--ray-actors", "2", "--ray-actor-cpus", "0.5", "--ray-threads", "1"],
        "ray 1 actor, 1 thread": ["--ray", "local", "--ray-actors", "1", "--ray-threads", "1"],
    }
    results = {}
    for name, extra in runs.items():
        results[name] = run(manifest, work / name.replace(" ", "-").replace(",", ""), extra, args.shard_size)
        r = results[name]
        r["images_per_s_wall"] = round(r["indexed"] / r["wall_s"], 1)
        r["images_per_s_encode"] = round(r["indexed"] / r["encode_s"], 1)
        print(json.dumps({name: r}), flush=True)
    base = results["one process"]
    print(f"\n{args.images} images, shards of {args.shard_size}, torch threads {threads}")
    print("| run | wall s | encode s | images/s (wall) | images/s (encode) | overhead (wall / encode) | "
          "fields differing from one process |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        differ = [] if name == "one process" else compare(work / "one-process", work / name.replace(" ", "-")
                                                          .replace(",", ""))
        over = "" if name == "one process" else (
            f"{100 * (r['wall_s'] / base['wall_s'] - 1):+.1f}% / {100 * (r['encode_s'] / base['encode_s'] - 1):+.1f}%")
        print(f"| {name} | {r['wall_s']} | {r['encode_s']} | {r['images_per_s_wall']} | {r['images_per_s_encode']} | "
              f"{over} | {', '.join(differ) or 'none'} |")


if __name__ == "__main__":
    main()
