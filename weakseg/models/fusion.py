"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm is a fixed affine map per channel, yet it runs as a pass of its
own over every feature map: EfficientNet-Lite0's 48 take up to a quarter of its CPU
forward pass (docs/benchmarks.md, bench/model.py). Scaling the convolution's weights and bias by the same affine map
(``torch.nn.utils.fusion``) gives the same outputs without that pass. Checkpoints keep the
trained parameters as they are; only the inference copy of a model is folded.
"""
from __future__ import annotations

import copy
import itertools
import logging

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["fold_batchnorm", "folded_for_inference"]

_logger = logging.getLogger(__name__)

# Exact types only: a subclass may do more than normalise (timm's BatchNormAct2d is known:
# BatchNorm, then its dropout and activation).
_FOLDABLE = (nn.BatchNorm2d, BatchNormAct2d)
_TOLERANCE = 2e-2  # of the largest output: TF32 convolutions (CUDA's default) differ by ~1e-3 a layer


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(norm) in _FOLDABLE and not norm.training
            and norm.running_mean is not None and norm.running_var is not None
            and conv.out_channels == norm.num_features)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution among its parent's
    children into that convolution, in place; the number folded.

    Children order is how timm's blocks (and most CNNs) register a convolution and its norm;
    :func:`folded_for_inference` checks the outputs, so a model wired otherwise is never
    served folded.
    """
    folded = 0
    children = list(module.named_children())
    for (_, conv), (name, norm) in itertools.pairwise(children):
        if not _foldable(conv, norm):
            continue
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                            norm.eps, norm.weight, norm.bias)
        conv.weight, conv.bias = weight, bias
        setattr(module, name, nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d)
                else nn.Identity())
        folded += 1
    for _, child in module.named_children():
        folded += fold_batchnorm(child)
    return folded


@torch.no_grad()
def folded_for_inference(model: nn.Module, probe_side: int = 64) -> nn.Module:
    """A copy of ``model`` (in eval mode) with its BatchNorms folded, when its outputs on a probe
    input match the model's (a :class:`~weakseg.models.WeakSegNet`'s dense maps); else ``model``."""
    folded = copy.deepcopy(model)
    if fold_batchnorm(folded) == 0:
        return model
    param = next(model.parameters())
    side = max(probe_side, getattr(model, "min_input_size", 1))
    x = torch.randn((2, 3, side, side), generator=torch.Generator().manual_seed(0)).to(param.device)
    run = (lambda m: m.dense_maps(x)) if hasattr(model, "dense_maps") else (lambda m: m(x))
    want, got = run(model).float(), run(folded).float()
    if not torch.isfinite(want).all():  # a broken model: its own checks say so, it is not served either way
        return model
    error = (want - got).abs().max().item()
    if not error <= _TOLERANCE * max(1.0, want.abs().max().item()):
        _logger.warning("BatchNorm folding changed the outputs (max difference %.3g): serving the model unfolded",
                        error)
        return model
    return folded
