"""Soft multi-class Dice loss on logits, optionally plus cross-entropy.

Shapes: logits (N, C, D, H, W) float; target (N, D, H, W) or (N, 1, D, H, W) integer labels in
[0, C). The formula is MONAI's DiceLoss(softmax=True, to_onehot_y=True), which the tests use as
the oracle: per (sample, class) 1 - (2 I + smooth_nr) / (P + G + smooth_dr).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, D, H, W) or (N, 1, D, H, W) int labels -> (N, C, D, H, W) float one-hot."""
    if target.ndim == 5:
        target = target[:, 0]
    if target.ndim != 4:
        raise ValueError(f"target must be (N, D, H, W) or (N, 1, D, H, W); got {tuple(target.shape)}")
    return F.one_hot(target.long(), num_classes).permute(0, 4, 1, 2, 3).to(torch.float32)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = True,
    batch: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """Mean soft Dice loss over classes (and samples unless batch=True).

    batch=True sums intersections and sizes over the whole batch before dividing (nnU-Net's
    "batch Dice"): a class absent from one patch then neither rewards an empty prediction with a
    free 1 nor punishes a few false-positive voxels with a full 0, so absent classes stop
    dominating the gradient. With batch=False, a class absent from a sample scores 1 only when
    the prediction is empty too (smooth_nr / smooth_dr), which is MONAI's behaviour.
    """
    if logits.ndim != 5:
        raise ValueError(f"logits must be (N, C, D, H, W); got {tuple(logits.shape)}")
    ref = one_hot(target, logits.shape[1])
    if ref.shape[0] != logits.shape[0] or ref.shape[2:] != logits.shape[2:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in batch or space")
    probs = torch.softmax(logits.float(), dim=1)
    if not include_background:
        probs, ref = probs[:, 1:], ref[:, 1:]
    dims = (0, 2, 3, 4) if batch else (2, 3, 4)
    intersection = (probs * ref).sum(dims)
    sizes = probs.sum(dims) + ref.sum(dims)
    return (1.0 - (2.0 * intersection + smooth_nr) / (sizes + smooth_dr)).mean()


class DiceCELoss(nn.Module):
    """dice_weight * Dice + ce_weight * cross-entropy, both on logits. The Dice term drives overlap
    of small organs; cross-entropy gives well-behaved gradients early in training, when Dice on a
    near-uniform softmax is flat."""

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 include_background: bool = False, batch: bool = True):
        super().__init__()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.batch = batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 5:
            target = target[:, 0]
        loss = self.dice_weight * dice_loss(logits, target, self.include_background, self.batch)
        if self.ce_weight:
            # Cross-entropy as log-softmax and gather: the value of F.cross_entropy, but CUDA has a
            # deterministic gather backward and no deterministic nll_loss (train.py --deterministic).
            log_probs = F.log_softmax(logits.float(), dim=1)
            loss = loss - self.ce_weight * log_probs.gather(1, target.long()[:, None]).mean()
        return loss
