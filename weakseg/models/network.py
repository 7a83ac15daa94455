"""The weakly supervised segmentation network: image -> features -> head -> score maps.

Pinheiro & Collobert (CVPR 2015). Training aggregates the score maps with Log-Sum-Exp into
one score per class; inference reads the maps themselves, one per class.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import measure_cell_offset
from .backbone import Backbone, create_backbone
from .head import DEFAULT_HEAD_WIDTHS, MILHead
from .lse import LSEPool

__all__ = ["ModelConfig", "WeakSegNet", "create_model"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the architecture; stored in every checkpoint."""

    num_classes: int
    backbone: str = "tf_efficientnet_lite0"
    head_widths: tuple[int, ...] = DEFAULT_HEAD_WIDTHS
    dropout: float = 0.5
    lse_r: float = 5.0
    output_stride: int | None = 16
    finetune_from: int | None = None
    # How LSE scores become the image-level prior p(k|I): "softmax" (the paper; one label
    # per image) or "sigmoid" (presence probabilities of a multi-label model trained with a
    # BCE term; see weakseg.models.losses). Set by the trainer from the manifest and loss.
    image_prior: str = "softmax"
    # Filled in from the backbone when the model is built.
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    # (dy, dx) px: feature cell i is centred on input pixel stride·i + offset, measured by
    # weakseg.models.alignment when the model is built. None (checkpoints older than the
    # field) is measured again when the model is rebuilt: the probe needs no weights.
    cell_offset: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head_widths"] = list(self.head_widths)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["cell_offset"] = None if self.cell_offset is None else list(self.cell_offset)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("head_widths", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        if known.get("cell_offset") is not None:
            dy, dx = known["cell_offset"]
            known["cell_offset"] = (float(dy), float(dx))
        return cls(**known)


class WeakSegNet(nn.Module):
    """Backbone + MIL head; ``forward`` gives score maps Y[b, k, i, j]."""

    def __init__(self, backbone: Backbone, head: MILHead, lse_r: float = 5.0,
                 cell_offset: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pool = LSEPool(lse_r)
        self.cell_offset = (float(cell_offset[0]), float(cell_offset[1]))

    @property
    def stride(self) -> int:
        """Input pixels per score-map cell."""
        return self.backbone.reduction

    @property
    def margin(self) -> int:
        """Score-map cell i sits over feature cell i + margin (the head is unpadded)."""
        return self.head.margin

    @property
    def min_input_size(self) -> int:
        """Smallest input side that gives a 1x1 score map."""
        return (self.head.min_cells - 1) * self.stride + 1

    def forward(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """Score maps ``[B, K, h, w]``; ``dense=True`` covers the whole input (see :meth:`dense_maps`)."""
        return self.head_maps(self.backbone(x), dense)

    def head_maps(self, features: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """Score maps from backbone features: a frozen backbone's features can be computed once and reused."""
        if dense:
            m = self.margin
            mode = "reflect" if min(features.shape[-2:]) > m else "replicate"
            features = F.pad(features, (m, m, m, m), mode=mode)
        return self.head(features)

    def image_scores(self, maps: torch.Tensor, valid: torch.Tensor | None = None, dense: bool = False) -> torch.Tensor:
        """LSE scores ``[B, K]``; ``valid`` is the input's pixel mask ``[B, H, W]``."""
        mask = None if valid is None else self.map_mask(valid, maps.shape[-2:], dense=dense)
        return self.pool(maps, mask)

    def dense_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Score maps that cover the whole input: one cell per feature cell.

        The unpadded head (Table 1) loses ``margin`` cells on each side, so a plain forward
        pass only scores the interior (a 288 px crop at stride 16: the central 160 px).
        Mirroring the *features* by ``margin`` cells puts score cell i over input pixel
        ``i * stride + cell_offset`` (see :meth:`cell_centers` with ``dense=True``). Training uses it too,
        so the LSE sees every tagged region and the head learns the borders it is asked to
        label at inference. Padding features rather than the image costs no backbone work.
        """
        return self(x, dense=True)

    def cell_centers(self, size: int, axis: int, dense: bool = False) -> torch.Tensor:
        """Input pixel coordinate of the centre of each of ``size`` score cells along ``axis`` (0: y, 1: x)."""
        idx = torch.arange(size, dtype=torch.float32)
        first = 0 if dense else self.margin
        return (idx + first) * self.stride + self.cell_offset[axis]

    def map_mask(self, valid: torch.Tensor, map_hw: Sequence[int], dense: bool = False) -> torch.Tensor:
        """Downsample a pixel validity mask to score cells by each cell's centre pixel (clamped to the input)."""
        h, w = valid.shape[-2:]
        ys = self.cell_centers(map_hw[0], 0, dense).round().long().clamp_(0, h - 1).to(valid.device)
        xs = self.cell_centers(map_hw[1], 1, dense).round().long().clamp_(0, w - 1).to(valid.device)
        return valid[..., ys[:, None], xs[None, :]].to(torch.bool)

    def param_groups(self, backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
        """Trainable parameters; no weight decay on biases, as is usual. With ``backbone_lr_scale`` != 1 the
        backbone's trained parameters form groups of their own, marked ``lr_scale`` (the pretrained features
        move slower than the head, as in the retraining stage of weakly supervised segmentation)."""
        split = backbone_lr_scale != 1.0
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                key = (split and name.startswith("backbone."), name.endswith(".bias"))
                groups.setdefault(key, []).append(p)
        out = []
        for backbone in (False, True) if split else (False,):
            for bias in (False, True):
                group: dict[str, Any] = {"params": groups.get((backbone, bias), [])}
                if bias:
                    group["weight_decay"] = 0.0
                if backbone:
                    group["lr_scale"] = backbone_lr_scale
                if group["params"] or not backbone:
                    out.append(group)
        return out


def create_model(config: ModelConfig, pretrained: str | BinaryIO = "auto") -> tuple[WeakSegNet, ModelConfig]:
    """The one way to build a network from a config; returns it with mean/std, cell offset and stage resolved.

    The cell offset is the config's, or measured on the backbone (:mod:`.alignment`) when it has none.
    """
    backbone = create_backbone(
        config.backbone,
        pretrained=pretrained,
        output_stride=config.output_stride,
        finetune_from=config.finetune_from,
    )
    head = MILHead(backbone.num_chs, config.num_classes, config.head_widths, config.dropout)
    offset = config.cell_offset or measure_cell_offset(backbone.body, backbone.reduction)
    model = WeakSegNet(backbone, head, config.lse_r, offset)
    resolved = ModelConfig.from_dict(
        {**config.to_dict(), "mean": config.mean or backbone.mean, "std": config.std or backbone.std,
         "cell_offset": list(model.cell_offset), "finetune_from": backbone.finetune_from}
    )
    return model, resolved
