"""The paper's optimiser (SGD with momentum and weight decay), over the network's parameter groups."""
from __future__ import annotations

import torch

from ...models import WeakSegNet

__all__ = ["make_optimizer"]


def make_optimizer(
    model: WeakSegNet, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-5,
    backbone_lr_scale: float = 1.0,
) -> torch.optim.SGD:
    """The paper's optimiser: SGD with momentum and a small weight decay; the backbone's trained parameters at
    ``backbone_lr_scale`` x ``lr`` (a schedule scales every group alike)."""
    groups = model.param_groups(backbone_lr_scale)
    for group in groups:
        group.setdefault("weight_decay", weight_decay)
        group["lr"] = lr * group.pop("lr_scale", 1.0)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)
