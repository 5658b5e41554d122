"""Training losses: VSE++ hinge on the HAT score matrix, and InfoNCE for the first-stage vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vse_hinge_loss(scores: torch.Tensor, margin: float = 0.2, hardest: bool = True) -> torch.Tensor:
    """VSE++ triplet loss on a batch score matrix ``[B, B]`` whose diagonal holds the matching pairs.

    ``hardest=True`` keeps only the hardest negative per image and per caption (VSE++, as HAT);
    ``False`` sums over all negatives (VSE0), a gentler start for encoders trained from scratch.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square [B, B] matrix, got {tuple(scores.shape)}")
    positive = scores.diag()
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = (margin + scores - positive[:, None]).clamp_min(0).masked_fill(eye, 0)  # image i vs caption j
    cost_image = (margin + scores - positive[None, :]).clamp_min(0).masked_fill(eye, 0)  # caption j vs image i
    if hardest:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()


def info_nce_loss(image_vectors: torch.Tensor, text_vectors: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE on unit vectors ``[B, G]`` x ``[B, G]`` (matching pairs on the diagonal)."""
    return info_nce_scores(image_vectors @ text_vectors.T, temperature)


def info_nce_scores(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE on a batch score matrix ``[B, B]`` whose diagonal holds the matching pairs."""
    logits = scores.float() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
