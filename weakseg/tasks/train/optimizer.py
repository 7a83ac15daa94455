"""The paper's optimiser (SGD with momentum and weight decay), over the network's parameter groups."""
from __future__ import annotations

import torch

from ...models import WeakSegNet

__all__ = ["make_optimizer"]


def make_optimizer(
    model: WeakSegNet, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-5
) -> torch.optim.SGD:
    """The paper's optimiser: SGD with momentum and a small weight decay."""
    groups = model.param_groups()
    for group in groups:
        group.setdefault("weight_decay", weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)
