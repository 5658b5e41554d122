"""The rebuild job: ``build`` (whole gallery -> new version), ``add`` (new items), ``remove`` (by id).

A build plans the gallery into shards and keeps them under ``staging/<key>/`` where ``key`` hashes the
gallery listing, the model and the options: a build killed at any point and started again with the same
arguments finds the committed shards and encodes only the rest. Publishing is atomic (see ``layout``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from index_format import DEFAULT_STORE, IndexRoot, StoreSpec, write_json
from model import DeviceError, load_model, resolve_device

from .encode import EncodeOptions, drop_unfinished, encode_shard, is_committed
from .errors import BuildError
from .gallery import NOT_AN_IMAGE, Item, Skipped, Text, read_gallery, read_texts
from .version import COMPRESS_LIMIT, EXACT_LIMIT, copy_codebooks, read_jsonl, train_store, write_segment, write_version

logger = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    """Options of ``build`` and ``add`` (CLI flags of the same names)."""

    device: str = "auto"
    batch_size: int = 32
    workers: int = 2
    shard_size: int = 1024
    store: str = DEFAULT_STORE
    keep: int = 3
    max_pixels: int = 89_478_485
    exact_limit: int = EXACT_LIMIT
    compress_limit: int = COMPRESS_LIMIT  # compressed (IVF-PQ) FAISS indices above this many vectors
    texts: str | None = None
    progress: bool = True
    allow_outside_root: bool = False  # accept gallery paths resolving outside the folder / the manifest's folder
    extra: dict = field(default_factory=dict)
    # Distributed encoding on Ray (index_builder.distributed): None = this process, "local" = a cluster
    # started inside the command, "auto" / "ray://host:port" / "host:port" = join a running one.
    ray: str | None = None
    ray_actors: int | None = None  # encoder actors; default: one per GPU, else one per CPU
    ray_actor_cpus: float | None = None  # CPUs each encoder actor reserves; default: 1 with GPUs, else 0.5
    ray_threads: int | None = None  # torch threads per CPU encoder actor; default: its reserved CPUs
    # Shards of the index root (index_format.sharded): None = the root's own count (1 for a new root).
    shards: int | None = None


@dataclass
class BuildResult:
    version: str | None
    indexed: int
    captions: int
    skipped: list[dict]
    resumed_shards: int
    encoded_shards: int
    seconds: float
    removed: list[str] = field(default_factory=list)  # ids taken out by ``remove``


def _load(model_path: str, device: str):
    try:
        device = resolve_device(device)
    except DeviceError as exc:
        raise BuildError(f"--device {device}: {exc}") from exc
    try:
        return load_model(model_path, device=device)
    except Exception as exc:  # every loader failure is fatal for a build, reported in one line
        raise BuildError(f"cannot load model {model_path}: {exc}") from exc


def model_info(model) -> dict:
    """What the index records of the model: identity, levels, dims, image tokens per level, scoring."""
    cfg = model.config
    stage_tokens = cfg.image.stage_tokens()
    tokens = [stage_tokens[s] for s in cfg.image_stages]
    return {
        "identity": model.identity,
        "levels": len(cfg.image_stages),
        "embed_dim": cfg.embed_dim,
        "global_dim": cfg.global_dim or cfg.embed_dim,
        "global_vectors": "trained head" if cfg.global_dim else "mean-pooled last level (fallback)",
        "image_tokens": tokens,
        "image_size": cfg.image.image_size,
        "lambda_softmax": cfg.lambda_softmax,
        "direction": cfg.direction,
    }


def _listing_hash(items: list[Item], texts: list[Text], model, opts: BuildOptions, purpose: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([purpose, model.identity, opts.store, opts.shard_size, opts.max_pixels]).encode())
    for it in items:
        try:
            st = os.stat(it.path)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        h.update(json.dumps([it.id, it.path, it.captions, it.metadata, stamp]).encode())
    for t in texts:
        h.update(json.dumps([t.id, t.text, t.metadata]).encode())
    return h.hexdigest()[:20]


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, smoothing=0.1)


def _encode_all(root: IndexRoot, key: str, model_path: str, model, items, texts, opts: BuildOptions
                ) -> tuple[list[Path], dict]:
    """Encode ``items`` in shards under ``staging/key``; committed shards from an earlier run are reused."""
    staging = root.staging / key
    staging.mkdir(parents=True, exist_ok=True)
    drop_unfinished(staging)
    plan = shard_plan(len(items), opts.shard_size)
    shards = [staging / f"shard-{i:05d}" for i in range(len(plan))]
    todo = [i for i, shard in enumerate(shards) if not is_committed(shard)]
    counts = {"resumed_shards": len(shards) - len(todo), "encoded_shards": len(todo)}
    if opts.ray:
        from .distributed import encode_shards

        ran = encode_shards(opts.ray, model_path, model, items, texts, plan, todo, shards, opts)
        counts["engine"] = {"ray": opts.ray, **ran}
        return shards, counts
    enc = EncodeOptions(opts.batch_size, opts.workers, opts.max_pixels)
    bar = _progress(sum(plan[i][1] - plan[i][0] for i in todo), opts.progress, "encoding")
    try:
        for i in todo:
            start, end = plan[i]
            encode_shard(model, items[start:end], texts if i == 0 else [], shards[i], enc, bar)
    finally:
        if bar is not None:
            bar.close()
    return shards, counts


def shard_plan(n_items: int, shard_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every shard; an empty gallery still has one (empty) shard for the text corpus."""
    return [(i, min(i + shard_size, n_items)) for i in range(0, max(n_items, 1), shard_size)]


def _clean_leftovers(root: IndexRoot) -> None:
    """Under the writer lock: drop what a killed run left that nothing will ever read again.

    ``segments/building-*`` (a segment being merged) and ``staging/.discard-*`` (a finished build's shards
    being deleted) belong to no live writer while the lock is held. Unfinished builds' shards stay: a run with
    the same arguments resumes from them.
    """
    leftovers = [*root.segments.glob("building-*"), *root.staging.glob(".discard-*")]
    for path in leftovers:
        logger.info("removing %s, left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)


def _discard_staging(root: IndexRoot, key: str) -> None:
    """Delete a published build's shards. Renamed away first (atomic), so that a kill during the deletion
    never leaves a half-deleted shard (its ``shard.json`` still there) that a later run would take as whole."""
    staging = root.staging / key
    if not staging.exists():
        return
    trash = root.staging / f".discard-{key}-{uuid.uuid4().hex[:8]}"
    os.rename(staging, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _skipped_of(shards: list[Path]) -> list[dict]:
    return [s for shard in shards for s in json.loads((shard / "shard.json").read_text())["skipped"]]


def build(gallery: str | Path, model_path: str, out: str | Path, opts: BuildOptions | None = None) -> BuildResult:
    """Index ``gallery`` with ``model_path`` into a new version under ``out`` and publish it (into every shard of
    a sharded root: ``opts.shards``, or the root's own count)."""
    opts = opts or BuildOptions()
    StoreSpec.parse(opts.store)
    started = time.perf_counter()
    items, skipped = read_gallery(gallery, opts.allow_outside_root)
    texts, text_skipped = read_texts(opts.texts) if opts.texts else ([], [])
    skipped += text_skipped
    model = _load(model_path, opts.device)
    from .sharding import build_shards, root_shards

    shards = root_shards(out, opts.shards, "build")
    if shards:
        return build_shards(items, skipped, texts, model, model_path, out, opts, shards, started)
    return build_items(items, skipped, texts, model, model_path, IndexRoot(out), opts, started)


def build_items(items: list[Item], skipped: list[Skipped], texts: list[Text], model, model_path: str,
                root: IndexRoot, opts: BuildOptions, started: float) -> BuildResult:
    """``build`` of a read gallery (``items``, its ``skipped`` inputs, text corpus ``texts``) into ``root``."""
    spec = StoreSpec.parse(opts.store)
    with root.lock():
        _clean_leftovers(root)
        key = "build-" + _listing_hash(items, texts, model, opts, "build")
        scan_s = time.perf_counter() - started
        shards, counts = _encode_all(root, key, model_path, model, items, texts, opts)
        encode_s = time.perf_counter() - started - scan_s
        all_skipped = [s.to_dict() for s in skipped] + _skipped_of(shards)
        info = model_info(model)
        n_ok = sum(len(json.loads((s / "shard.json").read_text())["items"]) for s in shards)
        if n_ok == 0:
            _log_skipped(all_skipped)
            raise BuildError(f"nothing could be indexed into {root.root}: {len(all_skipped)} inputs skipped")
        books = train_store(shards, spec, info["levels"], info["image_tokens"])
        segment = write_segment(root, shards, spec, info, books)
        seg_info = json.loads((root.segments / segment / "segment.json").read_text())
        manifest = write_manifest(info, model_path, spec, opts, all_skipped, "build", None)
        manifest["timings"] = {"scan_s": round(scan_s, 3), "encode_s": round(encode_s, 3)}
        manifest.update(counts)
        rows = gallery_rows(0, seg_info["images"]), gallery_rows(0, seg_info["captions"])
        version = write_version(root, [segment], *rows, manifest, opts.keep, opts.exact_limit, opts.compress_limit)
        _discard_staging(root, key)
    _log_skipped(all_skipped)
    return BuildResult(version, n_ok, seg_info["captions"], all_skipped, counts["resumed_shards"],
                       counts["encoded_shards"], round(time.perf_counter() - started, 3))


def gallery_rows(segment: int, n: int) -> np.ndarray:
    """``[n, 2]`` int64 (segment, row) pairs addressing rows ``0..n-1`` of one segment."""
    return np.stack([np.full(n, segment, np.int64), np.arange(n, dtype=np.int64)], axis=1)


def write_manifest(info, model_path, spec, opts, skipped, operation, parent) -> dict:
    """The version manifest's body (model identity and sizes, store, options, skip list, lineage)."""
    left_out = ("progress", "extra", "shards")  # how this run was carried out, not what the index is
    options = {k: v for k, v in asdict(opts).items() if k not in left_out and not k.startswith("ray")}
    return {
        "model": {**info, "source": str(model_path)},
        "store": spec.label(),
        "dims": {"embed": info["embed_dim"], "global": info["global_dim"], "image_tokens": info["image_tokens"]},
        "levels": info["levels"],
        "skipped": skipped,
        "options": options,
        "operation": operation,
        "parent": parent,
    }


def _log_skipped(skipped: list[dict]) -> None:
    """One warning per skipped input, except files that are not images at all: one line counts those."""
    quiet = 0
    for s in skipped:
        if s["reason"] == NOT_AN_IMAGE:
            quiet += 1
        else:
            logger.warning("skipped %s: %s", s.get("id") or s["source"], s["reason"])
    if quiet:
        logger.info("%d files are not images (listed in the report's skipped inputs)", quiet)


def _current(root: IndexRoot) -> tuple[Path, dict]:
    current = root.current_dir()
    if current is None:
        raise BuildError(f"{root.root}: no published index to change; run 'build' first")
    return current, json.loads((current / "manifest.json").read_text())


def add(gallery: str | Path, model_path: str, out: str | Path, opts: BuildOptions | None = None) -> BuildResult:
    """Encode only the items of ``gallery`` whose ids are not indexed yet; publish old + new as a version (in
    each shard of a sharded root that gets new items)."""
    opts = opts or BuildOptions()
    started = time.perf_counter()
    root = IndexRoot(out)
    items, skipped = read_gallery(gallery, opts.allow_outside_root)
    texts, text_skipped = read_texts(opts.texts) if opts.texts else ([], [])
    skipped += text_skipped
    model = _load(model_path, opts.device)
    from .sharding import add_shards, root_shards

    shards = root_shards(out, opts.shards, "add")
    if shards:
        return add_shards(items, skipped, texts, model, model_path, out, opts, shards, started)
    return add_items(items, skipped, texts, model, model_path, root, opts, started)


def add_items(items: list[Item], skipped: list[Skipped], texts: list[Text], model, model_path: str,
              root: IndexRoot, opts: BuildOptions, started: float) -> BuildResult:
    """``add`` of a read gallery into ``root`` (an ordinary root)."""
    with root.lock():
        _clean_leftovers(root)
        current, manifest = _current(root)
        if manifest["model"]["identity"] != model.identity:
            raise BuildError(f"the index was built by model {manifest['model']['identity'][:12]}…, not {model_path}")
        spec = StoreSpec.parse(manifest["store"])
        present = _present_ids(root, manifest)
        new = [it for it in items if it.id not in present["images"]]
        skipped += [Skipped(it.path, "id already in the index", it.id) for it in items if it.id in present["images"]]
        texts_new = [t for t in texts if t.id not in present["captions"]]
        skipped += [Skipped(t.id, "text id already in the index", t.id) for t in texts if t.id in present["captions"]]
        all_skipped = [s.to_dict() for s in skipped]
        if not new and not texts_new:
            _log_skipped(all_skipped)
            return BuildResult(None, 0, 0, all_skipped, 0, 0, round(time.perf_counter() - started, 3))
        key = f"add-{manifest['version']}-" + _listing_hash(new, texts_new, model, opts, "add")
        shards, counts = _encode_all(root, key, model_path, model, new, texts_new, opts)
        all_skipped += _skipped_of(shards)
        info = model_info(model)
        books = copy_codebooks(root.segments / manifest["segments"][-1], {}, info["levels"])
        if spec.coded and "image" not in books:
            books = train_store(shards, spec, info["levels"], info["image_tokens"])
        segment = write_segment(root, shards, spec, info, books)
        seg_info = json.loads((root.segments / segment / "segment.json").read_text())
        s = len(manifest["segments"])
        image_rows = np.concatenate([np.load(current / "image_rows.npy"), gallery_rows(s, seg_info["images"])])
        caption_rows = np.concatenate([np.load(current / "caption_rows.npy"), gallery_rows(s, seg_info["captions"])])
        new_manifest = write_manifest(info, model_path, spec, opts, all_skipped, "add", manifest["version"])
        new_manifest.update(counts)
        version = write_version(
            root, [*manifest["segments"], segment], image_rows, caption_rows, new_manifest, opts.keep, opts.exact_limit,
            opts.compress_limit,
        )
        _discard_staging(root, key)
    _log_skipped(all_skipped)
    return BuildResult(version, seg_info["images"], seg_info["captions"], all_skipped, counts["resumed_shards"],
                       counts["encoded_shards"], round(time.perf_counter() - started, 3))


def _present_ids(root: IndexRoot, manifest: dict) -> dict[str, set[str]]:
    current = root.versions / manifest["version"]
    db = sqlite3.connect(f"file:{current / 'metadata.sqlite'}?mode=ro", uri=True)
    try:
        return {
            "images": {r[0] for r in db.execute("SELECT id FROM images")},
            "captions": {r[0] for r in db.execute("SELECT id FROM captions")},
        }
    finally:
        db.close()


def remove(ids: list[str], out: str | Path, keep: int = 3) -> BuildResult:
    """Publish a version without the given image ids (and their captions) or text ids (in each shard of a
    sharded root that holds some of them)."""
    from .sharding import remove_shards, root_shards

    shards = root_shards(out, None, "remove")
    if shards:
        return remove_shards(ids, out, keep, shards)
    return remove_ids(ids, IndexRoot(out), keep)


def remove_ids(ids: list[str], root: IndexRoot, keep: int = 3) -> BuildResult:
    """``remove`` on an ordinary root."""
    started = time.perf_counter()
    drop = set(ids)
    with root.lock():
        current, manifest = _current(root)
        image_rows = np.load(current / "image_rows.npy")
        caption_rows = np.load(current / "caption_rows.npy")
        segs = [root.segments / s for s in manifest["segments"]]
        items = [read_jsonl(d / "items.jsonl") for d in segs]
        captions = [read_jsonl(d / "captions.jsonl") for d in segs]
        keep_img = np.array([items[s][r]["id"] not in drop for s, r in image_rows], dtype=bool)
        keep_cap = np.array(
            [captions[s][r]["image_id"] not in drop and captions[s][r]["id"] not in drop for s, r in caption_rows],
            dtype=bool,
        )
        found = {items[s][r]["id"] for s, r in image_rows[~keep_img]} | {
            captions[s][r]["id"] for s, r in caption_rows[~keep_cap] if captions[s][r]["image_id"] is None
        }
        missing = sorted(drop - found)
        skipped = [{"source": i, "id": i, "reason": "id not in the index"} for i in missing]
        if not found:
            return BuildResult(None, 0, 0, skipped, 0, 0, round(time.perf_counter() - started, 3))
        new_manifest = {k: manifest[k] for k in ("model", "store", "dims", "levels", "options")}
        new_manifest.update(skipped=skipped, operation="remove", parent=manifest["version"], removed=sorted(found))
        version = write_version(
            root, manifest["segments"], image_rows[keep_img], caption_rows[keep_cap], new_manifest, keep,
            manifest["options"].get("exact_limit", EXACT_LIMIT),
            manifest["options"].get("compress_limit", COMPRESS_LIMIT),
        )
    return BuildResult(version, 0, 0, skipped, 0, 0, round(time.perf_counter() - started, 3), sorted(found))


def write_report(result: BuildResult, path: Path) -> None:
    write_json(path, asdict(result))
