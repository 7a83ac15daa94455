"""Deterministic synthetic scenes: textured objects on natural photographs.

Image-level labels with exact masks, for tests and the demo where no labelled data may be
downloaded. Backgrounds are scikit-image's bundled sample photographs; each object class
has its own texture and colours (so frozen ImageNet features can tell them apart) and a
random shape, size and position.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from skimage import data as skdata
from skimage import draw
from skimage.color import gray2rgb
from skimage.transform import resize

__all__ = ["SYNTHETIC_CLASSES", "Scene", "backgrounds", "make_scenes", "render_scene"]

# Sample photographs that ship inside scikit-image (no download).
_BACKGROUNDS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera",
    "grass", "gravel", "brick", "moon", "coins", "hubble_deep_field",
)


def _stripes(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    period = rng.integers(6, 12)
    yy, xx = np.mgrid[:h, :w]
    band = ((xx + yy) // period) % 2
    return np.where(band[..., None] == 1, [250, 210, 20], [20, 40, 200]).astype(np.float32)


def _checker(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    cell = rng.integers(5, 10)
    yy, xx = np.mgrid[:h, :w]
    square = ((yy // cell) + (xx // cell)) % 2
    return np.where(square[..., None] == 1, [245, 245, 245], [15, 15, 15]).astype(np.float32)


def _dots(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    spacing = rng.integers(8, 14)
    yy, xx = np.mgrid[:h, :w]
    near = ((yy % spacing - spacing / 2) ** 2 + (xx % spacing - spacing / 2) ** 2) < (spacing / 3.2) ** 2
    return np.where(near[..., None], [255, 255, 255], [30, 160, 40]).astype(np.float32)


def _solid(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    tone = np.array([225, 30, 30], np.float32) + rng.normal(0, 12, size=3)
    grain = rng.normal(0, 10, size=(h, w, 1))
    return np.broadcast_to(tone, (h, w, 3)) + grain


_TEXTURES = {"stripes": _stripes, "checker": _checker, "dots": _dots, "red": _solid}
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(sorted(_TEXTURES))


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # HxWx3 uint8
    mask: np.ndarray  # HxW uint8: class index + 1, 0 = background
    labels: tuple[str, ...]


@cache
def backgrounds() -> tuple[np.ndarray, ...]:
    """The bundled photographs as RGB uint8."""
    out = []
    for name in _BACKGROUNDS:
        img = getattr(skdata, name)()
        out.append(gray2rgb(img) if img.ndim == 2 else img[..., :3])
    return tuple(out)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    photo = backgrounds()[rng.integers(len(backgrounds()))]
    ph, pw = photo.shape[:2]
    side = int(rng.uniform(0.5, 1.0) * min(ph, pw))
    y0, x0 = rng.integers(0, ph - side + 1), rng.integers(0, pw - side + 1)
    crop = photo[y0 : y0 + side, x0 : x0 + side]
    return resize(crop, (h, w), preserve_range=True, anti_aliasing=True).astype(np.float32)


def _shape_mask(rng: np.random.Generator, h: int, w: int, size: float) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    r = size * min(h, w) / 2
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    kind = rng.integers(3)
    if kind == 0:
        rr, cc = draw.ellipse(cy, cx, r, r * rng.uniform(0.6, 1.0), shape=(h, w), rotation=rng.uniform(0, np.pi))
    elif kind == 1:
        rr, cc = draw.rectangle((cy - r, cx - r * 0.8), (cy + r * 0.8, cx + r), shape=(h, w))
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        rr, cc = draw.polygon(cy + r * np.sin(angles), cx + r * np.cos(angles), shape=(h, w))
    mask[rr, cc] = True
    return mask


def render_scene(
    rng: np.random.Generator,
    classes: tuple[str, ...],
    size: tuple[int, int] = (160, 160),
    object_size: tuple[float, float] = (0.35, 0.6),
) -> Scene:
    """One scene with one object per entry of ``classes`` (later objects occlude earlier)."""
    h, w = size
    image = _background(rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    for name in classes:
        if name not in _TEXTURES:
            raise ValueError(f"unknown synthetic class {name!r}; choose from {SYNTHETIC_CLASSES}")
        shape = _shape_mask(rng, h, w, rng.uniform(*object_size))
        texture = _TEXTURES[name](h, w, rng)
        image[shape] = texture[shape]
        mask[shape] = SYNTHETIC_CLASSES.index(name) + 1
    present = tuple(c for c in classes if (mask == SYNTHETIC_CLASSES.index(c) + 1).any())
    return Scene(np.clip(image, 0, 255).astype(np.uint8), mask, present)


def make_scenes(n: int, seed: int = 0, size: tuple[int, int] = (160, 160), objects_per_image: int = 1) -> list[Scene]:
    """``n`` scenes, classes cycling so every class appears; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n):
        first = SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]
        others = rng.choice([c for c in SYNTHETIC_CLASSES if c != first], objects_per_image - 1, replace=False)
        scenes.append(render_scene(rng, (first, *others), size))
    return scenes
