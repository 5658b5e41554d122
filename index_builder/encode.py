"""Encoding a shard of the gallery: images through a DataLoader (decoding in worker processes), captions in
batches; the raw per-level features are written as float16 ``.npy`` files into a shard directory that is
committed by one atomic rename, so a killed build keeps every shard it finished and nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from index_format import close_inherited_locks, fsync_tree
from model import ImageDecodeError, load_pixels

from .gallery import Item, Text, read_object, uri_scheme


@dataclass
class EncodeOptions:
    batch_size: int = 32
    workers: int = 0
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb warning threshold
    text_batch: int = 256


TMP_PREFIX = ".writing-"  # a shard being written; committed by renaming it to its final name


class _Images(Dataset):
    def __init__(self, items: list[Item], image_size: int, max_pixels: int) -> None:
        self.items, self.image_size, self.max_pixels = items, image_size, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        source = item.path
        if uri_scheme(source) is not None:  # an object-store URI (the manifest reader let only those through)
            try:
                source = read_object(item.path)
            except OSError as exc:
                return i, None, f"cannot read ({exc})"
        try:  # the model's decoding boundary turns every decoder failure into ImageDecodeError
            return i, load_pixels(source, self.image_size, max_pixels=self.max_pixels, name=item.path), None
        except ImageDecodeError as exc:
            return i, None, str(exc)


def _collate(batch):
    ok = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, reason) for i, _, reason in batch if reason is not None]
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed


def decode_items(items: list[Item], image_size: int, max_pixels: int):
    """Decode ``items`` in this process -> (ok positions, pixels ``[n, 3, S, S]`` float32 or None, {position:
    reason}). The distributed build's CPU tasks run this; the single-process build decodes the same way in
    its DataLoader workers (``_Images``)."""
    data = _Images(items, image_size, max_pixels)
    ok, pixels, failed = _collate([data[i] for i in range(len(items))])
    return ok, (pixels.numpy() if pixels is not None else None), dict(failed)


def pixel_batches(positions: list[int], pixels: np.ndarray, batch_size: int):
    """Re-form the batches the single-process DataLoader makes: positions ``[j*B, (j+1)*B)`` of the shard, the
    undecodable ones left out. The same images in the same batch shapes give the same bits on the same kernels."""
    start = 0
    while start < len(positions):
        group = positions[start] // batch_size
        end = start
        while end < len(positions) and positions[end] // batch_size == group:
            end += 1
        yield positions[start:end], torch.from_numpy(np.array(pixels[start:end]))  # a writable copy of one batch
        start = end


@torch.inference_mode()
def encode_pixel_batches(model, batches, progress=None):
    """``(positions, pixels)`` batches -> (positions, per level ``[n, R_l, D]`` float16, global ``[n, G]``
    float32); levels and global are None when no image decoded."""
    positions, levels, vectors = [], [], []
    device = model.device
    for ok, pixels in batches:
        if pixels is not None and len(ok):
            feats = model.encode_images(pixels.to(device))
            vectors.append(model.global_images(feats).float().cpu().numpy())
            levels.append([f.to(torch.float16).cpu().numpy() for f in feats])
            positions.extend(ok)
        if progress is not None:
            progress(len(ok))
    if not levels:
        return positions, None, None
    return positions, [np.concatenate(parts) for parts in zip(*levels, strict=True)], np.concatenate(vectors)


def encode_images(model, items: list[Item], opts: EncodeOptions, progress=None):
    """-> (ok positions, per level ``[n, R_l, D]`` float16, global ``[n, G]`` float32, {position: reason})."""
    loader = DataLoader(
        _Images(items, model.config.image.image_size, opts.max_pixels),
        batch_size=opts.batch_size,
        num_workers=opts.workers,
        collate_fn=_collate,
        persistent_workers=False,
        worker_init_fn=close_inherited_locks,  # a killed builder's lock is free at once, not when its workers exit
    )
    failures = {}

    def batches():
        for ok, pixels, failed in loader:
            failures.update(failed)
            if progress is not None and failed:
                progress.update(len(failed))
            yield ok, pixels

    positions, levels, vectors = encode_pixel_batches(
        model, batches(), progress.update if progress is not None else None
    )
    return positions, levels, vectors, failures


@torch.inference_mode()
def encode_texts(model, texts: list[str], opts: EncodeOptions):
    """-> (per level flat tokens ``[T, D]`` float16, offsets ``[M + 1]`` int64, global ``[M, G]`` float32)."""
    num_levels = len(model.config.text_layers)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_levels)]
    lengths_all, vectors = [], []
    for start in range(0, len(texts), opts.text_batch):
        levels, lengths = model.encode_text_strings(texts[start : start + opts.text_batch])
        vectors.append(model.global_texts(levels, lengths).float().cpu().numpy())
        mask = (torch.arange(levels[0].shape[1], device=lengths.device)[None, :] < lengths[:, None]).cpu()
        for level, x in enumerate(levels):
            parts[level].append(x.cpu()[mask].to(torch.float16).numpy())  # valid tokens, caption after caption
        lengths_all.append(lengths.cpu().numpy())
    lengths = np.concatenate(lengths_all) if lengths_all else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dim, gdim = model.config.embed_dim, _global_dim(model)
    tokens = [np.concatenate(p) if p else np.zeros((0, dim), np.float16) for p in parts]
    return tokens, offsets, (np.concatenate(vectors) if vectors else np.zeros((0, gdim), np.float32))


def _global_dim(model) -> int:
    return model.config.global_dim or model.config.embed_dim


def encode_shard(model, items: list[Item], texts: list[Text], out: Path, opts: EncodeOptions, progress=None) -> dict:
    """Encode ``items`` (and their captions) plus ``texts`` into shard directory ``out``; commit atomically.

    Returns the shard's summary (also written as ``shard.json``): indexed ids, captions, skipped reasons.
    """
    started = time.perf_counter()
    positions, image_levels, image_global, failures = encode_images(model, items, opts, progress)
    return finish_shard(model, items, texts, (positions, image_levels, image_global, failures), out, opts, started)


def finish_shard(model, items: list[Item], texts: list[Text], images, out: Path, opts: EncodeOptions,
                 started: float) -> dict:
    """Encode the captions of the decoded ``items`` plus ``texts``, write everything as shard ``out``.

    ``images`` is ``encode_images``' result. The shard is written under a private temporary name and
    committed by one rename; when ``out`` exists already (another attempt of the same shard committed first:
    a retried or orphaned distributed task), that shard is kept and this copy dropped: both hold the same.
    """
    positions, image_levels, image_global, failures = images
    kept = [items[i] for i in positions]
    captions = [(f"{it.id}#{j}", it.id, c, {}) for it in kept for j, c in enumerate(it.captions)]
    captions += [(t.id, None, t.text, t.metadata) for t in texts]
    tokens, offsets, caption_global = encode_texts(model, [c[2] for c in captions], opts)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{uuid.uuid4().hex[:12]}")
    tmp.mkdir(parents=True)
    if image_levels is not None:
        for level, x in enumerate(image_levels):
            np.save(tmp / f"image.l{level + 1}.npy", x)
        np.save(tmp / "image.global.npy", image_global)
    for level, x in enumerate(tokens):
        np.save(tmp / f"caption.l{level + 1}.npy", x)
    np.save(tmp / "caption.offsets.npy", offsets)
    np.save(tmp / "caption.global.npy", caption_global)
    summary = {
        "items": [{"id": it.id, "path": it.path, "metadata": it.metadata} for it in kept],
        "captions": [{"id": c[0], "image_id": c[1], "text": c[2], "metadata": c[3]} for c in captions],
        "skipped": [{"source": items[i].path, "id": items[i].id, "reason": r} for i, r in sorted(failures.items())],
        "seconds": round(time.perf_counter() - started, 3),
    }
    (tmp / "shard.json").write_text(json.dumps(summary))
    fsync_tree(tmp)
    try:
        os.rename(tmp, out)
    except OSError:
        if not (out / "shard.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return json.loads((out / "shard.json").read_text())
    return summary


def is_committed(shard: Path) -> bool:
    return shard.is_dir() and (shard / "shard.json").is_file()


def drop_unfinished(staging: Path) -> None:
    """Remove shard copies that a killed run was still writing (never read: only committed names count)."""
    for tmp in staging.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
