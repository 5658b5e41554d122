"""Recall metrics on hand-made score matrices with known ranks."""

from __future__ import annotations

import pytest
import torch

from training.evaluate import format_table, ranks_i2t, ranks_t2i, recalls
from training.losses import info_nce_loss, vse_hinge_loss


def owner_of(n_images: int, per_image: int = 5) -> torch.Tensor:
    return torch.arange(n_images).repeat_interleave(per_image)


def test_perfect_scores():
    owner = owner_of(3)
    scores = (owner[None, :] == torch.arange(3)[:, None]).float()
    r = recalls(scores, owner)
    assert r["i2t"] == {"r1": 100.0, "r5": 100.0, "r10": 100.0}
    assert r["t2i"] == {"r1": 100.0, "r5": 100.0, "r10": 100.0}
    assert r["rsum"] == 600.0


def test_known_ranks_with_five_captions_per_image():
    owner = owner_of(2)  # captions 0-4 belong to image 0, 5-9 to image 1
    scores = torch.tensor(
        [
            # image 0: its best caption (0.9) is beaten by caption 7 (0.95) -> i2t rank 1
            [0.9, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.95, 0.0, 0.0],
            # image 1: its best caption (0.8) beats all wrong ones -> rank 0
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.2, 0.3, 0.2, 0.2],
        ]
    )
    assert ranks_i2t(scores, owner).tolist() == [1, 0]
    # t2i: caption j ranks its own image among 2; caption 7 scores image 0 higher (0.95 > 0.3)
    assert ranks_t2i(scores, owner).tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    r = recalls(scores, owner)
    assert r["i2t"]["r1"] == 50.0 and r["i2t"]["r5"] == 100.0
    assert r["t2i"]["r1"] == 90.0


def test_ties_count_against_the_model():
    owner = owner_of(4, per_image=1)
    constant = torch.zeros(4, 4)
    r = recalls(constant, owner)
    assert r["i2t"]["r1"] == 0.0 and r["t2i"]["r1"] == 0.0
    # A tie with exactly one wrong candidate gives rank 1: inside R@5 but not R@1.
    scores = torch.eye(4)
    scores[0, 1] = 1.0
    assert ranks_i2t(scores, owner).tolist() == [1, 0, 0, 0]
    assert ranks_t2i(scores, owner).tolist() == [0, 1, 0, 0]


def test_duplicate_captions_of_one_image_do_not_count_as_wrong():
    owner = owner_of(2, per_image=2)
    scores = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.1, 0.1, 0.7, 0.7]])  # duplicates tie with each other
    assert ranks_i2t(scores, owner).tolist() == [0, 0]
    assert ranks_t2i(scores, owner).tolist() == [0, 0, 0, 0]


def test_recall_at_k_thresholds():
    owner = owner_of(12, per_image=1)
    scores = torch.zeros(12, 12)
    # Caption j's own image ranks exactly j-th: j wrong images score higher.
    for j in range(12):
        scores[:, j] = torch.arange(12, 0, -1).float()
        scores[j, j] = 12 - j + 0.5 - 1
    ranks = ranks_t2i(scores, owner)
    assert ranks.tolist() == list(range(12))
    r = recalls(scores, owner)["t2i"]
    assert (r["r1"], r["r5"], r["r10"]) == (round(100 / 12, 2), round(500 / 12, 2), round(1000 / 12, 2))


def test_table_lists_variants():
    owner = owner_of(2, per_image=1)
    res = {"hat": recalls(torch.eye(2), owner), "global": recalls(torch.zeros(2, 2), owner)}
    table = format_table(res, "t")
    assert "hat" in table and "global" in table and "600.00" in table


def test_vse_hinge_loss_values():
    scores = torch.tensor([[1.0, 0.5], [0.9, 0.2]])
    # image 0: caption 1 violates by max(0, 0.2 + 0.5 - 1.0) = 0; image 1: caption 0: 0.2 + 0.9 - 0.2 = 0.9
    # caption 0: image 1: 0.2 + 0.9 - 1.0 = 0.1; caption 1: image 0: 0.2 + 0.5 - 0.2 = 0.5
    assert vse_hinge_loss(scores, 0.2).item() == pytest.approx(0.0 + 0.9 + 0.1 + 0.5)
    assert vse_hinge_loss(scores, 0.2, hardest=False).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="square"):
        vse_hinge_loss(torch.zeros(2, 3))


def test_info_nce_prefers_matching_pairs():
    v = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    assert info_nce_loss(v, v).item() < info_nce_loss(v, v.roll(1, 0)).item()
