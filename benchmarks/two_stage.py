"""Retrieval quality of the two search stages: first stage alone, two-stage at several K, exhaustive HAT.

    python benchmarks/two_stage.py [--model models/demo] [--dataset data/world/dataset.json] \\
        [--images data/world/images] [--split test] [--store float16|pca:2] [--candidates 20,50,100,200] \\
        [--limit N] [--work DIR] [--json OUT]

Builds a real index of the split with ``index_builder.build`` (into ``--work`` or a temporary root), opens it
with ``index_builder.open_index`` and measures R@1/5/10 text->image (t2i) and image->text (i2t) for:

* ``first stage``: FAISS over the index's global vectors alone, ranking the whole gallery (k = gallery size);
* ``two-stage@K``: FAISS's K candidates re-ranked by the HAT score over the index's cached token features,
  through the reader's own ``search`` + ``rerank_images`` / ``rerank_captions`` (what the service runs; the
  re-ranked order is the service's: stable sort, ties keep the first-stage order). A ground truth that FAISS
  did not return counts as a miss at every cutoff; ``cand`` is how often it was among the K candidates;
* ``exhaustive``: ``training.evaluate`` over every image-caption pair with the float32 features (``hat``, and
  ``global`` for comparison with the FAISS first stage; ties count against the model there).

Query features (every caption's per-level tokens, lengths and global vector; every image's per-level tokens
and global vector) come from one ``training.evaluate.encode_split`` call and are reused for every K. Gallery rows
are mapped to split entries through the index's own ids (``index.images`` / ``index.captions``), not assumed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from index_builder import BuildOptions, build, open_index
from model import load_model
from training.data import read_karpathy
from training.evaluate import encode_split, evaluate_encoded

REPO = Path(__file__).resolve().parents[1]
KS = (1, 5, 10)
MISS = np.iinfo(np.int64).max  # rank of a ground truth that is not in the candidate list


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "demo"))
    parser.add_argument("--dataset", default=str(REPO / "data" / "world" / "dataset.json"))
    parser.add_argument("--images", default=str(REPO / "data" / "world" / "images"))
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--store", default="float16", help="feature store of the index: float16, int8, pca:2, ...")
    parser.add_argument("--candidates", default="20,50,100,200", help="comma-separated first-stage K values")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of the split (validation)")
    parser.add_argument("--rerank-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--workers", type=int, default=2, help="image decoding workers of the index build")
    parser.add_argument("--work", type=Path, help="build the index here and keep it (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)
    args.ks = sorted({int(k) for k in args.candidates.split(",") if k.strip()})
    if not args.ks or min(args.ks) < 1:
        parser.error("--candidates needs positive integers")
    return args


def build_index(entries, args: argparse.Namespace, work: Path):
    """Write the entries as a builder manifest (id = entry index), build and open the index."""
    manifest = work / "manifest.jsonl"
    with open(manifest, "w") as fh:
        for i, entry in enumerate(entries):
            fh.write(json.dumps({"id": str(i), "image": str(entry.path), "captions": list(entry.captions)}) + "\n")
    # our own manifest, pointing at the world's images elsewhere: trusted, so paths outside its folder are allowed
    options = BuildOptions(store=args.store, progress=False, workers=args.workers, allow_outside_root=True)
    result = build(manifest, args.model, work / "index", options)
    if result.skipped:
        print(f"warning: the builder skipped {len(result.skipped)} inputs: {result.skipped[:3]}", file=sys.stderr)
    return open_index(work / "index")


def row_maps(index, entries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(entry of each image row, entry of each caption row, image row of each entry or -1), checked by id."""
    image_entry = np.array([int(r["id"]) for r in index.images(range(index.num_images))], dtype=np.int64)
    caption_entry = np.empty(index.num_captions, dtype=np.int64)
    for row, cap in enumerate(index.captions(range(index.num_captions))):
        owner, _, number = cap["id"].partition("#")
        if cap["image_id"] != owner or cap["text"] != entries[int(owner)].captions[int(number)]:
            raise SystemExit(f"caption row {row} ({cap['id']!r}) does not match the split's captions")
        caption_entry[row] = int(owner)
    row_of_entry = np.full(len(entries), -1, dtype=np.int64)
    row_of_entry[image_entry] = np.arange(len(image_entry))
    in_order = bool(np.array_equal(image_entry, np.arange(len(entries)))) and bool(
        np.array_equal(caption_entry, np.repeat(np.arange(len(entries)), [len(e.captions) for e in entries]))
    )
    print(f"index rows: {index.num_images} images, {index.num_captions} captions; "
          f"{'manifest order' if in_order else 'NOT in manifest order (mapped by id)'}")
    return image_entry, caption_entry, row_of_entry


def recall(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 in percent from 0-based ranks (``MISS`` never counts)."""
    return {f"r{k}": round(100.0 * float(np.mean(ranks < k)), 2) for k in KS}


def first_hit(hits: np.ndarray) -> np.ndarray:
    """0-based position of the first True in each row of ``hits [Q, K]``; ``MISS`` where there is none."""
    return np.where(hits.any(axis=1), hits.argmax(axis=1), MISS)


def first_stage(index, enc, maps) -> dict:
    """FAISS alone over the whole gallery in both directions (k = gallery size)."""
    _, caption_entry, row_of_entry = maps
    owner = enc.owner.numpy()
    _, rows = index.search("images", enc.text_global.numpy(), index.num_images)
    t2i = first_hit(rows == row_of_entry[owner][:, None])
    _, rows = index.search("captions", enc.image_global.numpy(), index.num_captions)
    i2t = first_hit(caption_entry[rows] == np.arange(len(rows))[:, None])
    return {"i2t": recall(i2t), "t2i": recall(t2i)}


def rerank_ranks(rows: np.ndarray, hit: np.ndarray, scores: torch.Tensor) -> int:
    """Position of the first ground truth in the re-ranked candidates (service order), or ``MISS``."""
    order = np.argsort(-scores.numpy(), kind="stable")
    found = np.flatnonzero(hit[order])
    return int(found[0]) if len(found) else MISS


@torch.inference_mode()
def two_stage_t2i(index, enc, maps, k: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every caption as a query: FAISS top-k images, re-ranked -> (ranks, ground truth among candidates)."""
    _, _, row_of_entry = maps
    gt = row_of_entry[enc.owner.numpy()]
    _, rows = index.search("images", enc.text_global.numpy(), k)
    ranks = np.empty(len(rows), dtype=np.int64)
    for j in range(len(rows)):
        levels = [t[j : j + 1] for t in enc.text_levels]
        scores = index.rerank_images(levels, int(enc.lengths[j]), rows[j], dtype)
        ranks[j] = rerank_ranks(rows[j], rows[j] == gt[j], scores)
    return ranks, (rows == gt[:, None]).any(axis=1)


@torch.inference_mode()
def two_stage_i2t(index, enc, maps, k: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Every image as a query: FAISS top-k captions, re-ranked -> (ranks, any true caption among candidates)."""
    _, caption_entry, _ = maps
    _, rows = index.search("captions", enc.image_global.numpy(), k)
    ranks = np.empty(len(rows), dtype=np.int64)
    for i in range(len(rows)):
        levels = [x[i : i + 1] for x in enc.image_levels]
        scores = index.rerank_captions(levels, rows[i], dtype)
        ranks[i] = rerank_ranks(rows[i], caption_entry[rows[i]] == i, scores)
    return ranks, (caption_entry[rows] == np.arange(len(rows))[:, None]).any(axis=1)


def two_stage(index, enc, maps, ks: list[int], dtype: torch.dtype, timings: dict) -> dict:
    out = {}
    for k in ks:
        start = time.perf_counter()
        t2i, t2i_cand = two_stage_t2i(index, enc, maps, k, dtype)
        mid = time.perf_counter()
        i2t, i2t_cand = two_stage_i2t(index, enc, maps, k, dtype)
        end = time.perf_counter()
        out[k] = {
            "i2t": recall(i2t),
            "t2i": recall(t2i),
            "candidate_recall": {"i2t": round(100 * float(i2t_cand.mean()), 2),
                                 "t2i": round(100 * float(t2i_cand.mean()), 2)},
        }
        timings[f"two_stage@{k}"] = {"t2i_ms_per_query": round(1000 * (mid - start) / len(t2i), 3),
                                     "i2t_ms_per_query": round(1000 * (end - mid) / len(i2t), 3)}
        print(f"  two-stage@{k}: {end - start:.1f} s ({timings[f'two_stage@{k}']})", flush=True)
    return out


def with_rsum(r: dict) -> dict:
    return {**r, "rsum": round(sum(r["i2t"].values()) + sum(r["t2i"].values()), 2)}


def table(rows: dict[str, dict]) -> str:
    head = (f"{'':<24} | {'i2t R@1':>7} {'R@5':>6} {'R@10':>6} | {'t2i R@1':>7} {'R@5':>6} {'R@10':>6} | "
            f"{'RSUM':>7} | {'cand i2t':>8} {'t2i':>6}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cand = r.get("candidate_recall")
        tail = f"{cand['i2t']:8.2f} {cand['t2i']:6.2f}" if cand else f"{'':>8} {'':>6}"
        lines.append(
            f"{name:<24} | {r['i2t']['r1']:7.2f} {r['i2t']['r5']:6.2f} {r['i2t']['r10']:6.2f} | "
            f"{r['t2i']['r1']:7.2f} {r['t2i']['r5']:6.2f} {r['t2i']['r10']:6.2f} | {r['rsum']:7.2f} | {tail}"
        )
    return "\n".join(lines)


def measure(args: argparse.Namespace, work: Path) -> dict:
    entries = read_karpathy(args.dataset, args.images, args.split)
    entries = entries[: args.limit] if args.limit else entries
    timings: dict = {}
    start = time.perf_counter()
    index = build_index(entries, args, work)
    timings["build_s"] = round(time.perf_counter() - start, 1)
    print(f"built {index.version} ({args.store}) in {timings['build_s']} s", flush=True)
    maps = row_maps(index, entries)
    model = load_model(args.model)
    start = time.perf_counter()
    enc = encode_split(model, entries)
    timings["encode_split_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    first = with_rsum(first_stage(index, enc, maps))
    timings["first_stage_s"] = round(time.perf_counter() - start, 2)
    dtype = getattr(torch, args.rerank_dtype)
    two = {k: with_rsum(v) for k, v in two_stage(index, enc, maps, args.ks, dtype, timings).items()}
    start = time.perf_counter()
    exhaustive = evaluate_encoded(model, enc, "all", ("hat", "global"))
    timings["exhaustive_s"] = round(time.perf_counter() - start, 1)
    index.close()
    return {
        "config": {"model": args.model, "dataset": args.dataset, "split": args.split, "images": len(entries),
                   "captions": len(enc.owner), "store": args.store, "rerank_dtype": args.rerank_dtype,
                   "torch_threads": torch.get_num_threads()},
        "first_stage": first,
        "two_stage": two,
        "exhaustive": exhaustive,
        "timings": timings,
    }


def report(res: dict) -> None:
    cfg = res["config"]
    rows = {"first stage (FAISS, k=N)": res["first_stage"]}
    rows.update({f"two-stage @{k}": v for k, v in res["two_stage"].items()})
    rows["exhaustive HAT"] = res["exhaustive"]["hat"]
    rows["exhaustive global"] = res["exhaustive"]["global"]
    print(f"\n{cfg['split']} split: {cfg['images']} images / {cfg['captions']} captions, store {cfg['store']}, "
          f"re-rank {cfg['rerank_dtype']}; 'cand' = ground truth among the K candidates (%)")
    print(table(rows))
    at = res["two_stage"].get(100)
    if at is None:
        print("\n(two-stage@100 not measured: add 100 to --candidates for the difference to exhaustive)")
        return
    hat = res["exhaustive"]["hat"]
    res["delta_r1_two_stage100_vs_exhaustive"] = {
        d: round(at[d]["r1"] - hat[d]["r1"], 2) for d in ("t2i", "i2t")
    }
    delta = res["delta_r1_two_stage100_vs_exhaustive"]
    print(f"\ntwo-stage@100 minus exhaustive HAT, R@1: t2i {delta['t2i']:+.2f}, i2t {delta['i2t']:+.2f} points")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        res = measure(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="two-stage-") as tmp:
            res = measure(args, Path(tmp))
    report(res)
    print(f"timings: {json.dumps(res['timings'])}")
    if args.json:
        res["two_stage"] = {str(k): v for k, v in res["two_stage"].items()}
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
