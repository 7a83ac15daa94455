"""Training losses on LSE image scores, and the image-level probability each one defines.

Single label (the paper): softmax over classes, negative log-likelihood of the label. The
image-level prior p(k|I) is then the softmax of the scores.

Multi-label (several tags per image):

- ``softmax``: the same softmax with the target mass split evenly over the image's tags
  (cross-entropy with a soft target, as in weakly supervised training on hashtags,
  Mahajan et al. 2018). It keeps the class competition that shapes good pixel maps, but
  its softmax is the *share* of each tag, not the probability that the tag is present:
  on an image of grass, sky and a cow it weights the cow against the grass.
- ``bce``: every class an independent binary decision; sigmoid(s_k) is the probability
  that class k is in the image.
- ``softmax+bce`` (the default): the sum of the two. The softmax term shapes the maps,
  the BCE term (summed over classes, so it weighs as much as the softmax term) calibrates
  each score as a presence probability, and the image-level prior uses sigmoid(s_k). On
  MSRC-21 this is what lets the prior help (README, "Quality on real photos").

Background (a class named ``background``, as in PASCAL VOC): taken literally, the label of
an image of a dog is "dog", so the softmax pushes the background score down over the whole
image and no pixel is ever labelled background. Background is in nearly every photo, so
the trainer makes it a tag of *every* image (:func:`with_background`; ``--background auto``, the
default, means ``every-image``): the maps then learn where background is, exactly as they
learn a stuff class such as grass, and images tagged only ``background`` still teach what
it looks like. Such a model is multi-label (``softmax+bce``, sigmoid image prior).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

__all__ = ["BACKGROUND", "BACKGROUND_MODES", "IMAGE_PRIORS", "MULTILABEL_LOSSES", "BackgroundMode", "ImageLoss",
           "MultiLabelLoss", "background_index", "image_prior_for", "image_probabilities", "labels_to_target",
           "mil_loss", "with_background"]

MultiLabelLoss = Literal["softmax", "bce", "softmax+bce"]
MULTILABEL_LOSSES: tuple[str, ...] = get_args(MultiLabelLoss)
IMAGE_PRIORS: tuple[str, ...] = ("softmax", "sigmoid")
BACKGROUND = "background"  # the class name the trainer, the shard label maps and the priors look for
# every-image: background is a tag of every training image; as-tagged: only of images tagged
# with it (the paper's literal reading); auto: every-image when the classes have background.
BackgroundMode = Literal["auto", "every-image", "as-tagged"]
BACKGROUND_MODES: tuple[str, ...] = get_args(BackgroundMode)


def background_index(classes: list[str] | tuple[str, ...], mode: str = "auto") -> int | None:
    """The class index that :func:`with_background` adds to every target, or None when none is added."""
    if mode not in BACKGROUND_MODES:
        raise ValueError(f"background must be one of {', '.join(map(repr, BACKGROUND_MODES))}, got {mode!r}")
    if mode == "as-tagged" or BACKGROUND not in classes:
        if mode == "every-image":
            raise ValueError("--background every-image needs a class named 'background'")
        return None
    return list(classes).index(BACKGROUND)


def with_background(target: torch.Tensor, index: int | None) -> torch.Tensor:
    """Multi-hot ``[B, K]`` targets with class ``index`` set in every row (unchanged when None)."""
    if index is None:
        return target
    target = target.clone()
    target[:, index] = 1.0
    return target


def labels_to_target(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    """Multi-hot ``[B, K]`` from lists of class indices."""
    target = torch.zeros(len(labels), num_classes)
    for row, idx in enumerate(labels):
        if not idx:
            raise ValueError(f"sample {row} has no label")
        target[row, list(idx)] = 1.0
    return target


def _soft_softmax(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    counts = target.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("a sample has no label")
    return -(target / counts * F.log_softmax(scores, dim=1)).sum(dim=1).mean()


def mil_loss(scores: torch.Tensor, target: torch.Tensor, multilabel: MultiLabelLoss = "softmax") -> torch.Tensor:
    """Mean loss over the batch.

    ``target`` is ``[B]`` class indices (single label) or ``[B, K]`` multi-hot.
    """
    if target.dim() == 1:
        return F.cross_entropy(scores, target.long())
    if target.shape != scores.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match scores {tuple(scores.shape)}")
    if multilabel not in MULTILABEL_LOSSES:
        raise ValueError(f"multilabel must be one of {', '.join(map(repr, MULTILABEL_LOSSES))}, got {multilabel!r}")
    target = target.to(scores.dtype)
    if multilabel == "bce":
        return F.binary_cross_entropy_with_logits(scores, target)
    loss = _soft_softmax(scores, target)
    if multilabel == "softmax+bce":
        loss = loss + F.binary_cross_entropy_with_logits(scores, target, reduction="sum") / scores.shape[0]
    return loss


def image_prior_for(multilabel: bool, loss: MultiLabelLoss) -> str:
    """How a model trained this way turns LSE scores into p(k|I): ``softmax`` or ``sigmoid``."""
    return "sigmoid" if multilabel and loss in ("bce", "softmax+bce") else "softmax"


def image_probabilities(scores: torch.Tensor, prior: str = "softmax") -> torch.Tensor:
    """p(k|I) from LSE scores ``[..., K]``: a distribution (softmax) or presence probabilities (sigmoid)."""
    if prior == "softmax":
        return scores.softmax(-1)
    if prior == "sigmoid":
        return scores.sigmoid()
    raise ValueError(f"image prior must be one of {IMAGE_PRIORS}, got {prior!r}")


@dataclass(frozen=True)
class ImageLoss:
    """The image-level (MIL) loss of a training run: which targets it compares with, and how.

    Training decides it once from the shards and its options (:meth:`for_training`) and
    records it in its checkpoints (:meth:`to_dict`); the refinement reads it back
    (:meth:`from_checkpoint`) so its MIL term is the one the model was trained with. Not
    only the manifest decides: single-label shards with a ``background`` class train
    multi-label (background is a tag of every image), and taking the manifest's
    ``multilabel`` alone made ``background`` the target of nearly every image.
    """

    kind: MultiLabelLoss = "softmax+bce"
    multilabel: bool = False
    background: int | None = None  # the class made a tag of every image (with_background), or None

    @classmethod
    def for_training(cls, classes: Sequence[str], manifest_multilabel: bool, kind: MultiLabelLoss = "softmax+bce",
                     background: BackgroundMode = "auto") -> ImageLoss:
        """What training on shards with these ``classes`` and options uses."""
        if kind not in MULTILABEL_LOSSES:
            raise ValueError(f"multilabel loss must be one of {', '.join(map(repr, MULTILABEL_LOSSES))}, got {kind!r}")
        index = background_index(list(classes), background)
        return cls(kind, bool(manifest_multilabel) or index is not None, index)

    @classmethod
    def from_checkpoint(cls, classes: Sequence[str], manifest: Mapping[str, Any],
                        training_state: Mapping[str, Any]) -> ImageLoss:
        """The loss a checkpoint's training used: recorded since it was, else rebuilt from its options
        and manifest reference as :meth:`for_training` built it (older checkpoints)."""
        recorded = training_state.get("image_loss")
        if recorded:
            background = recorded.get("background")
            return cls(recorded["kind"], bool(recorded["multilabel"]), None if background is None else int(background))
        options = training_state.get("options", {})
        return cls.for_training(classes, bool(manifest.get("multilabel", False)),
                                options.get("multilabel_loss", "softmax+bce"), options.get("background", "auto"))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "multilabel": self.multilabel, "background": self.background}

    @property
    def image_prior(self) -> str:
        """How a model trained with this loss turns its LSE scores into p(k|I)."""
        return image_prior_for(self.multilabel, self.kind)

    def tags(self, labels: torch.Tensor) -> torch.Tensor:
        """Multi-hot ``[B, K]`` of the shards' labels -> the image's tag set (background added where implied)."""
        return with_background(labels, self.background)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """What the loss compares with: the tag set (multi-label) or its class index (one label per image)."""
        tags = self.tags(labels)
        return tags if self.multilabel else tags.argmax(dim=1)

    def __call__(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of LSE scores ``[B, K]`` against the shards' multi-hot labels ``[B, K]``."""
        return mil_loss(scores, self.targets(labels.to(scores.device)), self.kind)
