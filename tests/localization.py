"""Where the network puts its evidence: training on in-memory scenes and checking peaks.

Test support for the overfit test (not shipped in the package); the streaming trainer is
:mod:`weakseg.tasks.train.trainer`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from weakseg.models import ModelConfig, WeakSegNet, create_model, mil_loss
from weakseg.models.losses import MultiLabelLoss
from weakseg.tasks.synthetic import SYNTHETIC_CLASSES, Scene
from weakseg.tasks.tensors import normalize
from weakseg.tasks.train.optimizer import make_optimizer

__all__ = ["fit_scenes", "peak_hits", "peak_locations"]


def _batch(scenes: Sequence[Scene], config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2)
    target = torch.tensor([SYNTHETIC_CLASSES.index(s.labels[0]) for s in scenes])
    return normalize(images, config.mean, config.std), target


def fit_scenes(
    scenes: Sequence[Scene],
    config: ModelConfig,
    steps: int = 150,
    lr: float = 1e-2,
    pretrained: str = "auto",
    seed: int = 0,
) -> tuple[WeakSegNet, ModelConfig, list[float]]:
    """Train on a handful of single-object scenes (full batch) and return the losses.

    The backbone is frozen (eval-mode normalisation, no gradient) and the batch fixed, so its
    features are computed once and only the head trains on them: the same steps as running
    the whole network each time, without repeating its most expensive part.
    """
    torch.manual_seed(seed)
    model, config = create_model(config, pretrained=pretrained)
    assert model.backbone.fully_frozen, "fit_scenes reuses the backbone's features: it must be frozen"
    x, y = _batch(scenes, config)
    optimizer = make_optimizer(model, lr=lr)
    with torch.no_grad():
        features = model.backbone(x)
    losses = [train_step(model, optimizer, features, y) for _ in range(steps)]
    return model.eval(), config, losses


@torch.no_grad()
def peak_locations(model: WeakSegNet, config: ModelConfig, scenes: Sequence[Scene]) -> list[tuple[int, int]]:
    """Pixel (y, x) of the highest score of each scene's labelled class (dense maps)."""
    x, y = _batch(scenes, config)
    maps = model.eval().dense_maps(x)
    ys, xs = model.cell_centers(maps.shape[-2], 0, dense=True), model.cell_centers(maps.shape[-1], 1, dense=True)
    out = []
    for i in range(len(scenes)):
        m = maps[i, y[i]]
        iy, ix = divmod(int(m.argmax()), m.shape[-1])
        out.append((int(ys[iy]), int(xs[ix])))
    return out


def peak_hits(model: WeakSegNet, config: ModelConfig, scenes: Sequence[Scene]) -> list[bool]:
    """Whether each scene's class peak falls inside that class's object."""
    hits = []
    for scene, (py, px) in zip(scenes, peak_locations(model, config, scenes), strict=True):
        h, w = scene.mask.shape
        label = SYNTHETIC_CLASSES.index(scene.labels[0]) + 1
        hits.append(bool(scene.mask[min(py, h - 1), min(px, w - 1)] == label))
    return hits


def train_step(
    model: WeakSegNet,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    multilabel: MultiLabelLoss = "softmax",
) -> float:
    """Head forward on backbone features, LSE, loss, backward, step; returns the loss."""
    model.train()
    maps = model.head_maps(features, dense=True)  # dense, as the trainer: the maps inference reads
    loss = mil_loss(model.image_scores(maps, valid, dense=True), target, multilabel)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
