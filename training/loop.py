"""The training loop: ``train(cfg, dataset, images, out)``, epochs, resuming, the frozen-text cache.

Loss: VSE++ hinge (margin 0.2, hardest negative both ways) on the batch's summed hierarchical score matrix,
plus InfoNCE on the pooled first-stage vectors (the service's FAISS stage). Adam, lr 1e-4, x0.1 every
``lr_step`` epochs (paper: 10). Backbones frozen for the first N epochs (paper: 10). Mixed precision: fp16
on CUDA, bf16 on CPUs with native bf16. Each epoch writes ``OUT/last.pt`` (resumable); the best epoch by
validation RSUM is saved in the project format at ``OUT/best``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from model.checkpoint import save_model, unpickling_detail
from model.errors import HATError
from model.hat import HATModel
from model.preprocess import load_image, normalize, resized_crop

from .config import TrainConfig
from .data import EvalTransform, ImageDataset, TrainTransform, caption_table, pick_captions, read_karpathy
from .evaluate import encode_split, evaluate_encoded
from .losses import info_nce_loss, info_nce_scores, vse_hinge_loss
from .weights import build_model

logger = logging.getLogger(__name__)


def _read_resume_state(path: Path) -> dict:
    """``OUT/last.pt`` of an earlier run, read with ``weights_only=True`` (never full unpickling)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HATError(
            f"cannot resume from {path}: it holds Python objects that need full unpickling, which can run "
            f"arbitrary code, so it is refused ({unpickling_detail(exc)})"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise HATError(f"cannot resume from {path}: not a readable training state ({unpickling_detail(exc)})") from exc
    keys = ("model", "optimizer", "scheduler", "state")
    if not isinstance(saved, dict) or any(key not in saved for key in keys):
        raise HATError(f"cannot resume from {path}: not a training state (expected the keys {', '.join(keys)})")
    return saved


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (``auto``: fp16 on CUDA, bf16 on CPUs with oneDNN, else none)."""
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else ("bf16" if torch.backends.mkldnn.is_available() else "off")
    if amp not in ("bf16", "fp16", "off"):
        raise HATError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def _autocast(amp: str, device: torch.device):
    dtype = amp_dtype(amp, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class TextCache:
    """Frozen text encoder: every training caption's hidden states at the model's layers, computed once.

    Captions are de-duplicated and encoded in batches of similar length; stored as float16 ``[N, L, H]``.
    With ``store`` (a directory), the features are kept there under a key of the text encoder's config and
    the captions, and re-used by later runs over the same captions (pilot runs of one world).
    """

    def __init__(self, model: HATModel, texts: list[str], batch: int = 256, store: Path | None = None) -> None:
        unique = sorted(set(texts))
        slot = {t: i for i, t in enumerate(unique)}
        self.row = torch.tensor([slot[t] for t in texts], dtype=torch.long)
        tok = model.tokenizer(unique)
        self.lengths = tok.lengths
        path = None
        if store is not None and model.config.text_weights:
            import hashlib
            import json

            key = json.dumps([model.config.text_weights, list(model.config.text_layers), model.config.max_text_len])
            digest = hashlib.sha256("\n".join([key, *unique]).encode()).hexdigest()[:24]
            path = Path(store) / f"text-{digest}.pt"
            if path.exists():
                self.hidden = torch.load(path, weights_only=True)
                logger.info("loaded text features of %d unique captions from %s", len(unique), path)
                return
        width = int(self.lengths.max())
        hidden_size = model.config.text.hidden_size
        self.hidden = [
            torch.zeros(len(unique), width, hidden_size, dtype=torch.float16) for _ in model.config.text_layers
        ]
        order = torch.argsort(self.lengths)
        with torch.no_grad():
            for start in range(0, len(unique), batch):
                rows = order[start : start + batch]
                n = int(self.lengths[rows].max())
                ids = tok.input_ids[rows, :n].to(model.device)
                mask = tok.attention_mask[rows, :n].to(model.device)
                for store, h in zip(self.hidden, model.text_encoder(ids, mask), strict=True):
                    store[rows, :n] = h.half().cpu()
        logger.info("cached text features of %d unique captions (of %d)", len(unique), len(texts))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(self.hidden, path)

    def project(self, model: HATModel, caption_index: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-level projected features ``[B, L, D]`` and lengths ``[B]`` of the given captions."""
        rows = self.row[caption_index]
        lengths = self.lengths[rows]
        width = int(lengths.max())
        device = model.device
        levels = [
            proj(h[rows, :width].to(device).float()) for proj, h in zip(model.text_proj, self.hidden, strict=True)
        ]
        return levels, lengths.to(device)


def set_trainable(model: HATModel, cfg: TrainConfig, epoch: int) -> None:
    model.image_encoder.swin.requires_grad_(epoch >= cfg.freeze_image_epochs)
    model.text_encoder.requires_grad_(epoch >= cfg.freeze_text_epochs)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    cfg: TrainConfig,
    dataset: Path,
    images: Path,
    out: Path,
    *,
    resume: bool = False,
    image_weights: str | None = None,
    text_weights: str | None = None,
    device: str = "cpu",
) -> dict:
    """Run training; returns ``{"best_rsum", "history", "seconds", "images_per_second", ...}``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    entries = read_karpathy(dataset, images, "train")
    if cfg.train_images:
        entries = entries[: cfg.train_images]
    val_entries = read_karpathy(dataset, images, "val")[: cfg.val_images]
    model = build_model(cfg, image_weights, text_weights).to(torch.device(device))
    cfg.model = model.config.to_dict()
    text_frozen_all_run = cfg.freeze_text_epochs >= cfg.epochs
    params = [p for n, p in model.named_parameters() if not (text_frozen_all_run and n.startswith("text_encoder."))]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    steps_per_epoch = len(entries) // cfg.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    state = {"epoch": -1, "best_rsum": -1.0, "history": [], "seconds": 0.0, "images": 0}
    if resume and (out / "last.pt").exists():
        saved = _read_resume_state(out / "last.pt")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        logger.info("resumed from %s after epoch %d", out / "last.pt", state["epoch"])
    texts, _ = caption_table(entries)
    store = Path(cfg.text_cache_dir) if cfg.text_cache_dir else None
    cache = TextCache(model.eval(), texts, store=store) if text_frozen_all_run else None
    val_cache = TextCache(model, caption_table(val_entries)[0], store=store) if text_frozen_all_run else None
    size = model.config.image.image_size
    if cfg.augment:
        dataset_t = ImageDataset(entries, TrainTransform(size, cfg.crop_scale, cfg.flip))
    else:
        dataset_t = PreloadedImages(entries, size)
    if cfg.pretrain_epochs and state["epoch"] < 0 and "pretrain" not in state:
        _pretrain(model, cfg, entries, dataset_t, state)
        _save_training_state(out, model, optimizer, scheduler, state, cfg)
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        started = time.perf_counter()
        model.train()
        set_trainable(model, cfg, epoch)
        loader, picks = _epoch_loader(cfg, dataset_t, epoch)
        losses = _run_epoch(model, cfg, epoch, loader, picks, texts, cache, optimizer, scheduler)
        seconds = time.perf_counter() - started
        state["seconds"] += seconds
        state["images"] += len(loader) * cfg.batch_size
        val = evaluate_encoded(model.eval(), encode_split(model, val_entries, text_cache=val_cache), "all")
        _record(state, epoch, losses, seconds, val)
        if val["hat"]["rsum"] > state["best_rsum"]:
            state["best_rsum"] = val["hat"]["rsum"]
            save_model(model, out / "best")
        state["epoch"] = epoch
        _save_training_state(out, model, optimizer, scheduler, state, cfg)
        if cfg.max_minutes and state["seconds"] + seconds > cfg.max_minutes * 60:
            logger.info("stopping: another epoch would exceed the %.0f-minute budget", cfg.max_minutes)
            break
    hat_seconds = state["seconds"] - state.get("pretrain_seconds", 0.0)
    state["images_per_second"] = round(state["images"] / max(hat_seconds, 1e-9), 1)
    return state


def _pretrain(model: HATModel, cfg: TrainConfig, entries, dataset: ImageDataset, state: dict) -> None:
    """The image encoder's n-gram warm-up (:mod:`training.word_pretrain`); records go to ``state["pretrain"]``."""
    from .word_pretrain import ngram_targets, pretrain_image_encoder

    vocab, targets = ngram_targets([entry.captions for entry in entries])
    logger.info("n-gram pre-training on a vocabulary of %d: %s, ...", len(vocab), ", ".join(vocab[:8]))
    started = time.perf_counter()
    state["pretrain"] = pretrain_image_encoder(
        model,
        lambda k: _epoch_loader(cfg, dataset, -1 - k)[0],
        targets,
        cfg.pretrain_epochs,
        cfg.pretrain_lr,
        lambda: _autocast(cfg.amp, model.device),
        levels=cfg.pretrain_levels,
    )
    state["pretrain_seconds"] = time.perf_counter() - started
    state["seconds"] += state["pretrain_seconds"]


def _save_training_state(out: Path, model, optimizer, scheduler, state: dict, cfg: TrainConfig) -> None:
    _save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
            "train_config": _plain(dataclasses.asdict(cfg)),
        },
        out / "last.pt",
    )


def lr_factor(cfg: TrainConfig, steps_per_epoch: int):
    """The learning-rate multiplier as a function of the optimizer step (for ``LambdaLR``)."""
    total = max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        if cfg.lr_schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))
        if cfg.lr_schedule == "step":
            return warm * cfg.lr_gamma ** (step // max(1, steps_per_epoch) // cfg.lr_step)
        raise HATError(f"lr_schedule must be step or cosine, got {cfg.lr_schedule!r}")

    return factor


class PreloadedImages(ImageDataset):
    """The eval transform's pixels of every image, decoded once and kept as uint8 ``[N, 3, S, S]``.

    For worlds that need no augmentation (the model underfits them): training then sees exactly what
    evaluation sees, and no decoding competes with the model for the CPU.
    """

    def __init__(self, entries, image_size: int) -> None:
        super().__init__(entries, EvalTransform(image_size))
        self.pixels = torch.empty(len(entries), 3, image_size, image_size, dtype=torch.uint8)
        for i, entry in enumerate(entries):  # the eval transform up to ToTensor, kept as bytes
            self.pixels[i] = pil_to_tensor(resized_crop(load_image(entry.path), image_size))
        logger.info("decoded %d training images into memory", len(entries))

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Normalised float pixels ``[B, 3, S, S]`` of the given images (as the eval transform gives them)."""
        return normalize(self.pixels[index].float() / 255)


class _PreloadedBatches:
    def __init__(self, dataset: PreloadedImages, order: torch.Tensor, batch_size: int) -> None:
        self.dataset, self.order, self.batch_size = dataset, order, batch_size

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __iter__(self):
        for b in range(len(self)):
            index = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.dataset.batch(index), index


def _epoch_loader(cfg: TrainConfig, dataset: ImageDataset, epoch: int) -> tuple[DataLoader, torch.Tensor]:
    """The epoch's shuffled image batches and, per image, the caption drawn for it (both seeded by epoch)."""
    seed = cfg.seed * 1000 + epoch
    picks = torch.tensor(pick_captions(dataset.entries, random.Random(seed)))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    if isinstance(dataset, PreloadedImages):
        return _PreloadedBatches(dataset, order, cfg.batch_size), picks
    loader = DataLoader(
        torch.utils.data.Subset(dataset, order.tolist()),
        batch_size=cfg.batch_size,
        drop_last=True,
        num_workers=cfg.workers,
    )
    return loader, picks


def _record(state: dict, epoch: int, losses: list[float], seconds: float, val: dict) -> None:
    record = {
        "epoch": epoch,
        "loss": round(sum(losses) / max(1, len(losses)), 4),
        "seconds": round(seconds, 1),
        "val_hat_rsum": val["hat"]["rsum"],
        "val_global_rsum": val["global"]["rsum"],
        "val_hat_t2i_r1": val["hat"]["t2i"]["r1"],
        "val_global_t2i_r1": val["global"]["t2i"]["r1"],
        "val_hat_i2t_r1": val["hat"]["i2t"]["r1"],
    }
    state["history"].append(record)
    logger.info("epoch %d: %s", epoch, record)


def _plain(obj):
    """Make a config JSON/weights-only friendly (tuples -> lists)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _run_epoch(model, cfg, epoch, loader, picks, texts, cache, optimizer, scheduler) -> list[float]:
    from tqdm import tqdm

    hardest = epoch >= cfg.hardest_from_epoch
    # float16 autocast needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(model.device.type, enabled=amp_dtype(cfg.amp, model.device) == torch.float16)
    losses: list[float] = []
    bar = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None)
    seen, started = 0, time.perf_counter()
    for pixels, index in bar:
        caption_index = picks[index]
        with _autocast(cfg.amp, model.device):
            image_levels = model.encode_images(pixels.to(model.device))
            if cache is not None:
                text_levels, lengths = cache.project(model, caption_index)
            else:
                text_levels, lengths = model.encode_text_strings([texts[i] for i in caption_index.tolist()])
        scores = model.similarity(image_levels, text_levels, lengths)
        if cfg.hat_loss == "infonce":
            loss = info_nce_scores(scores, cfg.hat_temperature)
        else:
            loss = vse_hinge_loss(scores, cfg.margin, hardest)
        if cfg.global_weight:
            loss = loss + cfg.global_weight * info_nce_loss(
                model.global_images(image_levels), model.global_texts(text_levels, lengths), cfg.global_temperature
            )
        if not math.isfinite(loss.item()):
            raise HATError(f"loss became {loss.item()} at epoch {epoch}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
        seen += pixels.shape[0]
        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - started):.1f}")
    return losses
