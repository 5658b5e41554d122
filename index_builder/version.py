"""Writing segments (encoded shards merged and stored) and versions (FAISS + metadata + manifest over segments)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np

from index_format import (
    FORMAT_VERSION,
    INDEX_FORMAT,
    SEGMENT_FORMAT,
    IndexRoot,
    StoreSpec,
    add_strength,
    load_codebook,
    new_name,
    train_codebooks,
    write_json,
    write_table,
)

logger = logging.getLogger(__name__)

# FAISS tiers by the number of vectors n (one index per kind: images, captions):
#   n <= exact_limit                  flat inner product, exact
#   exact_limit < n <= compress_limit IVF-Flat: float32 vectors in sqrt(n)-sized lists (4·d bytes per vector)
#   n > compress_limit                IVF-PQ: d/8 bytes per vector, re-scored exactly from the segments' own
#                                     float32 vectors (already stored, memory-mapped), see compressed_params
# The measurements behind the numbers are in docs/benchmarks.md, "Compressed first stage".
EXACT_LIMIT = 50_000
COMPRESS_LIMIT = 1_000_000
NPROBE = 32  # lists searched per query, IVF tiers (the manifest's ``faiss.nprobe``; the reader applies it)
PQ_BYTES_PER_DIM = 1 / 8  # PQ code bytes per dimension (96 B at d = 768, 32 B at the demo model's 256)
REFINE_FACTOR = 4  # the compressed tier returns k·REFINE_FACTOR PQ candidates re-scored exactly to the top k
ADD_CHUNK = 262_144  # vectors added per call (the compressed tier reads them from the segments chunk by chunk)


def _load_shards(shards: list[Path], name: str) -> list[np.ndarray]:
    return [np.load(s / name, mmap_mode="r") for s in shards if (s / name).exists()]


def _cat(parts: list[np.ndarray], tail: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=dtype) for p in parts]) if parts else np.zeros((0, *tail), dtype)


def _sample_rows(parts: list[np.ndarray], limit: int, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` token rows ``[T, D]`` float32 spread over all shards."""
    flat = [p.reshape(-1, p.shape[-1]) for p in parts if p.size]
    total = sum(len(p) for p in flat)
    if not total:
        return np.zeros((0, parts[0].shape[-1] if parts else 1), np.float32)
    rng = np.random.default_rng(seed)
    take = [min(len(p), -(-limit * len(p) // total)) for p in flat]  # proportional share of each shard
    return np.concatenate([np.asarray(p[np.sort(rng.choice(len(p), n, replace=False))], np.float32)
                           for p, n in zip(flat, take, strict=True)])


def train_store(shards: list[Path], spec: StoreSpec, levels: int, image_tokens: list[int]) -> dict:
    """Codebooks of a pca store (``{"image": [...]}``), fitted on a sample of the shards' tokens.

    Only image features are transform-coded: uncompressed they are most of the bytes (1,029 tokens per image
    at HAT-base sizes against ~15 per caption), and the image -> caption re-rank measured far less tolerant
    of compressed caption tokens (docs/benchmarks.md); captions stay float16, so after compression they can
    be the larger part (five captions of ~15 tokens at D = 768 are ~115 kB, pca:2 images ~200 kB).
    """
    if not spec.coded:
        return {}
    books = {}
    image = [_sample_rows(_load_shards(shards, f"image.l{i + 1}.npy"), 200_000) for i in range(levels)]
    # Caption tokens only weight the image axes (their energy along each axis): a smaller sample suffices.
    caption = [_sample_rows(_load_shards(shards, f"caption.l{i + 1}.npy"), 50_000) for i in range(levels)]
    has_captions = all(len(c) > 1 for c in caption)
    others = caption if has_captions else [None] * levels
    books["image"] = train_codebooks(image, others, image_tokens, spec.bits, spec.kind)
    return books


def write_segment(root: IndexRoot, shards: list[Path], spec: StoreSpec, model_info: dict, books: dict) -> str:
    """Merge committed shard directories into a new segment; returns its name. Atomic (rename at the end)."""
    name = new_name("seg-")
    tmp = root.segments / f"building-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    levels = model_info["levels"]
    dim, gdim = model_info["embed_dim"], model_info["global_dim"]
    items, captions = [], []
    for shard in shards:
        summary = json.loads((shard / "shard.json").read_text())
        items += summary["items"]
        captions += summary["captions"]
    for kind in ("image", "caption"):
        for level in range(levels):
            parts = _load_shards(shards, f"{kind}.l{level + 1}.npy")
            tail = (model_info["image_tokens"][level], dim) if kind == "image" else (dim,)
            book = books.get(kind, [None] * levels)[level]
            table_spec = spec if book is not None or not spec.coded else StoreSpec("float16")
            write_table(tmp, f"{kind}.l{level + 1}", parts, tail, table_spec, book)
            if book is not None:
                book.save(str(tmp / f"codebook.{kind}.l{level + 1}"))
        np.save(tmp / f"{kind}.global.npy", _cat(_load_shards(shards, f"{kind}.global.npy"), (gdim,)))
    offsets = [np.asarray(o) for o in _load_shards(shards, "caption.offsets.npy")]
    merged, base = [np.zeros(1, np.int64)], 0
    for o in offsets:
        merged.append(o[1:] + base)
        base += int(o[-1])
    np.save(tmp / "caption.offsets.npy", np.concatenate(merged).astype(np.int64))
    _write_jsonl(tmp / "items.jsonl", items)
    _write_jsonl(tmp / "captions.jsonl", captions)
    kinds = {kind: spec.kind if kind in books else _plain(spec) for kind in ("image", "caption")}
    info = {
        "format": SEGMENT_FORMAT,
        "format_version": FORMAT_VERSION,
        "store": spec.label(),
        "store_kinds": kinds,
        "levels": levels,
        "images": len(items),
        "captions": len(captions),
        "model_identity": model_info["identity"],
    }
    write_json(tmp / "segment.json", info)
    tmp.rename(root.segments / name)
    return name


def _plain(spec: StoreSpec) -> str:
    return "float16" if spec.coded else spec.kind


def copy_codebooks(src: Path, dst_books: dict, levels: int) -> dict:
    """The codebooks of segment ``src`` (an ``add`` reuses them so one version shares one rotation)."""
    books = dict(dst_books)
    kinds = json.loads((src / "segment.json").read_text()).get("store_kinds", {})
    for kind in ("image", "caption"):
        if (src / f"codebook.{kind}.l1.basis.npy").exists():
            store = kinds.get(kind, "pca")
            books[kind] = [load_codebook(str(src / f"codebook.{kind}.l{i + 1}"), store) for i in range(levels)]
    return books


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest 4·sqrt(n), at most n/39 (FAISS's minimum of
    training points per centroid), so that a small gallery forced into an IVF tier still trains."""
    nlist = int(2 ** round(math.log2(4 * math.sqrt(n))))
    return max(1, min(nlist, n // 39))


def compressed_params(n: int, d: int) -> dict:
    """IVF-PQ parameters for ``n`` vectors of ``d`` dimensions, scaled down for small ``n``.

    ``m`` sub-quantizers (a divisor of ``d``, about ``d·PQ_BYTES_PER_DIM``) of ``nbits`` bits each: 8 bits when
    the training sample allows it (FAISS wants 39 points per centroid: 9,984 for 2^8), fewer below. The sample
    is 64 points per list, at least 65,536 (plenty for 256-centroid PQ codebooks), at most ``n``.
    """
    nlist = _nlist(n)
    train = min(n, max(64 * nlist, 65_536))
    target = max(1, round(d * PQ_BYTES_PER_DIM))
    m = max(k for k in range(1, target + 1) if d % k == 0)
    nbits = max(1, min(8, int(math.log2(max(2, train // 39)))))
    return {"nlist": nlist, "m": m, "nbits": nbits, "train": train, "nprobe": NPROBE, "refine": REFINE_FACTOR}


def _to_gpus(index, gpus: int, float16_tables: bool = False):
    """``index`` cloned to all GPUs, or ``index`` itself when there are none or FAISS cannot clone it."""
    import faiss

    if not gpus:
        return index
    try:
        if not float16_tables:
            return faiss.index_cpu_to_all_gpus(index)
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True  # IVF-PQ lookup tables in float16: needed on GPU for many sub-quantizers
        return faiss.index_cpu_to_all_gpus(index, co=co)
    except RuntimeError as exc:  # e.g. a sub-quantizer count or code size the GPU kernels lack
        logger.warning("FAISS GPU clone failed (%s); training on CPU", str(exc).splitlines()[0])
        return index


def build_faiss(vectors, exact_limit: int = EXACT_LIMIT, compress_limit: int = COMPRESS_LIMIT):
    """Inner-product index of unit vectors ``[n, G]`` and its manifest entry: flat (exact) up to
    ``exact_limit``, IVF-Flat up to ``compress_limit``, IVF-PQ above (see the tiers above ``EXACT_LIMIT``).
    ``compress_limit`` comes first: a gallery above it is compressed even when ``exact_limit`` is larger.

    ``vectors`` is an array, or anything with ``shape`` that returns float32 rows for a slice or an index array
    (``RowVectors``): the compressed tier reads only its training sample and one chunk at a time.
    Trained and filled on GPU when FAISS has GPUs, always returned as a CPU index (loadable anywhere).
    """
    import faiss

    n, d = vectors.shape
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    rng = np.random.default_rng(0)
    if n <= compress_limit:
        vectors = np.ascontiguousarray(vectors[:], dtype=np.float32)
    if n <= min(exact_limit, compress_limit):
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, {"type": "flat-ip", "exact": True, "bytes_per_vector": 4 * d}
    if n <= compress_limit:
        nlist = _nlist(n)
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        work = _to_gpus(index, gpus)
        work.train(vectors[rng.choice(n, min(n, 64 * nlist), replace=False)])
        work.add(vectors)
        index = faiss.index_gpu_to_cpu(work) if work is not index else work
        info = {"type": f"ivf{nlist}-flat-ip", "exact": False, "nlist": nlist, "nprobe": NPROBE}
        return index, {**info, "bytes_per_vector": 4 * d + 8, "built_on_gpu": work is not index}
    p = compressed_params(n, d)
    # "np": no polysemous training (an ordering of the codes for Hamming pre-filtering, which this search does
    # not use; it was most of the training time)
    index = faiss.index_factory(d, f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}np", faiss.METRIC_INNER_PRODUCT)
    work = _to_gpus(index, gpus, float16_tables=True)
    started = time.perf_counter()
    work.train(np.ascontiguousarray(vectors[np.sort(rng.choice(n, p["train"], replace=False))], np.float32))
    trained = time.perf_counter()
    for start in range(0, n, ADD_CHUNK):
        work.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK], np.float32))
    index = faiss.index_gpu_to_cpu(work) if work is not index else work
    info = {
        "type": f"ivf{p['nlist']}-pq{p['m']}x{p['nbits']}-ip",
        "exact": False,
        **{k: p[k] for k in ("nlist", "m", "nbits", "nprobe")},
        "train_size": p["train"],
        # PQ candidates per result, re-scored with the float32 vectors the segments store (global.npy)
        "refine": {"k_factor": p["refine"], "source": "segment global vectors"},
        "bytes_per_vector": (p["m"] * p["nbits"] + 7) // 8 + 8,  # code + 64-bit id in the inverted lists
        "built_on_gpu": work is not index,
        "train_s": round(trained - started, 3),
        "add_s": round(time.perf_counter() - trained, 3),
    }
    return index, info


class RowVectors:
    """The global vectors of version rows ``[(segment, local row)]``, gathered from the segments' memory-mapped
    ``{kind}.global.npy`` arrays only when indexed (a slice or an index array -> float32 ``[len, G]``)."""

    def __init__(self, arrays: list[np.ndarray], rows: np.ndarray) -> None:
        self.arrays, self.rows = arrays, rows
        self.shape = (len(rows), arrays[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, which) -> np.ndarray:
        rows = self.rows[which]
        out = np.empty((len(rows), self.shape[1]), np.float32)
        for s in np.unique(rows[:, 0]):
            mine = rows[:, 0] == s
            out[mine] = self.arrays[s][rows[mine, 1]]
        return out


def write_version(
    root: IndexRoot,
    segments: list[str],
    image_rows: np.ndarray,
    caption_rows: np.ndarray,
    manifest: dict,
    keep: int,
    exact_limit: int = EXACT_LIMIT,
    compress_limit: int = COMPRESS_LIMIT,
) -> str:
    """Write FAISS, metadata and manifest for ``segments`` restricted to the given rows; publish atomically."""
    import faiss

    started = time.perf_counter()
    version = new_name("v-")
    tmp = root.versions / f".tmp-{version}"
    tmp.mkdir(parents=True)
    seg_dirs = [root.segments / s for s in segments]
    np.save(tmp / "image_rows.npy", image_rows.astype(np.int64).reshape(-1, 2))
    np.save(tmp / "caption_rows.npy", caption_rows.astype(np.int64).reshape(-1, 2))
    faiss_info = {}
    for kind, rows, fname in (("image", image_rows, "images"), ("caption", caption_rows, "captions")):
        if len(rows) == 0:
            faiss_info[fname] = None
            continue
        globals_ = [np.load(d / f"{kind}.global.npy", mmap_mode="r") for d in seg_dirs]
        index, info = build_faiss(RowVectors(globals_, rows), exact_limit, compress_limit)
        faiss.write_index(index, str(tmp / f"{fname}.faiss"))
        info["file_bytes_per_vector"] = round((tmp / f"{fname}.faiss").stat().st_size / len(rows), 1)
        faiss_info[fname] = info
    faiss_info["nprobe"] = NPROBE  # the IVF tiers' default; an entry's own "nprobe" comes first
    _write_metadata(tmp / "metadata.sqlite", seg_dirs, image_rows, caption_rows)
    manifest = dict(manifest)
    manifest.update(
        format=INDEX_FORMAT,
        format_version=FORMAT_VERSION,
        version=version,
        segments=segments,
        counts={"images": len(image_rows), "captions": len(caption_rows)},
        faiss=faiss_info,
    )
    manifest.setdefault("timings", {})["index_and_publish_s"] = round(time.perf_counter() - started, 3)
    write_json(tmp / "manifest.json", manifest)
    add_strength(tmp)  # match strength: score quantiles of true and random caption-image pairs (index_format.strength)
    root.publish(tmp, version, keep)
    return version


def _write_metadata(path: Path, seg_dirs: list[Path], image_rows: np.ndarray, caption_rows: np.ndarray) -> None:
    items = [read_jsonl(d / "items.jsonl") for d in seg_dirs]
    captions = [read_jsonl(d / "captions.jsonl") for d in seg_dirs]
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE images (row INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, path TEXT, metadata TEXT)")
        db.execute(
            "CREATE TABLE captions (row INTEGER PRIMARY KEY, id TEXT NOT NULL, image_id TEXT, text TEXT, metadata TEXT)"
        )
        db.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?)",
            (
                (row, it["id"], it["path"], json.dumps(it["metadata"]))
                for row, it in enumerate(items[s][r] for s, r in image_rows)
            ),
        )
        db.executemany(
            "INSERT INTO captions VALUES (?, ?, ?, ?, ?)",
            (
                (row, c["id"], c["image_id"], c["text"], json.dumps(c["metadata"]))
                for row, c in enumerate(captions[s][r] for s, r in caption_rows)
            ),
        )
        db.execute("CREATE INDEX captions_image ON captions (image_id)")
    db.close()
