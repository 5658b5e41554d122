"""Index builder benchmarks: encode throughput, feature-store size and score fidelity.

    python benchmarks/build_index.py encode --dataset data/world/dataset.json --images data/world/images
    python benchmarks/build_index.py fidelity --dataset data/world/dataset.json --images data/world/images
    python benchmarks/build_index.py base-store

``encode``: images/s of the real shard encoder (decode + preprocess + model) for the demo model and for
HAT-base sizes (random weights), with 0 and 2 decoding workers.
``fidelity``: builds real indices of the test split with each store and compares the re-rank of FAISS's top
100 against float32 features (top-10 agreement, top-1 agreement, mean |score error|), both directions.
``base-store``: bytes per image and mean |score error| of each store at HAT-base sizes (random weights).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from index_builder import BuildOptions, build, open_index
from index_builder.encode import EncodeOptions, encode_images
from index_builder.gallery import Item
from index_format import StoreSpec, Table, train_codebooks, write_table
from model import HATModel, load_model
from model.alignment import hierarchical_similarity
from training.data import read_karpathy
from training.evaluate import encode_split

REPO = Path(__file__).resolve().parents[1]
STORES = ("float16", "int8", "pca:2", "pca:3", "pq:1", "pq:1.5")


def _items(dataset: str, images: str, n: int) -> list[Item]:
    entries = read_karpathy(dataset, images, "test")[:n]
    return [Item(str(i), str(e.path), []) for i, e in enumerate(entries)]


def base_model() -> HATModel:
    from training import paper_model_config

    torch.manual_seed(0)
    return HATModel(paper_model_config()).eval()


def bench_encode(args) -> None:
    models = {"demo": (load_model(REPO / "models" / "demo"), args.demo_images, 64)}
    if not args.skip_base:
        models["HAT-base (random weights)"] = (base_model(), args.base_images, 8)
    for name, (model, n, batch) in models.items():
        items = _items(args.dataset, args.images, n)
        for workers in (0, 2):
            opts = EncodeOptions(batch_size=batch, workers=workers)
            encode_images(model, items[:batch], opts)  # warm-up
            t0 = time.perf_counter()
            positions, _, _, _ = encode_images(model, items, opts)
            dt = time.perf_counter() - t0
            print(f"{name:28s} workers={workers} batch={batch:3d} images={len(positions):5d} "
                  f"{len(positions) / dt:7.1f} images/s")


def _agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> tuple[float, float]:
    top_a, top_b = a.topk(min(k, a.shape[0])).indices, b.topk(min(k, b.shape[0])).indices
    return len(set(top_a.tolist()) & set(top_b.tolist())) / len(top_a), float(top_a[0] == top_b[0])


def bench_fidelity(args) -> None:
    model = load_model(REPO / "models" / "demo")
    entries = read_karpathy(args.dataset, args.images, "test")
    with torch.inference_mode():
        enc = encode_split(model, entries)
    import json

    manifest = Path(tempfile.mkdtemp()) / "test.jsonl"
    with open(manifest, "w") as fh:
        for i, e in enumerate(entries):
            fh.write(json.dumps({"id": str(i), "image": str(e.path), "captions": list(e.captions)}) + "\n")
    queries = range(0, len(enc.lengths), max(1, len(enc.lengths) // args.queries))
    for spec in args.stores.split(","):
        root = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        # a manifest of our own pointing at data/world/images: trusted, so paths outside its folder are allowed
        options = BuildOptions(store=spec, progress=False, allow_outside_root=True)
        build(manifest, str(REPO / "models" / "demo"), root, options)
        build_s = time.perf_counter() - t0
        index = open_index(root)
        seg = index.segments[0]
        per_image = sum(t.nbytes() for t in seg.image) / index.num_images
        stats = {"t2i": [], "i2t": []}
        for q in queries:  # text -> image
            levels = [x[q : q + 1] for x in enc.text_levels]
            n = int(enc.lengths[q])
            _, rows = index.search("images", enc.text_global[q : q + 1].numpy(), args.candidates)
            rows = rows[0]
            got = index.rerank_images(levels, n, rows)
            ref = model.similarity([x[rows] for x in enc.image_levels], [x[:, :n] for x in levels], [n])[:, 0]
            stats["t2i"].append((*_agreement(ref, got), float((ref - got).abs().mean())))
        for i in range(0, len(entries), max(1, len(entries) // (args.queries // 5))):  # image -> text
            levels = [x[i : i + 1] for x in enc.image_levels]
            _, rows = index.search("captions", enc.image_global[i : i + 1].numpy(), args.candidates)
            rows = rows[0]
            got = index.rerank_captions(levels, rows)
            ref = model.similarity(levels, [x[rows] for x in enc.text_levels], enc.lengths[rows])[0]
            stats["i2t"].append((*_agreement(ref, got), float((ref - got).abs().mean())))
        for direction, values in stats.items():
            top10, top1, err = np.mean(values, axis=0)
            print(f"{spec:8s} {direction} queries={len(values):4d} image store {per_image:8.0f} B/image "
                  f"top-10 agreement {100 * top10:6.2f}%  top-1 {100 * top1:6.2f}%  mean|err| {err:.2e}  "
                  f"build {build_s:5.1f}s")


def bench_base_store(args) -> None:
    model = base_model() if args.model is None else load_model(args.model)
    size = model.config.image.image_size
    torch.manual_seed(1)
    with torch.inference_mode():
        images = [model.encode_images(torch.randn(8, 3, size, size)) for _ in range(args.base_images // 8)]
        image_levels = [torch.cat(parts) for parts in zip(*images, strict=True)]
        captions = [f"a {c} {s} next to a {c2} {s2} on a table" for c, s, c2, s2 in
                    zip(["red", "blue", "green", "small", "large"] * 8, ["dog", "cat", "car", "box"] * 10,
                        ["white", "black", "yellow", "old"] * 10, ["chair", "tree", "ball", "cup", "bird"] * 8,
                        strict=False)][: args.captions]
        text_levels, lengths = model.encode_text_strings(captions) if model.tokenizer else _texts(model, captions)
    ref = hierarchical_similarity(image_levels, text_levels, lengths)
    tokens = [x.shape[1] for x in image_levels]
    for spec_text in args.stores.split(","):
        spec = StoreSpec.parse(spec_text)
        d = Path(tempfile.mkdtemp())
        flat = [x.reshape(-1, x.shape[-1]).numpy() for x in image_levels]
        others = [torch.cat([t[j, : lengths[j]] for j in range(len(lengths))]).numpy() for t in text_levels]
        books = train_codebooks(flat, others, tokens, spec.bits, spec.kind) if spec.coded else [None] * 3
        tables = []
        copies = -(-args.rerank_candidates // len(image_levels[0]))  # the table repeats the images for timing
        for level, (x, book) in enumerate(zip(image_levels, books, strict=True)):
            write_table(d, f"l{level}", [x.numpy()] * copies, tuple(x.shape[1:]), spec, book)
            tables.append(Table(d, f"l{level}", spec.kind, book))
        rows = np.arange(len(image_levels[0]))
        got = hierarchical_similarity(
            [t.rows(rows) for t in tables], [t.rotate(x) for t, x in zip(tables, text_levels, strict=True)],
            lengths, image_norms=[t.norms(rows) for t in tables],
        )
        per_image = sum(t.nbytes() for t in tables) / len(tables[0])
        sizes = "HAT-base" if args.model is None else args.model
        print(f"{spec_text:8s} {sizes} sizes {per_image:10.0f} B/image ({per_image / 2**20:.3f} MiB)  "
              f"mean|score err| {float((got - ref).abs().mean()):.2e}  max {float((got - ref).abs().max()):.2e}  "
              f"({len(rows)} images x {len(captions)} captions)", flush=True)
        _time_rerank(spec_text, tables, text_levels, lengths, args)


def _time_rerank(label: str, tables, text_levels, lengths, args) -> None:
    """One caption against ``--rerank-candidates`` images read from ``tables``: reading and decoding the store
    plus the HAT score, as ``GalleryIndex.rerank_images`` does it: the full decode (the re-rank before the coded-axes
    path) and the coded axes with the caption's Gram matrices (i2t, pca/pq tables), float32 and bfloat16."""
    from model.alignment import level_similarities, sum_levels

    n = int(lengths[0])
    query = [x[:1, :n] for x in text_levels]
    rows = np.sort(np.random.default_rng(0).choice(len(tables[0]), args.rerank_candidates, replace=False))

    def full(dtype):
        images = [t.rows(rows, dtype) for t in tables]
        texts = [t.rotate(x).to(dtype) for t, x in zip(tables, query, strict=True)]
        return sum_levels(level_similarities(images, texts, [n], image_norms=[t.norms(rows) for t in tables]))

    def narrow(dtype):
        images, texts, grams = [], [], []
        for t, x in zip(tables, query, strict=True):
            rotated = t.rotate(x)
            if t.narrows:
                images.append(t.coded_rows(rows, dtype))
                texts.append(t.narrow(rotated).to(dtype))
                grams.append(rotated @ rotated.transpose(1, 2))
            else:
                images.append(t.rows(rows, dtype))
                texts.append(rotated.to(dtype))
                grams.append(None)
        norms = [t.norms(rows) for t in tables]
        return sum_levels(level_similarities(images, texts, [n], image_norms=norms, text_grams=grams))

    def codes(dtype, rows=rows):  # the re-rank's path now (GalleryIndex.rerank_images): dots read from the codes
        dots, grams = [], []
        for t, x in zip(tables, query, strict=True):
            rotated = t.rotate(x)
            dots.append(t.dots(rows, rotated[0]).unsqueeze(2))
            grams.append(rotated @ rotated.transpose(1, 2))
        norms = [t.norms(rows) for t in tables]
        return sum_levels(level_similarities(dots, [None] * len(dots), [n], image_norms=norms, text_grams=grams,
                                             image_dots=dots))  # fmt: skip

    from service.sharing import IdleWorkers

    helpers = IdleWorkers(2)  # as python -m service with 2 workers, one searching: its re-rank split in two
    pairs = sum(t.parts["norms"].shape[1] for t in tables) * n  # token pairs a candidate, as the service counts them

    def split(dtype):  # "from codes" with the candidates split over an idle search worker (service/sharing.py)
        with helpers.search():
            return helpers.split(lambda chunk: codes(dtype, chunk), rows, pairs)

    for threads in args.threads:
        torch.set_num_threads(threads)
        cells = []
        paths = (("full", full), ("coded axes", narrow), ("from codes", codes), ("from codes split", split))
        for name, fn in paths:
            if name not in args.paths.split(","):
                continue
            if name == "coded axes" and not any(t.narrows for t in tables):
                continue
            if name.startswith("from codes") and not all(t.coded for t in tables):
                continue
            for dtype in (torch.float32,) if name.startswith("from codes") else (torch.float32, torch.bfloat16):
                for _ in range(2):
                    fn(dtype)
                times = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    fn(dtype)
                    times.append((time.perf_counter() - start) * 1000.0)
                cells.append(f"{name} {str(dtype).removeprefix('torch.')} {np.median(times):6.1f} ms")
        print(f"{label:8s} re-rank of {args.rerank_candidates} read from the store, {threads} thread(s): "
              + "; ".join(cells), flush=True)


def _texts(model, captions):
    from model.tokenizer import HATTokenizer

    model.tokenizer = HATTokenizer()
    return model.encode_text_strings(captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("encode", "fidelity", "base-store"))
    parser.add_argument("--dataset", default=str(REPO / "data/world/dataset.json"))
    parser.add_argument("--images", default=str(REPO / "data/world/images"))
    parser.add_argument("--demo-images", type=int, default=1000)
    parser.add_argument("--base-images", type=int, default=48)
    parser.add_argument("--captions", type=int, default=40)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--skip-base", action="store_true")
    parser.add_argument("--rerank-candidates", type=int, default=100, help="base-store: candidates timed")
    parser.add_argument("--model", help="base-store: this model's sizes instead of HAT-base's (random weights), "
                        "e.g. models/demo (its images are random pixels too)")
    parser.add_argument("--runs", type=int, default=9, help="base-store: timed re-ranks per cell (median)")
    parser.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                        help="base-store: torch threads, comma-separated (default 1,2)")
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated stores for fidelity")
    parser.add_argument("--paths", default="full,coded axes,from codes,from codes split",
                        help="base-store: the re-rank paths timed, comma-separated (default all)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    {"encode": bench_encode, "fidelity": bench_fidelity, "base-store": bench_base_store}[args.what](args)


if __name__ == "__main__":
    main()
