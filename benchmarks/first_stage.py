"""The compressed first stage: recall@100 of compressed FAISS indices against the exact flat index.

    python benchmarks/first_stage.py vectors [--images 200000] [--caption-scenes 40000] [--queries 2000]
    python benchmarks/first_stage.py measure [--k 100] [--only images|captions]

``vectors``: real first-stage vectors of the demo model (``models/demo``) over a generated world (seed 7,
``training.synthetic.iter_world``): every scene drawn as ``training.synthetic.generate`` draws it, through the
model's eval transform, ``m.encode_images`` + ``m.global_images``; the five captions of the first
``--caption-scenes`` scenes through ``m.encode_text_strings`` + ``m.global_texts``. The last ``--queries`` scenes
are held out as queries: one caption each (text -> images, as ``/search/text`` runs) and the image itself
(image -> captions). Cached in chunks under ``runs/first_stage/`` (git-ignored); a run resumes from the chunks.

``measure``: for each gallery (images, captions), the exact ``IndexFlatIP`` top-k of the held-out queries of
the other modality is the truth; every candidate index is built on the same vectors and reports recall@k
(the share of the exact top k it returns; ties at the k-th exact score count as found), the index file's
bytes per vector, train and add seconds and search milliseconds per query (one batch of all queries).
The builder's own ``build_faiss`` is one of the candidates, so the table measures what the builder writes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CACHE = Path(os.environ.get("FIRST_STAGE_CACHE", REPO / "runs" / "first_stage"))  # where vectors are cached
SEED = 7
CHUNK = 10_000
CANVAS = 146  # what training.synthetic.generate draws


# ---------------------------------------------------------------------------------------------- vectors


def _scenes(total: int):
    from training.synthetic import iter_world

    return list(iter_world(SEED, {"bench": total}))


def _pixels(args) -> np.ndarray:
    """Worker: draw scenes and apply the model's eval transform -> ``[B, 3, S, S]`` float32."""
    import torch

    from model import preprocess_image
    from training.synthetic import draw_scene

    torch.set_num_threads(1)
    scenes, size = args
    return np.stack([preprocess_image(draw_scene(s, CANVAS, bg), size).numpy() for s, bg in scenes])


def make_vectors(args) -> None:
    import torch

    from model import load_model

    CACHE.mkdir(parents=True, exist_ok=True)
    m = load_model(REPO / "models" / "demo")
    size = m.config.image.image_size
    total = args.images + args.queries
    scenes = _scenes(total)
    held_out = scenes[args.images:]
    # Captions: every caption of the first --caption-scenes scenes (the gallery), one per held-out scene.
    rng = np.random.default_rng(SEED)
    texts = [c for _, _, _, _, caps in scenes[: args.caption_scenes] for c in caps]
    queries = [caps[int(rng.integers(len(caps)))] for _, _, _, _, caps in held_out]
    order = [(s, bg) for _, _, s, bg, _ in scenes[: args.images]] + [(s, bg) for _, _, s, bg, _ in held_out]
    with mp.get_context("spawn").Pool(args.workers) as pool:

        def encode(a: int, b: int) -> np.ndarray:
            batches = [(order[i : min(b, i + 64)], size) for i in range(a, b, 64)]
            out = []
            with torch.inference_mode():
                for px in pool.imap(_pixels, batches):
                    out.append(m.global_images(m.encode_images(torch.from_numpy(px))).numpy())
            return np.concatenate(out)

        _chunked("text_queries", len(queries), lambda a, b: _encode_texts(m, queries[a:b]))
        _chunked("image_queries", args.queries, lambda a, b: encode(args.images + a, args.images + b))
        _chunked("images", args.images, encode)
    _chunked("captions", len(texts), lambda a, b: _encode_texts(m, texts[a:b]))
    print(f"cached under {CACHE}")


def _encode_texts(m, strings: list[str]) -> np.ndarray:
    """Global vectors of ``strings`` in their order; encoded in batches of similar length (less padding; the
    attention mask makes a caption's vector independent of its batch)."""
    import torch

    order = np.argsort([len(s) for s in strings], kind="stable")
    out = np.empty((len(strings), m.config.global_dim or m.config.embed_dim), np.float32)
    with torch.inference_mode():
        for i in range(0, len(strings), 256):
            take = order[i : i + 256]
            levels, lengths = m.encode_text_strings([strings[j] for j in take])
            out[take] = m.global_texts(levels, lengths).numpy()
    return out


def _chunked(name: str, n: int, encode) -> None:
    """Encode ``[0, n)`` in chunks of CHUNK rows cached as ``CACHE/name.NNNN.npy``; then one ``name.npy``."""
    final = CACHE / f"{name}.npy"
    if final.exists() and len(np.load(final, mmap_mode="r")) == n:
        return
    parts = []
    for c, a in enumerate(range(0, n, CHUNK)):
        b = min(n, a + CHUNK)
        path = CACHE / f"{name}.{n}.{c:04d}.npy"
        if not path.exists():
            t0 = time.perf_counter()
            vec = encode(a, b).astype(np.float32)
            np.save(path.with_suffix(".tmp.npy"), vec)
            os.replace(path.with_suffix(".tmp.npy"), path)
            print(f"{name} {b}/{n}: {(b - a) / (time.perf_counter() - t0):.0f}/s", flush=True)
        parts.append(np.load(path))
    np.save(final, np.concatenate(parts))
    for c in range(len(parts)):
        (CACHE / f"{name}.{n}.{c:04d}.npy").unlink()


# ------------------------------------------------------------------------------------------------ measure


def _candidates(d: int) -> list[tuple[str, list[tuple[int, int]]]]:
    """(index description, [(nprobe, re-scoring factor), ...]) for ``d`` dimensions. IVF indices share one
    coarse quantizer (trained once); "builder" is ``build_faiss`` forced into its compressed tier."""
    return [
        ("Flat", [(32, 1), (64, 1)]),
        ("builder", [(32, 1), (32, 2), (32, 4), (32, 8), (16, 4), (64, 4)]),
        (f"PQ{d // 16}x8np", [(32, 1), (32, 4), (32, 8)]),
        ("SQ8", [(32, 1)]),
        (f"PQ{d // 4}x4fs", [(32, 1), (32, 4)]),
        (f"PQ{d // 4}x8np", [(32, 1), (32, 2), (32, 4)]),
        (f"OPQ{d // 8}", [(32, 1), (32, 4)]),
    ]


def _recall(base: np.ndarray, queries: np.ndarray, rows: np.ndarray, kth: np.ndarray, k: int) -> float:
    """Share of the exact top k found; a returned vector scoring at least the k-th exact score counts (ties)."""
    got = np.einsum("bkd,bd->bk", base[np.maximum(rows, 0)], queries)
    hits = ((got >= kth[:, None] - 1e-6) & (rows >= 0)).sum(axis=1)
    return float(np.minimum(hits, k).mean() / k)


def _train(key: str, base: np.ndarray, quantizer, nlist: int, sample: np.ndarray, args):
    """A trained and filled index for ``key`` and its (label, train s, add s)."""
    import faiss

    from index_builder.version import build_faiss

    d = base.shape[1]
    t0 = time.perf_counter()
    if key == "builder":
        index, info = build_faiss(base, exact_limit=args.exact_limit, compress_limit=args.exact_limit)
        return index, info["type"] + " (builder)", info["train_s"], info["add_s"]
    if key.startswith("OPQ"):  # its own coarse quantizer: the lists live in the rotated space
        m = int(key[3:])
        index = faiss.index_factory(d, f"OPQ{m},IVF{nlist},PQ{m}x8np", faiss.METRIC_INNER_PRODUCT)
        label = f"OPQ{m} + IVF{nlist}-PQ{m}x8"
    else:
        index = faiss.index_factory(d, f"IVF{nlist},{key}", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.quantizer = quantizer  # already trained: IVF training then skips the coarse k-means
        ivf.own_fields = False
        label = f"IVF{nlist}-{key.removesuffix('np')}"
    index.train(sample)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(base)
    return index, label, train_s, time.perf_counter() - t0


def measure(args) -> None:
    import faiss

    from index_builder.version import compressed_params
    from index_format.reader import rescore

    galleries = {"images": "text_queries", "captions": "image_queries"}  # gallery: queries of the other modality
    k = args.k
    for name, query_name in galleries.items():
        if args.only and name != args.only:
            continue
        base, queries = (np.load(CACHE / f"{x}.npy") for x in (name, query_name))
        base = base[: args.limit] if args.limit else base
        n, d = base.shape
        flat = faiss.IndexFlatIP(d)
        flat.add(base)
        t0 = time.perf_counter()
        truth_scores, truth = flat.search(queries, k)
        flat_ms = (time.perf_counter() - t0) * 1e3 / len(queries)
        kth = truth_scores[:, -1]
        p = compressed_params(n, d)
        sample = np.ascontiguousarray(base[np.sort(np.random.default_rng(0).choice(n, p["train"], replace=False))])
        t0 = time.perf_counter()
        quantizer = faiss.IndexFlatIP(d)
        faiss.Clustering(d, p["nlist"]).train(sample, quantizer)
        coarse_s = time.perf_counter() - t0
        print(f"\n## {name}: {n:,} x {d} gallery, {len(queries):,} held-out queries of the other modality; "
              f"truth: the flat index ({4 * d} B/vector, {flat_ms:.2f} ms/query); coarse quantizer ({p['nlist']} "
              f"lists, {len(sample):,} training vectors) trained once in {coarse_s:.1f} s and shared", flush=True)
        print(f"| index | nprobe | re-scored | recall@{k} | overlap@{k} | bytes/vector (file) | train s | add s "
              "| search ms/query |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key, settings in _candidates(d):
            if args.match and args.match not in key:
                continue
            index, label, train_s, add_s = _train(key, base, quantizer, p["nlist"], sample, args)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "x.faiss"
                faiss.write_index(index, str(path))
                size = path.stat().st_size
                del index
                # searched as the service searches: memory-mapped lists (fast-scan lists cannot be mapped)
                index = faiss.read_index(str(path), 0 if "fs" in key else faiss.IO_FLAG_MMAP)
                ivf = faiss.extract_index_ivf(index)
                for nprobe, factor in settings:
                    ivf.nprobe = nprobe
                    index.search(queries[:50], k * factor)  # warm the page cache
                    t0 = time.perf_counter()
                    _, rows = index.search(queries, k * factor)
                    if factor > 1:
                        _, rows = rescore(queries, rows, base[np.maximum(rows, 0)], k)
                    search_ms = (time.perf_counter() - t0) * 1e3 / len(queries)
                    recall = _recall(base, queries, rows, kth, k)
                    overlap = np.mean([len(set(r) & set(t)) / k for r, t in zip(rows, truth, strict=True)])
                    print(f"| {label} | {nprobe} | {f'x{factor}' if factor > 1 else 'no'} | {recall:.4f} | "
                          f"{overlap:.4f} | {size / n:,.1f} | {train_s:.1f} | {add_s:.1f} | {search_ms:.3f} |",
                          flush=True)
                del index, ivf


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vectors", help="generate and cache the demo model's vectors")
    v.add_argument("--images", type=int, default=200_000)
    v.add_argument("--caption-scenes", type=int, default=40_000, help="scenes whose 5 captions form the gallery")
    v.add_argument("--queries", type=int, default=2_000, help="held-out scenes (one caption and the image each)")
    v.add_argument("--workers", type=int, default=1, help="drawing processes (the model uses the main one)")
    m = sub.add_parser("measure", help="recall@k, bytes, times of the candidate indices")
    m.add_argument("--k", type=int, default=100)
    m.add_argument("--only", choices=("images", "captions"))
    m.add_argument("--limit", type=int, help="use the first N gallery vectors only")
    m.add_argument("--match", help="only candidates whose key contains this (Flat, SQ8, PQ, builder, OPQ)")
    m.add_argument("--exact-limit", type=int, default=1_000, help="the builder row: forced into its compressed tier")
    args = parser.parse_args(argv)
    if args.command == "vectors":
        make_vectors(args)
    else:
        measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
