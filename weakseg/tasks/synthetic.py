"""Deterministic synthetic scenes: textured objects on natural photographs.

Image-level labels with exact masks, for tests and the demo where no labelled data may be
downloaded. Backgrounds are scikit-image's bundled sample photographs; each object class
has its own texture and colours (so frozen ImageNet features can tell them apart) and a
random shape, size and position.

:func:`write_synthetic_dataset` writes a whole benchmark to any fsspec URL: training
images with image-level labels (a ``uri,labels,split`` CSV that ``weakseg shard`` reads,
or an ImageFolder tree) and a PASCAL VOC-layout evaluation set with exact masks that
``weakseg evaluate`` scores against.
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage import draw
from skimage.color import gray2rgb
from skimage.filters import gaussian
from skimage.transform import resize

from .images import voc_palette

__all__ = [
    "BENCHMARK_CLASSES",
    "SYNTHETIC_CLASSES",
    "Scene",
    "backgrounds",
    "make_scenes",
    "render_benchmark_scene",
    "render_scene",
    "write_synthetic_dataset",
]

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


def _rings(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(7, 12)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    yy, xx = np.mgrid[:h, :w]
    ring = (np.hypot(yy - cy, xx - cx) // (period / 2)) % 2
    return np.where(ring[..., None] == 1, [250, 140, 0], [90, 20, 110]).astype(np.float32)


def _waves(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    period, amp = rng.uniform(10, 16), rng.uniform(2, 5)
    yy, xx = np.mgrid[:h, :w]
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + amp * np.sin(xx / 5.0)) / period)
    low, high = np.array([0, 90, 110], np.float32), np.array([120, 240, 230], np.float32)
    return low + t[..., None] * (high - low)


def _hatch(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    period = rng.integers(5, 9)
    yy, xx = np.mgrid[:h, :w]
    line = (((xx + yy) % period) < 2) | (((xx - yy) % period) < 2)
    return np.where(line[..., None], [40, 25, 10], [230, 200, 150]).astype(np.float32)


def _blotches(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.random((max(2, h // 12), max(2, w // 12)))
    t = resize(coarse, (h, w), order=3, mode="reflect") > 0.5
    return np.where(t[..., None], [200, 40, 160], [250, 230, 60]).astype(np.float32)


_TEXTURES = {"stripes": _stripes, "checker": _checker, "dots": _dots, "red": _solid}
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(sorted(_TEXTURES))
_ALL_TEXTURES = {**_TEXTURES, "rings": _rings, "waves": _waves, "hatch": _hatch, "blotches": _blotches}
# The benchmark's object classes: the four above and four more (the ground truth adds `background`).
BENCHMARK_CLASSES: tuple[str, ...] = tuple(sorted(_ALL_TEXTURES))


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


# ---------------------------------------------------------------------------------------------
# a benchmark: several objects per photo-like image, written as training + VOC evaluation sets


def render_benchmark_scene(
    rng: np.random.Generator,
    classes: Sequence[str],
    class_list: Sequence[str] = BENCHMARK_CLASSES,
    size: tuple[int, int] = (160, 160),
    object_size: tuple[float, float] = (0.25, 0.5),
) -> Scene:
    """A photo-like scene: textured objects under a lighting gradient, slight blur and sensor noise.

    ``mask`` holds ``class_list.index(name) + 1`` (0 = background); ``labels`` the classes
    still visible after occlusion, in drawing order.
    """
    h, w = size
    image = _background(rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    for name in classes:
        if name not in _ALL_TEXTURES or name not in class_list:
            raise ValueError(f"unknown synthetic class {name!r}; choose from {tuple(class_list)}")
        shape = _shape_mask(rng, h, w, rng.uniform(*object_size))
        angle = rng.uniform(0, 2 * np.pi)
        light = 0.8 + 0.35 * (np.cos(angle) * yy + np.sin(angle) * xx)  # light from one side
        texture = _ALL_TEXTURES[name](h, w, rng) * light[..., None]
        image[shape] = texture[shape]
        mask[shape] = list(class_list).index(name) + 1
    image = gaussian(image, sigma=0.6, channel_axis=-1, preserve_range=True) + rng.normal(0, 3.0, image.shape)
    present = tuple(c for c in classes if (mask == list(class_list).index(c) + 1).any())
    return Scene(np.clip(np.round(image), 0, 255).astype(np.uint8), mask, present)


def _png(mask: np.ndarray) -> bytes:
    img = Image.fromarray(mask, "P")
    img.putpalette(voc_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _void_border(mask: np.ndarray, width: int) -> np.ndarray:
    """VOC-style: a band of 255 (void) ``width`` pixels wide along every object boundary."""
    from scipy import ndimage

    edge = np.zeros(mask.shape, bool)
    for value in np.unique(mask):
        region = mask == value
        edge |= region & ~ndimage.binary_erosion(region, iterations=width, border_value=1)
    out = mask.copy()
    out[edge & (ndimage.binary_dilation(mask > 0, iterations=width))] = 255
    return out


def _check_synthetic(classes: Sequence[str], max_objects: int, train_layout: str, background_fraction: float,
                     size: tuple[int, int], n_train: int, n_val: int) -> None:
    """``ValueError`` for options :func:`write_synthetic_dataset` cannot honour."""
    unknown = [c for c in classes if c not in _ALL_TEXTURES]
    if unknown or not classes:
        raise ValueError(f"unknown synthetic classes {unknown}; choose from {BENCHMARK_CLASSES}")
    if not 1 <= max_objects <= len(classes):
        raise ValueError(f"max_objects must be 1..{len(classes)}")
    if train_layout == "imagefolder" and max_objects > 1:
        raise ValueError("an ImageFolder tree holds one label per image: use max_objects=1 or train_layout='csv'")
    if not 0 <= background_fraction < 1:
        raise ValueError("background_fraction must be in [0, 1)")
    if min(size) < 32 or n_train < 0 or n_val < 0:
        raise ValueError("size must be at least 32 pixels and the image counts non-negative")


def _pick_classes(rng: np.random.Generator, i: int, classes: Sequence[str], max_objects: int,
                  background_fraction: float | None) -> tuple[str, ...]:
    """Image ``i``'s object classes: none (a ``background_fraction`` of the images), else 1..max_objects
    distinct ones, the first cycling through ``classes`` so every class appears early on.
    ``background_fraction`` None (validation images): no draw for it, so no image is background only."""
    if background_fraction is not None and rng.random() < background_fraction:
        return ()
    k = int(rng.integers(1, max_objects + 1))
    first = classes[i % len(classes)]
    others = rng.choice([c for c in classes if c != first], k - 1, replace=False)
    return (first, *(str(c) for c in others))


def write_synthetic_dataset(
    dest: str,
    n_train: int = 200,
    n_val: int = 50,
    seed: int = 0,
    size: int | tuple[int, int] = 160,
    *,
    classes: Sequence[str] = BENCHMARK_CLASSES,
    max_objects: int = 3,
    object_size: tuple[float, float] = (0.25, 0.5),
    background_fraction: float = 0.0,
    train_layout: Literal["csv", "imagefolder"] = "csv",
    void_border: int = 0,
    jpeg_quality: int = 92,
) -> dict[str, Any]:
    """Write a synthetic benchmark to ``dest`` (any fsspec URL); returns its description.

    Layout (all images also in the VOC part, so any split can be scored)::

        JPEGImages/{train,val}_NNNNNN.jpg
        SegmentationClass/<id>.png          palette PNG: 0 = background, i = classes.txt line i, 255 = void
        ImageSets/Segmentation/train.txt, val.txt
        classes.txt                         background, then the object classes (sorted)
        labels.csv                          uri,labels,split  (uri relative: JPEGImages/<id>.jpg; labels a;b)
        train/<class>/<id>.jpg              train_layout="imagefolder" only (one object per image)
        synthetic.json                      parameters, classes, per-split class counts

    Each image has 1..``max_objects`` objects of distinct classes (a ``background_fraction``
    of the training images has none and the label ``background``). Image ``i`` of a split
    depends only on (seed, split, i): byte-identical on rerun, and the first images stay
    the same when ``n_train``/``n_val`` grow. Train on ``labels.csv`` (tags only); the
    training masks are there for oracle studies, never for training the weak model.
    """
    from . import storage

    h, w = (size, size) if isinstance(size, int) else size
    classes = tuple(sorted(classes))
    _check_synthetic(classes, max_objects, train_layout, background_fraction, (h, w), n_train, n_val)
    gt_classes = ("background", *classes)
    rows, ids = [], {"train": [], "val": []}
    counts: dict[str, dict[str, int]] = {"train": dict.fromkeys(gt_classes, 0), "val": dict.fromkeys(gt_classes, 0)}
    for split_no, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        for i in range(n):
            rng = np.random.default_rng([seed, split_no, i])
            image_id = f"{split}_{i:06d}"
            picked = _pick_classes(rng, i, classes, max_objects, background_fraction if split == "train" else None)
            scene = render_benchmark_scene(rng, picked, classes, (h, w), object_size)
            labels = scene.labels or ("background",)
            mask = _void_border(scene.mask, void_border) if void_border else scene.mask
            jpg = _jpeg(scene.image, jpeg_quality)
            storage.write_bytes(storage.join(dest, "JPEGImages", f"{image_id}.jpg"), jpg)
            storage.write_bytes(storage.join(dest, "SegmentationClass", f"{image_id}.png"), _png(mask))
            if split == "train" and train_layout == "imagefolder":
                storage.write_bytes(storage.join(dest, "train", labels[0], f"{image_id}.jpg"), jpg)
            rows.append(f"JPEGImages/{image_id}.jpg,{';'.join(labels)},{split}")
            ids[split].append(image_id)
            for name in labels:
                counts[split][name] += 1
    for split, names in ids.items():
        storage.write_bytes(storage.join(dest, "ImageSets", "Segmentation", f"{split}.txt"),
                            "".join(f"{x}\n" for x in names).encode())
    storage.write_bytes(storage.join(dest, "classes.txt"), "".join(f"{c}\n" for c in gt_classes).encode())
    storage.write_bytes(storage.join(dest, "labels.csv"), ("uri,labels,split\n" + "\n".join(rows) + "\n").encode())
    description = {
        "format": "weakseg.synthetic", "format_version": 1, "classes": list(gt_classes),
        "images": {"train": n_train, "val": n_val}, "label_counts": counts,
        "parameters": {"seed": seed, "size": [h, w], "max_objects": max_objects, "object_size": list(object_size),
                       "background_fraction": background_fraction, "train_layout": train_layout,
                       "void_border": void_border, "jpeg_quality": jpeg_quality},
    }
    storage.write_bytes(storage.join(dest, "synthetic.json"), json.dumps(description, indent=2).encode() + b"\n")
    return description
