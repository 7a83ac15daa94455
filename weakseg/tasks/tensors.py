"""Image batches -> the network's input: one normalisation for training and inference."""
from __future__ import annotations

import torch

__all__ = ["normalize"]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or [0, 1] ``[B, 3, H, W]`` -> per-channel normalised float."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - m) / s
