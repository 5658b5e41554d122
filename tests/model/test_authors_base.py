"""The authors' layout at the published sizes (Swin-B, BERT-base): inferred architecture and a full fit.

The key list is written here from the published checkpoints' layout, independently of the converter.
"""

from __future__ import annotations

import pytest
import torch

from model import HATModel
from model.authors import convert_authors_state_dict, infer_authors_config
from model.checkpoint import load_into

pytestmark = pytest.mark.slow


def authors_swin_b() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (128, 3, 4, 4),
        "patch_embed.proj.bias": (128,),
        "patch_embed.norm.weight": (128,),
        "patch_embed.norm.bias": (128,),
        "norm.weight": (1024,),
        "norm.bias": (1024,),
    }
    resolution = 56
    for i, (depth, heads) in enumerate(zip((2, 2, 18, 2), (4, 8, 16, 32), strict=True)):
        c = 128 * 2**i
        shapes[f"norm_{i}.weight"] = shapes[f"norm_{i}.bias"] = (c,) if i < 3 else None
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            for name in ("norm1", "norm2"):
                shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = (c,)
            shapes[p + "attn.relative_position_bias_table"] = (169, heads)
            shapes[p + "attn.relative_position_index"] = (49, 49)
            shapes[p + "attn.qkv.weight"], shapes[p + "attn.qkv.bias"] = (3 * c, c), (3 * c,)
            shapes[p + "attn.proj.weight"], shapes[p + "attn.proj.bias"] = (c, c), (c,)
            shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (4 * c, c), (4 * c,)
            shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (c, 4 * c), (c,)
            if j % 2 == 1 and resolution > 7:
                shapes[p + "attn_mask"] = ((resolution // 7) ** 2, 49, 49)
        if i < 3:
            shapes[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            shapes[f"layers.{i}.downsample.norm.weight"] = shapes[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
        resolution //= 2
    return {f"vit_model.{k}": v for k, v in shapes.items() if v is not None}


def authors_bert_base() -> dict[str, tuple[int, ...]]:
    h, ff = 768, 3072
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (30522, h),
        "embeddings.position_embeddings.weight": (512, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "embeddings.position_ids": (1, 512),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    for k in range(12):
        p = f"encoder.layer.{k}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"], shapes[p + f"attention.self.{name}.bias"] = (h, h), (h,)
        shapes[p + "attention.output.dense.weight"], shapes[p + "attention.output.dense.bias"] = (h, h), (h,)
        shapes[p + "attention.output.LayerNorm.weight"] = shapes[p + "attention.output.LayerNorm.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (ff, h), (ff,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (h, ff), (h,)
        shapes[p + "output.LayerNorm.weight"] = shapes[p + "output.LayerNorm.bias"] = (h,)
    return {f"text_transformer.{k}": v for k, v in shapes.items()}


def authors_hat_base() -> dict[str, torch.Tensor]:
    shapes = authors_swin_b() | authors_bert_base()
    for suffix, image_in in (("", 1024), ("_1", 256), ("_2", 512)):
        shapes[f"cross_modal_image_transform{suffix}.weight"] = (768, image_in)
        shapes[f"cross_modal_image_transform{suffix}.bias"] = (768,)
        shapes[f"cross_modal_text_transform{suffix}.weight"] = (768, 768)
        shapes[f"cross_modal_text_transform{suffix}.bias"] = (768,)
    integer = ("relative_position_index", "position_ids")
    return {k: torch.zeros(v, dtype=torch.long) if k.endswith(integer) else torch.zeros(v) for k, v in shapes.items()}


def test_published_sizes_are_inferred_and_fit():
    state_dict = authors_hat_base()
    config = infer_authors_config(state_dict, {"image_size": 224, "max_text_len": 32, "lambda_softmax": 9})
    swin = config.image
    assert (swin.patch_size, swin.embed_dim, swin.window_size, swin.mlp_ratio) == (4, 128, 7, 4.0)
    assert swin.depths == (2, 2, 18, 2) and swin.num_heads == (4, 8, 16, 32)
    assert [swin.stage_tokens()[s] for s in config.image_stages] == [784, 196, 49]
    assert [swin.stage_dims()[s] for s in config.image_stages] == [256, 512, 1024]
    text = config.text
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (
        30522,
        768,
        12,
        12,
    )
    assert (text.intermediate_size, text.max_position_embeddings) == (3072, 512)
    assert config.embed_dim == 768 and config.text_layers == (4, 10, 12) and config.image_stages == (1, 2, 3)
    model = HATModel(config)
    load_into(model, convert_authors_state_dict(state_dict, config.image_stages), "in-memory Swin-B/BERT-base")
    with torch.no_grad():
        levels = model.encode_images(torch.zeros(1, 3, 224, 224))
    assert [tuple(x.shape) for x in levels] == [(1, 784, 768), (1, 196, 768), (1, 49, 768)]
