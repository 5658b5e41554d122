"""The HAT model: a Swin image encoder and a BERT text encoder, matched level by level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import hierarchical_similarity
from .config import HATConfig, SwinConfig, TextConfig
from .errors import TokenizerError


class ImageEncoder(nn.Module):
    """timm Swin Transformer returning chosen stage outputs, each through its own LayerNorm.

    HAT's LayerNorms are the authors' ``norm_1``, ``norm_2`` (stages 2, 3) and Swin's final ``norm`` (stage 4);
    here they are ``level_norms[0..]`` in the order of ``stages``.
    """

    def __init__(self, cfg: SwinConfig, stages: Sequence[int]) -> None:
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        self.stages = tuple(stages)
        self.swin = SwinTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depths=tuple(cfg.depths),
            num_heads=tuple(cfg.num_heads),
            window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path_rate,
            num_classes=0,
        )
        # The final norm and the classifier head are not part of HAT's path: level_norms own the norms.
        self.swin.norm = nn.Identity()
        self.swin.head = nn.Identity()
        dims = cfg.stage_dims()
        self.level_norms = nn.ModuleList(nn.LayerNorm(dims[s]) for s in self.stages)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` -> per level ``[B, R_l, C_l]`` (stage tokens in row-major order)."""
        x = self.swin.patch_embed(pixels)
        outs: list[torch.Tensor] = []
        last = max(self.stages)
        for index, stage in enumerate(self.swin.layers[: last + 1]):
            x = stage(x)  # NHWC
            if index in self.stages:
                norm = self.level_norms[self.stages.index(index)]
                outs.append(norm(x.flatten(1, 2)))
        return outs


class TextEncoder(nn.Module):
    """HF ``BertModel`` returning the hidden states of chosen layers (``hidden_states[k]``)."""

    def __init__(self, cfg: TextConfig, layers: Sequence[int]) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.layers = tuple(layers)
        bert_cfg = BertConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            type_vocab_size=cfg.type_vocab_size,
            layer_norm_eps=cfg.layer_norm_eps,
            hidden_act=cfg.hidden_act,
        )
        bert_cfg._attn_implementation = "sdpa"
        self.bert = BertModel(bert_cfg, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """``[B, L]`` ids and mask -> per level ``[B, L, H]`` hidden states (token type ids all zero)."""
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            output_hidden_states=True,
            return_dict=True,
        )
        return [out.hidden_states[k] for k in self.layers]


class HATModel(nn.Module):
    """HAT: per-level projections of Swin and BERT features into a joint space of size ``embed_dim``.

    Levels are ordered fine to coarse: level 1 pairs ``image_stages[0]`` with ``text_layers[0]``.
    """

    def __init__(self, config: HATConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.image, config.image_stages)
        self.text_encoder = TextEncoder(config.text, config.text_layers)
        dims = config.image.stage_dims()
        self.image_proj = nn.ModuleList(nn.Linear(dims[s], config.embed_dim) for s in config.image_stages)
        self.text_proj = nn.ModuleList(nn.Linear(config.text.hidden_size, config.embed_dim) for _ in config.text_layers)
        if config.global_dim:
            self.global_image_head = nn.Linear(config.embed_dim, config.global_dim)
            self.global_text_head = nn.Linear(config.embed_dim, config.global_dim)
        self.tokenizer = None  # a model.tokenizer.HATTokenizer, attached by the loaders
        self.identity = ""  # SHA-256 of the weights file, set by the loaders

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_images(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` normalised pixels -> per level ``[B, R_l, D]``, fine to coarse."""
        feats = self.image_encoder(pixels)
        return [proj(f) for proj, f in zip(self.image_proj, feats, strict=True)]

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """``[B, L]`` token ids and mask -> per level ``[B, L, D]`` (padding positions included)."""
        vocab = self.config.text.vocab_size
        if input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
            raise TokenizerError(
                f"token ids must lie in [0, {vocab}) for this text encoder, got {int(input_ids.min())}.."
                f"{int(input_ids.max())}: the tokenizer's vocabulary does not match the model"
            )
        if input_ids.shape[1] > self.config.text.max_position_embeddings:
            raise TokenizerError(
                f"{input_ids.shape[1]} tokens exceed the text encoder's "
                f"{self.config.text.max_position_embeddings} positions"
            )
        feats = self.text_encoder(input_ids, attention_mask)
        return [proj(f) for proj, f in zip(self.text_proj, feats, strict=True)]

    def similarity(
        self,
        image_levels: Sequence[torch.Tensor],
        text_levels: Sequence[torch.Tensor],
        text_lengths: torch.Tensor | Sequence[int],
        direction: str | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """HAT score ``[N_images, N_texts]``: per-level SCAN scores summed, in the configured direction."""
        return hierarchical_similarity(
            image_levels,
            text_levels,
            text_lengths,
            self.config.lambda_softmax,
            direction or self.config.direction,
            **kwargs,
        )

    def global_images(self, image_levels: Sequence[torch.Tensor], use_head: bool = True) -> torch.Tensor:
        """First-stage vectors ``[B, G]`` (unit norm) from ``encode_images`` output.

        The mean of the last level's tokens, through the trained global head when the model has one
        (``config.global_dim > 0``); the authors' checkpoints have none and use the mean alone.
        """
        pooled = image_levels[-1].float().mean(dim=1)
        if self.config.global_dim and use_head:
            pooled = self.global_image_head(pooled.to(self.global_image_head.weight.dtype))
        return F.normalize(pooled.float(), dim=-1)

    def global_texts(
        self, text_levels: Sequence[torch.Tensor], lengths: torch.Tensor, use_head: bool = True
    ) -> torch.Tensor:
        """First-stage vectors ``[B, G]`` (unit norm): mean of the last level over each caption's tokens.

        ``use_head=False`` gives the fallback used for models without a trained head, for comparison.
        """
        last = text_levels[-1].float()
        valid = (torch.arange(last.shape[1], device=last.device)[None, :] < lengths.to(last.device)[:, None]).float()
        pooled = (last * valid[..., None]).sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)
        if self.config.global_dim and use_head:
            pooled = self.global_text_head(pooled.to(self.global_text_head.weight.dtype))
        return F.normalize(pooled.float(), dim=-1)

    def encode_text_strings(self, texts: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Tokenise and encode captions: -> (per level ``[B, L, D]``, lengths ``[B]``)."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer attached; load it with model.load_model")
        batch = self.tokenizer(texts)
        device = self.device
        levels = self.encode_texts(batch.input_ids.to(device), batch.attention_mask.to(device))
        return levels, batch.lengths.to(device)
