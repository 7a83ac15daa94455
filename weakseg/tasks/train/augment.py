"""The paper's training augmentations, and the fixed resize used for validation.

Training (Pinheiro & Collobert, sec. 4.1): the image is deformed - scaled, rotated,
flipped, its brightness and contrast jittered - and a random crop at the training input
size is taken from the deformed image. Where the crop reaches past the deformed image
(rotation corners, an image smaller than the crop) the pixels are zero and the returned
validity mask is false, so LSE does not count them in ``h*w``.

Two ways to size the image before the crop (``crop``):

- ``"random"`` (the paper): the *shorter* side becomes ``input_size * U(scale)``, so the
  crop keeps a random square of the image. Right for ImageNet-style single-label photos,
  where the labelled object fills the frame.
- ``"whole"``: the *longer* side becomes ``input_size * U(scale)``, so at scale <= 1 the
  whole image is inside the canvas (the rest is padding, invalid for LSE) and above 1 at
  most ``1 - 1/scale`` of the longer side is cut. For multi-label data: a random square
  of a landscape photo can cut away a tagged region (the cow at the edge) while its tag
  stays in the target, teaching the network that cows look like grass. It also trains at
  the scale inference sees (segment-corpus resizes by the longer side).

Per-channel normalisation happens on the device, after the uint8 batch is transferred
(:func:`weakseg.tasks.tensors.normalize`): four times less to copy than float32.

Transforms are classes (picklable, so they survive DataLoader worker processes) and take
a ``random.Random``. Without one they draw from :func:`sample_rng`: in a DataLoader worker
the worker's ``random`` module (DataLoader seeds each worker differently); in the main
process (``num_workers=0``) their own seeded generator, because the module's is shared
with every other thread of the process (Prefect's among them), which made two trainings
with one seed differ.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image, ImageEnhance

__all__ = ["CROPS", "AugmentConfig", "EvalTransform", "TrainTransform", "resolve_crop", "sample_rng"]

CROPS = ("random", "whole")


def resolve_crop(crop: str, multilabel: bool) -> str:
    """``"auto"`` -> ``"whole"`` for multi-label data (several tags per image), else ``"random"``."""
    if crop == "auto":
        return "whole" if multilabel else "random"
    if crop not in CROPS:
        raise ValueError(f"crop must be auto or one of {CROPS}, got {crop!r}")
    return crop


@dataclass(frozen=True)
class AugmentConfig:
    """Every augmentation can be switched off: flip False, the ranges 0 or (1, 1)."""

    input_size: int = 400
    hflip: bool = True  # horizontal flip with probability 0.5
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    scale: tuple[float, float] = (0.8, 1.2)  # shorter side = input_size * U(scale)
    brightness: float = 0.2  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.2  # factor uniform in [1 - c, 1 + c]
    crop: str = "random"  # "random": shorter side scaled (the paper); "whole": longer side

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.input_size < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be two positive numbers, low <= high, got {self.scale}")
        if self.rotation < 0 or not 0 <= self.brightness < 1 or not 0 <= self.contrast < 1:
            raise ValueError("rotation must be >= 0, brightness and contrast in [0, 1)")


def _place(img: Image.Image, mask: Image.Image | None, size: int, rng: random.Random | None):
    """Crop (random offset; top-left when ``rng`` is None) or zero-pad to ``size x size``."""
    w, h = img.size
    x0 = rng.randint(0, w - size) if rng is not None and w > size else 0
    y0 = rng.randint(0, h - size) if rng is not None and h > size else 0
    # Smaller than the crop: paste at a random offset inside the canvas (top-left for eval).
    px = rng.randint(0, size - w) if rng is not None and w < size else 0
    py = rng.randint(0, size - h) if rng is not None and h < size else 0
    box = (x0, y0, x0 + min(w, size), y0 + min(h, size))
    out = np.zeros((size, size, 3), np.uint8)
    valid = np.zeros((size, size), bool)
    patch = np.asarray(img.crop(box))
    ph, pw = patch.shape[:2]
    out[py : py + ph, px : px + pw] = patch
    if mask is None:
        valid[py : py + ph, px : px + pw] = True
    else:
        valid[py : py + ph, px : px + pw] = np.asarray(mask.crop(box)) > 127
    return out, valid


def sample_rng(own: random.Random) -> Any:
    """The generator a transform draws from: the worker's ``random`` module, or ``own`` in the main process."""
    return random if torch.utils.data.get_worker_info() is not None else own


class TrainTransform:
    """PIL image -> (``[S, S, 3]`` uint8, ``[S, S]`` bool validity) with random deformation."""

    def __init__(self, config: AugmentConfig, seed: int = 0) -> None:
        self.config = config
        self.rng = random.Random(seed)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> tuple[np.ndarray, np.ndarray]:
        rng = rng if rng is not None else sample_rng(self.rng)
        c = self.config
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h) if c.crop == "random" else max(w, h)
        factor = c.input_size / side * rng.uniform(*c.scale)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        img = img.resize(size, Image.BILINEAR)
        if c.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        mask = None
        angle = rng.uniform(-c.rotation, c.rotation) if c.rotation else 0.0
        if angle:
            mask = Image.new("L", img.size, 255).rotate(angle, Image.NEAREST, expand=True, fillcolor=0)
            img = img.rotate(angle, Image.BILINEAR, expand=True, fillcolor=(0, 0, 0))
        if c.brightness:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - c.brightness, 1 + c.brightness))
        if c.contrast:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - c.contrast, 1 + c.contrast))
        return _place(img, mask, c.input_size, rng)


class EvalTransform:
    """Deterministic: the longer side resized to the input size, padded (invalid) to a square."""

    def __init__(self, input_size: int) -> None:
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.input_size = input_size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> tuple[np.ndarray, np.ndarray]:
        img = img.convert("RGB")
        w, h = img.size
        factor = self.input_size / max(w, h)
        img = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
        return _place(img, None, self.input_size, None)
