"""Encoding a shard of the gallery: images through a DataLoader (decoding in worker processes), captions in
batches; the raw per-level features are written as float16 ``.npy`` files into a shard directory that is
committed by one atomic rename, so a killed build keeps every shard it finished and nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from index_format import close_inherited_locks, fsync_tree
from model import ImageDecodeError, load_pixels

from .gallery import Item, Text


@dataclass
class EncodeOptions:
    batch_size: int = 32
    workers: int = 0
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb warning threshold
    text_batch: int = 256


class _Images(Dataset):
    def __init__(self, items: list[Item], image_size: int, max_pixels: int) -> None:
        self.items, self.image_size, self.max_pixels = items, image_size, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:  # the model's decoding boundary turns every decoder failure into ImageDecodeError
            return i, load_pixels(item.path, self.image_size, max_pixels=self.max_pixels), None
        except ImageDecodeError as exc:
            return i, None, str(exc)


def _collate(batch):
    ok = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, reason) for i, _, reason in batch if reason is not None]
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], pixels, failed


@torch.inference_mode()
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
    positions, levels, vectors, failures = [], [], [], {}
    device = model.device
    for ok, pixels, failed in loader:
        failures.update(failed)
        if pixels is not None:
            feats = model.encode_images(pixels.to(device))
            vectors.append(model.global_images(feats).float().cpu().numpy())
            levels.append([f.to(torch.float16).cpu().numpy() for f in feats])
            positions.extend(ok)
        if progress is not None:
            progress.update(len(ok) + len(failed))
    if levels:
        stacked = [np.concatenate(parts) for parts in zip(*levels, strict=True)]
        return positions, stacked, np.concatenate(vectors), failures
    return positions, None, None, failures


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
    kept = [items[i] for i in positions]
    captions = [(f"{it.id}#{j}", it.id, c, {}) for it in kept for j, c in enumerate(it.captions)]
    captions += [(t.id, None, t.text, t.metadata) for t in texts]
    tokens, offsets, caption_global = encode_texts(model, [c[2] for c in captions], opts)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
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
    os.rename(tmp, out)
    return summary
