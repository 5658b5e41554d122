"""What a training run depends on: ``TrainConfig`` (stored in ``OUT/last.pt`` for resuming)."""

from __future__ import annotations

from dataclasses import dataclass, field

NEVER = 10**6  # an epoch no run reaches: "never" for the freeze and hardest-negative schedules


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
    pretrain_levels: int = 1  # n-gram heads on this many levels, counted from the last (training.word_pretrain)
    text_cache_dir: str = ""  # keep frozen-text features here for re-use by later runs ("" = in memory only)
    model: dict = field(default_factory=dict)
