"""The HAT authors' checkpoint layout: architecture inference and key conversion (pure functions).

The authors' PyTorch Lightning checkpoints (their published Flickr30K / MSCOCO ones and
``hat_reference_small.ckpt``) hold, under ``state_dict``:

* ``vit_model.*``: Swin in the timm 0.4.12 layout: ``layers.{i}.downsample`` sits at the END of stage ``i``
  (current timm puts it at the START of stage ``i + 1``), the buffers ``relative_position_index`` and
  ``attn_mask`` are stored, ``norm_{k}`` are extra LayerNorms on stage ``k``'s output and ``norm`` is the
  last stage's.
* ``text_transformer.*``: a BERT with HF names (its pooler is unused by HAT).
* ``cross_modal_image_transform{,_1,_2}`` / ``cross_modal_text_transform{,_1,_2}``: the per-level Linear
  projections; the suffix ``_1`` is level 1 (finest), ``_2`` level 2 and no suffix the last level.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from .config import HATConfig, SwinConfig, TextConfig
from .errors import CheckpointError

logger = logging.getLogger(__name__)

IMAGE_PREFIX = "vit_model."
TEXT_PREFIX = "text_transformer."
PROJ_SUFFIXES = ("_1", "_2", "")  # level 1, level 2, level 3 in the authors' naming
HAT_TEXT_LAYERS = (4, 10, 12)
# Keys the authors store that HAT's forward pass never reads.
_IGNORED = (
    re.compile(r"^vit_model\..*\.(attn_mask|relative_position_index)$"),
    re.compile(r"^vit_model\.head\."),
    re.compile(r"^text_transformer\.pooler\."),
    re.compile(r"^text_transformer\.embeddings\.position_ids$"),
)
_LAYER_RE = re.compile(r"^vit_model\.layers\.(\d+)\.(blocks\.(\d+)\.|downsample\.)")
_BERT_LAYER_RE = re.compile(r"^text_transformer\.encoder\.layer\.(\d+)\.")


def is_authors_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True when the keys look like the authors' layout (Swin, BERT and projection groups present)."""
    keys = state_dict.keys()
    return (
        any(k.startswith(IMAGE_PREFIX) for k in keys)
        and any(k.startswith(TEXT_PREFIX) for k in keys)
        and "cross_modal_image_transform.weight" in keys
    )


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(f"checkpoint is missing the key {key!r}")
    return tuple(state_dict[key].shape)


def _infer_swin(sd: Mapping[str, torch.Tensor], image_size: int) -> SwinConfig:
    embed, _, patch, _ = _shape(sd, "vit_model.patch_embed.proj.weight")
    blocks: dict[int, set[int]] = {}
    for key in sd:
        match = _LAYER_RE.match(key)
        if match and match.group(3) is not None:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(3)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"cannot read the Swin stages from the checkpoint (found stages {sorted(blocks)})")
    depths = tuple(len(blocks[i]) for i in range(len(blocks)))
    heads = tuple(
        _shape(sd, f"vit_model.layers.{i}.blocks.0.attn.relative_position_bias_table")[1] for i in range(len(depths))
    )
    table_rows = _shape(sd, "vit_model.layers.0.blocks.0.attn.relative_position_bias_table")[0]
    side = math.isqrt(table_rows)
    if side * side != table_rows:
        raise CheckpointError(f"relative position table of {table_rows} rows is not a (2w-1)^2 square")
    hidden = _shape(sd, "vit_model.layers.0.blocks.0.mlp.fc1.weight")[0]
    if "vit_model.absolute_pos_embed" in sd:
        raise CheckpointError("Swin with absolute position embedding (ape=True) is not supported")
    return SwinConfig(
        image_size=image_size,
        patch_size=patch,
        embed_dim=embed,
        depths=depths,
        num_heads=heads,
        window_size=(side + 1) // 2,
        mlp_ratio=hidden / embed,
        qkv_bias="vit_model.layers.0.blocks.0.attn.qkv.bias" in sd,
    )


def _infer_text(sd: Mapping[str, torch.Tensor], num_heads: int | None) -> TextConfig:
    vocab, hidden = _shape(sd, "text_transformer.embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in sd if (m := _BERT_LAYER_RE.match(k))}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise CheckpointError(f"cannot read the BERT layers from the checkpoint (found {sorted(layers)})")
    heads = num_heads if num_heads else max(1, hidden // 64)
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        intermediate_size=_shape(sd, "text_transformer.encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=_shape(sd, "text_transformer.embeddings.position_embeddings.weight")[0],
        type_vocab_size=_shape(sd, "text_transformer.embeddings.token_type_embeddings.weight")[0],
    )


def _text_layers(num_layers: int, hparams: Mapping[str, Any]) -> tuple[int, ...]:
    if "text_layers" in hparams:
        return tuple(int(x) for x in hparams["text_layers"])
    if num_layers == 12:
        return HAT_TEXT_LAYERS
    # The authors only trained 12-layer BERTs; scale HAT's depths (4/12, 10/12, 12/12) to other depths.
    scaled = tuple(max(1, round(num_layers * k / 12)) for k in HAT_TEXT_LAYERS)
    logger.warning("text encoder has %d layers, not 12: using layers %s for the levels", num_layers, scaled)
    return scaled


def infer_authors_config(
    state_dict: Mapping[str, torch.Tensor],
    hparams: Mapping[str, Any] | None = None,
    *,
    text_heads: int | None = None,
) -> HATConfig:
    """Read a :class:`HATConfig` from an authors' state dict (tensor shapes) and Lightning hyper-parameters.

    Args:
        state_dict: the checkpoint's ``state_dict`` (authors' key names).
        hparams: ``hyper_parameters["config"]`` (``image_size``, ``max_text_len``, ``lambda_softmax``, ...).
        text_heads: BERT attention heads; default ``hidden_size / 64`` as in every BERT the authors used.
    """
    hparams = dict(hparams or {})
    image = _infer_swin(state_dict, int(hparams.get("image_size", 224)))
    text = _infer_text(state_dict, text_heads or hparams.get("text_num_attention_heads"))
    embed_dim = _shape(state_dict, "cross_modal_image_transform.weight")[0]
    stage_of_dim = {dim: i for i, dim in enumerate(image.stage_dims())}
    stages = []
    for suffix in PROJ_SUFFIXES:
        in_dim = _shape(state_dict, f"cross_modal_image_transform{suffix}.weight")[1]
        if in_dim not in stage_of_dim:
            raise CheckpointError(
                f"cross_modal_image_transform{suffix} takes {in_dim} features, which no Swin stage "
                f"(widths {image.stage_dims()}) produces"
            )
        stages.append(stage_of_dim[in_dim])
    return HATConfig(
        image=image,
        text=text,
        embed_dim=embed_dim,
        image_stages=tuple(stages),
        text_layers=_text_layers(text.num_hidden_layers, hparams),
        lambda_softmax=float(hparams.get("lambda_softmax", 9.0)),
        direction=str(hparams.get("direction", "i2t")),
        max_text_len=int(hparams.get("max_text_len", 32)),
        source="authors-ckpt",
    )


def convert_authors_state_dict(
    state_dict: Mapping[str, torch.Tensor], image_stages: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Rename an authors' state dict to this project's ``HATModel`` names (pure: nothing is modified).

    ``image_stages`` are the Swin stages of levels 1..3 (from :func:`infer_authors_config`). Ignored keys
    (Swin buffers, BERT pooler, classifier head, unused stage norms) are dropped; any other key that has no
    place in HAT is kept under its original name so that loading reports it as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    proj_names = {f"cross_modal_image_transform{s}": f"image_proj.{i}" for i, s in enumerate(PROJ_SUFFIXES)}
    proj_names |= {f"cross_modal_text_transform{s}": f"text_proj.{i}" for i, s in enumerate(PROJ_SUFFIXES)}
    last_stage = None
    for key in state_dict:
        match = _LAYER_RE.match(key)
        if match:
            last_stage = max(last_stage or 0, int(match.group(1)))
    for key, value in state_dict.items():
        if any(p.match(key) for p in _IGNORED):
            continue
        new = _convert_key(key, proj_names, image_stages, last_stage)
        if new is not None:
            out[new] = value
    return out


def _convert_key(
    key: str, proj_names: dict[str, str], image_stages: tuple[int, ...], last_stage: int | None
) -> str | None:
    """One key -> its new name, ``None`` to drop it, or the key itself when it has no place in HAT."""
    if key.startswith(TEXT_PREFIX):
        return "text_encoder.bert." + key[len(TEXT_PREFIX) :]
    module, _, param = key.rpartition(".")
    if module in proj_names:
        return f"{proj_names[module]}.{param}"
    if not key.startswith(IMAGE_PREFIX):
        return key
    rest = key[len(IMAGE_PREFIX) :]
    norm = re.match(r"^norm(?:_(\d+))?\.(weight|bias)$", rest)
    if norm:
        stage = int(norm.group(1)) if norm.group(1) is not None else last_stage
        if stage not in image_stages:
            return None  # e.g. norm_0: stage 1 is not a HAT level
        return f"image_encoder.level_norms.{image_stages.index(stage)}.{norm.group(2)}"
    return "image_encoder.swin." + swin_v1_key(rest)


def swin_v1_key(key: str) -> str:
    """A Swin key in the timm 0.4.x / official layout -> current timm's name.

    timm 0.4.12 puts ``layers.{i}.downsample`` at the end of stage ``i``; current timm at the start of ``i + 1``.
    """
    down = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
    if down:
        return f"layers.{int(down.group(1)) + 1}.downsample.{down.group(2)}"
    return key


def convert_swin_v1_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ImageNet Swin state dict (official / timm 0.4.x layout, or already current) -> current timm names.

    Pure. Drops the classifier head and the stored ``attn_mask`` / ``relative_position_index`` buffers;
    a dict already in the current layout (no parameters under ``layers.0.downsample``) keeps its names.
    """
    old_layout = any(k.startswith("layers.0.downsample.") for k in state_dict)
    return {
        (swin_v1_key(k) if old_layout else k): v
        for k, v in state_dict.items()
        if not k.startswith("head") and not k.endswith(("attn_mask", "relative_position_index"))
    }
