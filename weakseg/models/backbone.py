"""Dense feature extractors from any timm model (``features_only``), frozen by default.

The paper keeps the ImageNet feature layers fixed and trains only the segmentation head;
fine-tuning from a given feature stage onwards is an option.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from typing import BinaryIO

import timm
import torch
from torch import nn

from ._pretrained import OFFLINE_WEIGHTS, load_offline_weights, load_state_dict_file, load_user_weights

__all__ = ["Backbone", "create_backbone", "resolve_pretrained"]

_logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_pretrained(name: str, pretrained: str) -> str:
    """Say where ``pretrained`` will come from: ``offline``, ``timm``, ``none`` or a URL."""
    if pretrained == "none":
        return "none"
    if pretrained == "auto":
        return "offline" if name in OFFLINE_WEIGHTS else "timm"
    return pretrained


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown backbone {name!r}: not a timm model name.{hint}")


class Backbone(nn.Module):
    """The last feature map of a timm model, with its stride and normalisation."""

    def __init__(
        self,
        body: nn.Module,
        name: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        finetune_from: int | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.name = name
        info = body.feature_info
        self.num_chs: int = info.channels()[-1]
        self.reduction: int = info.reduction()[-1]
        self.num_stages = len(info)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Frozen layers in eval mode from the start, not only after the first train()/eval().
        self.set_finetune_from(finetune_from)

    def _stage_end(self, stage: int) -> int:
        """Index in module order of the last module that computes feature stage ``stage``."""
        order = [n for n, _ in self.body.named_modules()][1:]
        raw = self.body.feature_info.module_name()[stage]
        candidates = {raw, raw.replace(".", "_")}
        hits = [i for i, n in enumerate(order) if any(n == c or n.startswith(c + ".") for c in candidates)]
        if not hits:
            raise ValueError(f"cannot locate feature stage {stage} ({raw}) in {self.name}")
        return max(hits)

    def stage_index(self, finetune_from: int | None) -> int | None:
        """``finetune_from`` as a stage index; negative ones count back from the last stage (-1: the last)."""
        if finetune_from is None:
            return None
        if not -self.num_stages <= finetune_from < self.num_stages:
            raise ValueError(f"finetune_from must be in [{-self.num_stages}, {self.num_stages - 1}] (negative: "
                             f"from the last stage back) for {self.name}, got {finetune_from}")
        return finetune_from % self.num_stages

    def _freeze(self, finetune_from: int | None) -> list[nn.Module]:
        """Freeze every module before feature stage ``finetune_from`` (all when None)."""
        if finetune_from is None:
            self.body.requires_grad_(False)
            return [self.body]
        if finetune_from == 0:
            return []
        modules = list(self.body.named_modules())[1:]  # definition order, root left out
        cut = self._stage_end(finetune_from - 1) + 1
        for _, module in modules[:cut]:
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
        # A container listed early (``blocks``) also holds stages being fine-tuned: it must
        # not be switched to eval as a whole.
        later = [name for name, _ in modules[cut:]]
        return [m for name, m in modules[:cut] if not any(n.startswith(name + ".") for n in later)]

    def set_finetune_from(self, finetune_from: int | None, *, freeze_norms: bool = False) -> None:
        """Set the boundary between frozen and trained stages, at construction or on a built backbone.

        The refinement may train more of the network than MIL training did: its pixel
        labels carry far more signal per image than one tag. ``freeze_norms`` keeps every
        BatchNorm at its pretrained statistics and affine (eval mode, no gradient), the usual
        choice when fine-tuning with small batches of padded crops: on MSRC-21 dev a
        refinement that updated them lost 0.06 mean IoU (docs/method.md, *Choices*).
        """
        stage = self.stage_index(finetune_from)
        self.body.requires_grad_(True)
        self.finetune_from = stage
        frozen = self._freeze(stage)
        if freeze_norms:
            norms = [m for m in self.body.modules() if isinstance(m, nn.BatchNorm2d)]
            for norm in norms:
                norm.requires_grad_(False)
            frozen += [m for m in norms if not any(m is f for f in frozen)]
        self._frozen_modules = frozen
        self.train(self.training)

    @property
    def fully_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.body.parameters())

    def train(self, mode: bool = True) -> Backbone:
        """Frozen layers stay in eval mode: their BatchNorm statistics are pretrained."""
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.body.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fully_frozen walks every parameter (~1 ms a call): only worth it where gradients are on
        if torch.is_grad_enabled() and self.fully_frozen:
            with torch.no_grad():
                return self.body(x)[-1]
        return self.body(x)[-1]


def create_backbone(
    name: str,
    pretrained: str | BinaryIO = "auto",
    output_stride: int | None = 16,
    finetune_from: int | None = None,
) -> Backbone:
    """Build a dense backbone.

    ``pretrained``: ``auto`` (offline EfficientNet-Lite0 weights for the Lite0 names, timm's
    own pretrained loading for every other name), ``none``, or a state dict's local path or
    open binary file (:func:`weakseg.tasks.storage.open_weights` opens URLs).
    ``output_stride`` 8 or 16 dilates the last stages to keep score maps dense; backbones
    that cannot dilate fall back to their native stride with a warning.
    """
    _check_name(name)
    source = resolve_pretrained(name, pretrained) if isinstance(pretrained, str) else pretrained
    kwargs: dict = {"features_only": True, "pretrained": source == "timm"}
    try:
        body = _create(name, kwargs, output_stride)
    except (OSError, RuntimeError) as err:
        if source == "timm":
            raise RuntimeError(
                f"could not fetch timm's pretrained weights for {name!r} ({err}). Without a "
                "network pass pretrained='none' or a path to a state dict."
            ) from err
        raise

    mean = body.pretrained_cfg.get("mean", IMAGENET_MEAN) if hasattr(body, "pretrained_cfg") else IMAGENET_MEAN
    std = body.pretrained_cfg.get("std", IMAGENET_STD) if hasattr(body, "pretrained_cfg") else IMAGENET_STD
    if source == "offline":
        load_offline_weights(body, name)
        mean, std = OFFLINE_WEIGHTS[name]["mean"], OFFLINE_WEIGHTS[name]["std"]
    elif not isinstance(source, str) or source not in ("none", "timm"):
        load_user_weights(body, load_state_dict_file(source))
    return Backbone(body, name, tuple(mean), tuple(std), finetune_from)


def _create(name: str, kwargs: dict, output_stride: int | None) -> nn.Module:
    if output_stride in (None, 32):
        return timm.create_model(name, **kwargs)
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    try:
        return timm.create_model(name, output_stride=output_stride, **kwargs)
    except (TypeError, AssertionError, ValueError) as err:
        _logger.warning("%s cannot dilate to output_stride=%d (%s); using its native stride", name, output_stride, err)
        return timm.create_model(name, **kwargs)
