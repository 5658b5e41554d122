"""A fresh model for a training run, with its pretrained parts: the packaged text encoder, ImageNet Swin
weights (official or timm layout, or the hub), BERT weights (a Hugging Face directory, or the hub)."""

from __future__ import annotations

import logging
import pickle

import torch

from model.authors import convert_swin_v1_state_dict
from model.checkpoint import unpickling_detail
from model.config import HATConfig
from model.errors import HATError
from model.hat import HATModel
from model.pretrained import package_text_state
from model.tokenizer import HATTokenizer

from .config import TrainConfig
from .presets import PRESETS

logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, image_weights: str | None, text_weights: str | None) -> HATModel:
    """A fresh model for the preset with its pretrained parts loaded."""
    model_cfg = HATConfig.from_dict(cfg.model) if cfg.model else PRESETS[cfg.preset][0]()
    model = HATModel(model_cfg)
    if model_cfg.text_weights:
        missing = model.load_state_dict(package_text_state(model_cfg.text_weights.split(":", 1)[1]), strict=False)
        if any(k.startswith("text_encoder.") for k in missing.missing_keys):
            raise HATError(f"package text weights do not fit: {missing.missing_keys[:5]}")
    if image_weights:
        load_pretrained_swin(model, image_weights)
    if text_weights:
        load_pretrained_bert(model, text_weights)
    model.tokenizer = HATTokenizer(max_length=model_cfg.max_text_len)
    return model


def load_pretrained_swin(model: HATModel, source: str) -> None:
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


def load_pretrained_bert(model: HATModel, source: str) -> None:
    from transformers import BertModel

    try:
        ref = BertModel.from_pretrained("bert-base-uncased" if source == "hub" else source, add_pooling_layer=False)
    except pickle.UnpicklingError as exc:  # a pytorch_model.bin that weights_only loading refuses
        raise HATError(f"cannot read BERT weights from {source}: {unpickling_detail(exc)}") from exc
    model.text_encoder.bert.load_state_dict(ref.state_dict(), strict=False)
    logger.info("loaded pretrained BERT from %s", source)
