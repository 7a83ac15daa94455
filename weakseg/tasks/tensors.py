"""Image batches -> the network's input: one normalisation for training and inference."""
from __future__ import annotations

import functools

import torch

__all__ = ["normalize"]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 or [0, 1] ``[B, 3, H, W]`` -> per-channel normalised float."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    m, s = _channel_constants(tuple(mean), tuple(std), x.dtype, x.device)
    return (x - m) / s


@functools.lru_cache(maxsize=32)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[3, 1, 1]`` mean and std, made once per device: made per batch they are two copies to
    an accelerator per batch, each a point where a thread gives up the GIL and waits to get it back."""
    return (torch.tensor(mean, dtype=dtype, device=device)[:, None, None],
            torch.tensor(std, dtype=dtype, device=device)[:, None, None])
