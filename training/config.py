"""What a training run depends on: ``TrainConfig`` (stored in ``OUT/last.pt`` for resuming).

Each field's ``metadata`` holds its command-line help (``help``) and, for a field with a fixed set of values,
its ``choices``: ``python -m training.train`` makes one option of each field from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NEVER = 10**6  # an epoch no run reaches: "never" for the freeze and hardest-negative schedules


def _option(default: Any, text: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field with its command-line help ``text`` (and choices)."""
    metadata = {"help": text} if choices is None else {"help": text, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in ``last.pt`` for resuming)."""

    preset: str = "demo"
    epochs: int = _option(20, "epochs of HAT's losses (after the --pretrain-epochs warm-up)")
    batch_size: int = _option(64, "images per batch, one caption each")
    lr: float = _option(1e-4, "Adam learning rate")
    lr_step: int = _option(
        10, "with --lr-schedule step: multiply the learning rate by --lr-gamma every this many epochs"
    )
    lr_gamma: float = _option(0.1, "the learning-rate factor of the step schedule")
    lr_schedule: str = _option(
        "step",
        "step: x --lr-gamma every --lr-step epochs; cosine: per optimizer step, down to 0 at the last epoch",
        ("step", "cosine"),
    )
    warmup_steps: int = _option(
        0, "linear learning-rate warm-up from 0 over this many optimizer steps (either schedule)"
    )
    margin: float = _option(0.2, "margin of the VSE++ hinge loss")
    hardest_from_epoch: int = _option(
        2, "from this epoch on the hinge takes the hardest negative; before it, it sums all violations (VSE0)"
    )
    freeze_image_epochs: int = _option(0, "epochs with the image backbone (Swin) frozen")
    freeze_text_epochs: int = _option(NEVER, "epochs with the text backbone (BERT) frozen")
    global_weight: float = _option(1.0, "weight of the InfoNCE loss on the first-stage (global) vectors")
    hat_loss: str = _option(
        "vse",
        "vse: VSE++ hinge on the batch's HAT score matrix (the paper); infonce: InfoNCE on it",
        ("vse", "infonce"),
    )
    hat_temperature: float = _option(0.1, "InfoNCE temperature of --hat-loss infonce")
    global_temperature: float = _option(0.05, "InfoNCE temperature of the global-vector loss")
    crop_scale: tuple[float, float] = (0.7, 1.0)  # RandomResizedCrop's scale (from the preset; no option)
    flip: bool = _option(False, "random horizontal flips (with --augment true); wrong for captions saying left/right")
    augment: bool = _option(
        True,
        "true: RandomResizedCrop with the preset's scale; false: train on the evaluation transform's pixels, decoded "
        "once and kept in memory",
    )
    amp: str = _option(
        "auto",
        "mixed precision: auto (fp16 on CUDA, bf16 on CPUs with native bf16), bf16, fp16 or off",
        ("auto", "bf16", "fp16", "off"),
    )
    workers: int = _option(1, "data-loading worker processes")
    val_images: int = _option(200, "validation images scored after each epoch (the best RSUM is saved as OUT/best)")
    train_images: int = _option(0, "train on the first N training images only (0 = all)")
    seed: int = _option(0, "random seed (initialisation, batches, augmentation)")
    max_minutes: float = _option(0.0, "stop after this many minutes of wall time (0 = no time budget)")
    pretrain_epochs: int = _option(
        0, "epochs of caption n-gram prediction that warm the image encoder up before HAT's losses"
    )
    pretrain_lr: float = _option(3e-4, "learning rate of the n-gram warm-up")
    pretrain_levels: int = _option(
        1, "n-gram heads on this many levels, counted from the last (training.word_pretrain)"
    )
    text_cache_dir: str = _option(
        "", "keep the frozen text encoder's features here for re-use by later runs (empty = in memory only)"
    )
    model: dict = field(default_factory=dict)
