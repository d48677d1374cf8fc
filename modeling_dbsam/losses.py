"""The paper's segmentation loss: binary cross-entropy plus Dice on the decoder's low-res mask logits.

DB-SAM (section 3.1) "employ[s] the sum of cross-entropy loss and dice loss", following MedSAM, whose
code sums ``BCEWithLogitsLoss`` and MONAI's ``DiceLoss(sigmoid=True, squared_pred=True)``. Both terms are
computed here in float32 (under bf16/fp16 autocast the logits are cast up first), each mask on its own
and then averaged over masks, so a small structure counts as much as a large one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5  # MONAI's smooth_nr = smooth_dr: keeps an empty prediction of an empty mask at loss 0


class SegmentationLoss(NamedTuple):
    """The total loss that is back-propagated and its two terms, for logging."""

    loss: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor


def _check_shapes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape "
            "(one target mask per predicted mask, at the low-res mask size)"
        )
    if logits.ndim < 3:
        raise ValueError(f"expected masks of shape (..., H, W) with a leading mask axis, got {tuple(logits.shape)}")


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s)`` per mask (p = sigmoid(logits)), mean over masks.

    ``logits`` and ``targets`` have shape ``(..., H, W)``; every leading index is one mask.
    """
    _check_shapes(logits, targets)
    probabilities = torch.sigmoid(logits.float()).flatten(-2)
    targets = targets.float().flatten(-2)
    intersection = (probabilities * targets).sum(-1)
    denominator = probabilities.square().sum(-1) + targets.square().sum(-1)
    return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over every pixel of every mask."""
    _check_shapes(logits, targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> SegmentationLoss:
    """BCE + Dice, the paper's training loss; ``targets`` are 0/1 masks shaped like ``logits``."""
    bce = bce_loss(logits, targets)
    dice = dice_loss(logits, targets)
    return SegmentationLoss(bce + dice, bce, dice)


__all__ = ["SegmentationLoss", "bce_dice_loss", "bce_loss", "dice_loss"]
