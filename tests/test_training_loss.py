"""BCE + Dice on low-res logits: known answers and the per-mask averaging."""

from __future__ import annotations

import math

import pytest
import torch

from modeling_dbsam.losses import DICE_SMOOTH, bce_dice_loss, bce_loss, dice_loss


def test_zero_logits_give_known_values():
    targets = torch.zeros(1, 1, 4, 4)
    targets[..., :2, :2] = 1  # 4 of 16 pixels
    logits = torch.zeros_like(targets)  # p = 0.5 everywhere
    assert bce_loss(logits, targets).item() == pytest.approx(math.log(2))
    # 1 - (2 * 0.5 * 4 + s) / (16 * 0.25 + 4 + s)
    expected = 1 - (4 + DICE_SMOOTH) / (8 + DICE_SMOOTH)
    assert dice_loss(logits, targets).item() == pytest.approx(expected)
    total = bce_dice_loss(logits, targets)
    assert total.loss.item() == pytest.approx(math.log(2) + expected)
    assert (total.bce.item(), total.dice.item()) == (pytest.approx(math.log(2)), pytest.approx(expected))


def test_bce_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=generator) * 3
    targets = (torch.rand(2, 1, 8, 8, generator=generator) > 0.5).float()
    p = torch.sigmoid(logits.double())
    by_hand = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert bce_loss(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_confident_correct_prediction_has_near_zero_dice_loss_even_for_an_empty_mask():
    targets = torch.zeros(2, 1, 8, 8)
    targets[0, 0, 2:5, 2:5] = 1  # mask 1 has an object, mask 2 is empty
    logits = (targets * 2 - 1) * 30
    assert dice_loss(logits, targets).item() < 1e-6


def test_dice_is_averaged_per_mask_not_pooled():
    """A missed small object costs as much as a missed large one."""
    targets = torch.zeros(2, 1, 16, 16)
    targets[0, 0, :2, :2] = 1  # small object, predicted as empty
    targets[1, 0, :, :12] = 1  # large object, predicted perfectly
    logits = torch.where(targets.bool(), 30.0, -30.0)
    logits[0] = -30.0
    assert dice_loss(logits, targets).item() == pytest.approx(0.5, abs=1e-4)  # (1 + 0) / 2
    pooled = 1 - 2 * (targets[1].sum()) / (2 * targets.sum())
    assert pooled.item() < 0.05  # what pooling would have said


def test_half_precision_logits_are_scored_in_float32():
    targets = torch.zeros(1, 1, 8, 8)
    targets[..., 2:6, 2:6] = 1
    logits = torch.randn(1, 1, 8, 8)
    loss = bce_dice_loss(logits.bfloat16(), targets)
    assert loss.loss.dtype == torch.float32
    assert loss.loss.item() == pytest.approx(bce_dice_loss(logits.bfloat16().float(), targets).loss.item())


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        bce_dice_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8))
