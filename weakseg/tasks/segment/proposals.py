"""Superpixels and object proposals for the smoothing priors, from scikit-image and numpy.

The paper used BING boxes and MCG segments. Neither ships with a Python package we can
install offline: OpenCV's BING (``cv2.saliency``) and EdgeBoxes (``cv2.ximgproc``) need
``opencv-contrib`` *and* trained model files that are downloaded separately, and selective
search (``cv2.ximgproc.segmentation``) needs contrib and gives ranks, not scores. The
equivalents here use only scikit-image's Felzenszwalb-Huttenlocher segmentation, which is
already a dependency:

- **Superpixels** (SP-sppxl): :func:`superpixels`, Felzenszwalb-Huttenlocher as in the
  paper, computed on the image shrunk to at most ``max_side`` and mapped back.
- **Boxes** (SP-bb, in place of BING): :func:`box_proposals`, selective-search style
  candidates — the bounding boxes of the regions of three FH levels (scales 50/150/400)
  and of every pair of adjacent regions — scored by *superpixel straddling* (Alexe et al.,
  "Measuring the objectness of image windows", TPAMI 2012, the cue BING approximates:
  SS(b) = 1 - Σ_s min(|s \\ b|, |s ∩ b|) / |b| over the finest level's superpixels) times
  the box's *boundary score* (below, with the box's sides on the image border).
- **Segments** (SP-seg, in place of MCG): :func:`segment_proposals`, the regions of the
  same three FH levels (a coarse-to-fine hierarchy like MCG's levels), scored by their
  *boundary connectivity* (Zhu et al., "Saliency optimization from robust background
  detection", CVPR 2014): BndCon(r) = |r on the image border| / sqrt(|r|), score
  exp(-BndCon² / 2). Sky, grass, road and walls run off the frame; objects mostly do not.
  Straddling alone favours the large uniform regions stuff is made of, and colour
  contrast hardly tells objects from stuff; ``bench/objectness.py`` measures how well
  each objectness map separates object from stuff pixels on MSRC-21.

Proposals are computed on the image shrunk to ``work_side`` (128 px by default): priors
act on object-sized structures, and the cost stays a few ms per image whatever the image
size. Measured costs are in the README (``bench/segment.py``).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb

from .priors import box_objectness, segment_objectness

__all__ = [
    "FH_LEVELS",
    "PRIOR_INPUTS",
    "SUPERPIXEL_SIDE",
    "boundary_score",
    "box_objectness_map",
    "box_proposals",
    "compute_prior_inputs",
    "segment_objectness_map",
    "segment_proposals",
    "superpixels",
]

FH_LEVELS = (50.0, 150.0, 400.0)  # Felzenszwalb scales of the proposal hierarchy, fine to coarse
# Longer side SP-sppxl segments at. 160 px (was 256): ~4x cheaper (16 vs 69 ms on a 480x320
# photo, 2-core CPU) and no worse on MSRC-21-objects train (40 images, ilp+sppxl mean IoU
# 0.359 vs 0.348; ilp+sppxl+seg 0.381 vs 0.371; docs/benchmarks.md).
SUPERPIXEL_SIDE = 160


def _work_shape(h: int, w: int, side: int) -> tuple[int, int]:
    """``(h, w)`` shrunk so the longer side is at most ``side`` (never enlarged)."""
    scale = min(1.0, side / max(h, w))
    if scale >= 1.0:
        return h, w
    return max(1, round(h * scale)), max(1, round(w * scale))


def _shrink(rgb: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    sh, sw = _work_shape(h, w, side)
    if (sh, sw) == (h, w):
        return rgb, 1.0
    return cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA), min(1.0, side / max(h, w))


def superpixels(rgb: np.ndarray, scale: float = 100.0, sigma: float = 0.5, min_size: int = 50,
                max_side: int = SUPERPIXEL_SIDE) -> np.ndarray:
    """Felzenszwalb-Huttenlocher superpixel ids ``int32[H, W]`` at the image's resolution.

    Large images are segmented shrunk to ``max_side`` (``min_size`` scaled along) and the
    ids mapped back by nearest neighbour, which bounds the cost (~O(max_side²)).
    """
    h, w = rgb.shape[:2]
    small, s = _shrink(rgb, max_side)
    seg = felzenszwalb(small, scale=scale, sigma=sigma, min_size=max(1, round(min_size * s * s)))
    if small.shape[:2] != (h, w):
        seg = cv2.resize(seg.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    return seg.astype(np.int32)


def _levels(small: np.ndarray) -> list[np.ndarray]:
    return [felzenszwalb(small, scale=s, sigma=0.8, min_size=20).astype(np.int64) for s in FH_LEVELS]


def _region_boxes(seg: np.ndarray) -> np.ndarray:
    """Bounding boxes ``[S, 4]`` (x0, y0, x1, y1, exclusive) of the regions 0..S-1 of ``seg``."""
    boxes = []
    for sl in ndimage.find_objects(seg + 1):
        boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop) if sl is not None else (0, 0, 0, 0))
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def _adjacent_pairs(seg: np.ndarray) -> np.ndarray:
    pairs = [np.stack([seg[:, :-1].ravel(), seg[:, 1:].ravel()], 1),
             np.stack([seg[:-1, :].ravel(), seg[1:, :].ravel()], 1)]
    p = np.concatenate(pairs)
    p = p[p[:, 0] != p[:, 1]]
    return np.unique(np.sort(p, axis=1), axis=0)


def _straddling(seg: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Superpixel straddling SS of each box against the superpixels ``seg`` (Alexe et al.)."""
    h, w = seg.shape
    n = int(seg.max()) + 1
    onehot = np.zeros((n, h + 1, w + 1), dtype=np.int32)
    onehot[seg, np.arange(h)[:, None] + 1, np.arange(w)[None, :] + 1] = 1
    integral = onehot.cumsum(1).cumsum(2)
    x0, y0, x1, y1 = boxes.T
    inside = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]  # [S, N]
    sizes = integral[:, h, w][:, None]
    straddle = np.minimum(inside, sizes - inside).sum(0)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return np.clip(1.0 - straddle / area, 0.0, 1.0)


def boundary_score(on_border: np.ndarray, area: np.ndarray) -> np.ndarray:
    """exp(-BndCon² / 2), BndCon = border length / sqrt(area) (Zhu et al. 2014, sigma = 1)."""
    bndcon = np.asarray(on_border, np.float64) / np.sqrt(np.maximum(np.asarray(area, np.float64), 1.0))
    return np.exp(-0.5 * bndcon**2)


def _box_boundary_score(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """:func:`boundary_score` of boxes ``[N, 4]`` whose sides lie on the border of an image of ``shape``."""
    h, w = shape
    x0, y0, x1, y1 = boxes.T
    bw, bh = x1 - x0, y1 - y0
    on_border = (x0 <= 0) * bh + (x1 >= w) * bh + (y0 <= 0) * bw + (y1 >= h) * bw
    return boundary_score(on_border, bw * bh)


def box_proposals(rgb: np.ndarray, work_side: int = 128, max_area: float = 0.9,
                  min_area: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """Box proposals ``(boxes[N, 4] x0,y0,x1,y1 in image pixels, scores[N] in [0, 1])``."""
    h, w = rgb.shape[:2]
    small, _ = _shrink(rgb, work_side)
    sh, sw = small.shape[:2]
    levels = _levels(small)
    boxes = []
    for seg in levels:
        rb = _region_boxes(seg)
        boxes.append(rb)
        pairs = _adjacent_pairs(seg)
        if len(pairs):
            a, b = rb[pairs[:, 0]], rb[pairs[:, 1]]
            boxes.append(np.concatenate([np.minimum(a[:, :2], b[:, :2]), np.maximum(a[:, 2:], b[:, 2:])], 1))
    all_boxes = np.unique(np.concatenate(boxes), axis=0)
    area = (all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1]) / float(sh * sw)
    all_boxes = all_boxes[(area >= min_area) & (area <= max_area)]
    if not len(all_boxes):
        return np.zeros((0, 4)), np.zeros(0)
    scores = _straddling(levels[0], all_boxes) * _box_boundary_score(all_boxes, (sh, sw))
    scaled = all_boxes.astype(np.float64) * np.array([w / sw, h / sh, w / sw, h / sh])
    return scaled, scores


def _border_pixels(shape: tuple[int, int]) -> np.ndarray:
    border = np.zeros(shape, dtype=bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    return border


def segment_proposals(rgb: np.ndarray, work_side: int = 128,
                      min_area: float = 0.005) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[int, int]]:
    """Segment proposals as layers for :func:`~weakseg.tasks.segment.priors.segment_objectness`.

    Returns ``(layers, work_shape)``: one ``(segments, scores)`` layer per FH level at the
    working resolution; regions under ``min_area`` of the image get a NaN score (not a
    proposal). Scores are the regions' :func:`boundary_score`.
    """
    small, _ = _shrink(rgb, work_side)
    sh, sw = small.shape[:2]
    border = _border_pixels((sh, sw))
    layers = []
    for seg in _levels(small):
        n = int(seg.max()) + 1
        sizes = np.bincount(seg.ravel(), minlength=n)
        scores = boundary_score(np.bincount(seg[border], minlength=n), sizes)
        scores[sizes < min_area * sh * sw] = np.nan
        layers.append((seg, scores))
    return layers, (sh, sw)


def box_objectness_map(rgb: np.ndarray, work_side: int = 128) -> np.ndarray:
    """p_ij(Obj) from :func:`box_proposals`, computed at the working resolution and resized."""
    h, w = rgb.shape[:2]
    boxes, scores = box_proposals(rgb, work_side)
    sh, sw = _work_shape(h, w, work_side)  # the resolution box_proposals worked at
    obj = box_objectness(boxes * np.array([sw / w, sh / h, sw / w, sh / h]), scores, (sh, sw))
    if (sh, sw) != (h, w):
        obj = cv2.resize(obj, (w, h), interpolation=cv2.INTER_LINEAR)
    return obj.astype(np.float32)


def segment_objectness_map(rgb: np.ndarray, work_side: int = 128) -> np.ndarray:
    """p_ij(Obj) from :func:`segment_proposals`, computed at the working resolution and resized."""
    layers, shape = segment_proposals(rgb, work_side)
    obj = segment_objectness(layers, shape)
    h, w = rgb.shape[:2]
    if shape != (h, w):
        obj = cv2.resize(obj, (w, h), interpolation=cv2.INTER_LINEAR)
    return obj.astype(np.float32)


# The keyword (of apply_priors, and key of compute_prior_inputs' result) each prior's input goes by.
PRIOR_INPUTS = {"sppxl": "superpixels", "bb": "box_obj", "seg": "seg_obj"}


def compute_prior_inputs(rgb: np.ndarray, priors: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The superpixels / objectness maps the priors need, with the time each took (ms)."""
    inputs, ms = {}, {}
    makers = {"sppxl": superpixels, "bb": box_objectness_map, "seg": segment_objectness_map}
    for prior in priors:
        if prior in makers:
            t0 = time.perf_counter()
            inputs[PRIOR_INPUTS[prior]] = makers[prior](rgb)
            ms[prior] = (time.perf_counter() - t0) * 1000
    return inputs, ms
