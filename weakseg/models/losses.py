"""Training losses on LSE image scores.

Single label (the paper): softmax over classes, negative log-likelihood of the label.

Multi-label (several tags per image): by default the same softmax with the target mass
split evenly over the image's tags (cross-entropy with a soft target, as in weakly
supervised training on hashtags, Mahajan et al. 2018). It keeps the class competition
that inference relies on (the image-level prior is the softmax of these scores) and
reduces to the paper's loss for one tag. ``bce`` treats every class as an independent
binary decision instead: the tags then no longer compete, at the price of a prior that is
no longer a distribution over classes.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["MultiLabelLoss", "labels_to_target", "mil_loss"]

MultiLabelLoss = Literal["softmax", "bce"]


def labels_to_target(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    """Multi-hot ``[B, K]`` from lists of class indices."""
    target = torch.zeros(len(labels), num_classes)
    for row, idx in enumerate(labels):
        if not idx:
            raise ValueError(f"sample {row} has no label")
        target[row, list(idx)] = 1.0
    return target


def mil_loss(scores: torch.Tensor, target: torch.Tensor, multilabel: MultiLabelLoss = "softmax") -> torch.Tensor:
    """Mean loss over the batch.

    ``target`` is ``[B]`` class indices (single label) or ``[B, K]`` multi-hot.
    """
    if target.dim() == 1:
        return F.cross_entropy(scores, target.long())
    if target.shape != scores.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match scores {tuple(scores.shape)}")
    target = target.to(scores.dtype)
    if multilabel == "bce":
        return F.binary_cross_entropy_with_logits(scores, target)
    if multilabel != "softmax":
        raise ValueError(f"multilabel must be 'softmax' or 'bce', got {multilabel!r}")
    counts = target.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("a sample has no label")
    return -(target / counts * F.log_softmax(scores, dim=1)).sum(dim=1).mean()
