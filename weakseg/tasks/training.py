"""One optimisation step of the MIL network, shared by the train flow, the demo and tests."""
from __future__ import annotations

import torch

from ..models import WeakSegNet, mil_loss
from ..models.losses import MultiLabelLoss

__all__ = ["make_optimizer", "normalize", "train_step"]


def make_optimizer(
    model: WeakSegNet, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-5
) -> torch.optim.SGD:
    """The paper's optimiser: SGD with momentum and a small weight decay."""
    groups = model.param_groups()
    for group in groups:
        group.setdefault("weight_decay", weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or [0, 1] ``[B, 3, H, W]`` -> per-channel normalised float."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s


def train_step(
    model: WeakSegNet,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    multilabel: MultiLabelLoss = "softmax",
) -> float:
    """Forward, LSE, loss, backward, step; returns the loss."""
    model.train()
    maps = model(images, dense=True)  # as the trainer: the maps inference reads
    loss = mil_loss(model.image_scores(maps, valid, dense=True), target, multilabel)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
