"""Log-Sum-Exp aggregation of class score maps into image-level scores.

Pinheiro & Collobert (CVPR 2015), eq. 2:

    s^k = 1/r * log( 1/(h*w) * sum_ij exp(r * Y[k, i, j]) )

r interpolates between average pooling (r -> 0) and max pooling (r -> inf), so training
pushes the evidence towards the locations that explain the image label.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LSEPool", "lse_pool"]


def lse_pool(scores: torch.Tensor, r: float = 5.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregate score maps ``[B, K, h, w]`` into image scores ``[B, K]``.

    ``mask`` (``[B, h, w]`` or ``[B, 1, h, w]``, true = valid) removes padded locations
    from both the sum and the ``h*w`` count, so a padded batch scores each image exactly
    as it would alone. Computed with ``logsumexp`` so large ``r * Y`` never overflows.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B, K, h, w], got shape {tuple(scores.shape)}")
    if r <= 0:
        raise ValueError(f"r must be > 0, got {r}")
    # (logsumexp - log n) / r cancels badly for small r in float32; the maps are small
    # (B x K x h*w), so the reduction runs in float64 (float32 where there is none).
    work = torch.float32 if scores.device.type == "mps" else torch.float64
    flat = scores.flatten(2).to(work) * r  # [B, K, h*w]
    if mask is None:
        count = math.log(flat.shape[-1])
        return ((torch.logsumexp(flat, dim=-1) - count) / r).to(scores.dtype)

    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.shape != (scores.shape[0], *scores.shape[2:]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match scores {tuple(scores.shape)}")
    valid = mask.to(torch.bool).flatten(1)  # [B, h*w]
    n_valid = valid.sum(dim=1)
    if bool((n_valid == 0).any()):
        raise ValueError("mask leaves an image with no valid location")
    masked = flat.masked_fill(~valid[:, None, :], float("-inf"))
    count = n_valid.to(work).log()[:, None]
    return ((torch.logsumexp(masked, dim=-1) - count) / r).to(scores.dtype)


class LSEPool(nn.Module):
    """Module form of :func:`lse_pool`, so ``r`` travels with the model config."""

    def __init__(self, r: float = 5.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"r must be > 0, got {r}")
        self.r = float(r)

    def forward(self, scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return lse_pool(scores, self.r, mask)

    def extra_repr(self) -> str:
        return f"r={self.r}"
