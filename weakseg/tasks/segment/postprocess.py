"""Device-side post-processing: a batch's predictions -> ``uint8`` labels and per-class statistics.

What used to run in numpy on the host after copying ``probs[K, H, W]`` back for every image
(16 MB an image at 21 classes and 500x375) runs here in torch on the model's device, one
batch of same-size images at a time: upsampling the score cells to full resolution (the TTA
views averaged), the image-level prior, the argmax, the superpixel vote, the objectness
test, and the per-class statistics (pixel counts, Σ probability of each label over its
pixels, bounding boxes). Only the ``uint8`` label maps and a few ``[256]`` vectors come back.
What goes to the device is the host-side priors' output: superpixel ids and objectness maps
(:func:`~weakseg.tasks.segment.inference.compute_prior_inputs`), 4 bytes a pixel each.

The arithmetic is the numpy path's (:func:`~weakseg.tasks.segment.priors.apply_priors`)
step for step, in the same dtypes (float32 scores, float64 thresholds and sums), so on the
CPU the labels are identical and the statistics equal to float tolerance (the float64 sums
may add in another order); ``tests/test_postprocess.py`` checks this against the numpy path.

Memory: a batch is split so that ``B x K x rows x W`` float32 stays under ``band_bytes``;
an image too large for it alone is labelled in row bands (with sppxl: argmax band by band,
the vote on the whole label map, then a second pass for the test and the sums).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .forward import Prediction, cell_grid, sample_cells
from .model import ModelBundle
from .priors import UNLABELLED, objectness_prior
from .proposals import compute_prior_inputs

__all__ = ["BAND_BYTES", "LABEL_VALUES", "Labelled", "band_bytes", "label_batch", "label_image"]

LABEL_VALUES = 256  # uint8 label values: class indices and 255 (unlabelled)
BAND_BYTES = 64 * 2**20  # full-resolution probabilities are produced in row bands of about this size
# Above this share of a band's pixels between disagreeing cells, upsampling every class at every
# pixel is cheaper than at those pixels alone (on the CPU, measured with trained and random maps).
MAX_UNDECIDED = 0.2


@dataclass
class Labelled:
    """One image's labels and the per-label statistics the ``regions`` rows are made of."""

    labels: np.ndarray  # uint8 [H, W]: class index, or 255 (unlabelled)
    counts: np.ndarray  # int64 [256]: pixels per label value
    prob_sum: np.ndarray  # float64 [256]: Σ p(label) over each label's pixels (mean_prob = prob_sum / counts)
    boxes: np.ndarray  # int64 [256, 4]: x0, y0, x1, y1 (exclusive) of each label present


def band_bytes(device: torch.device) -> int:
    """Probabilities labelled at a time: :data:`BAND_BYTES` on the CPU, 16x that on an accelerator."""
    return BAND_BYTES if device.type == "cpu" else 16 * BAND_BYTES


def label_image(bundle: ModelBundle, pred: Prediction, rgb: np.ndarray, priors: Sequence[str],
                thresholds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Labels ``uint8[H, W]``, Σ probability of each label over its pixels ``[256]``, prior timings.

    One image through the flow's path: the host-side prior inputs, then :func:`label_batch`
    on the model's device (row bands of :func:`band_bytes`, so memory is O(K · band) even
    for very large images).
    """
    inputs, ms = compute_prior_inputs(rgb, priors)
    t0 = time.perf_counter()
    out = label_batch([pred], [inputs], priors, thresholds, len(bundle.classes), bundle.background_index,
                      bundle.device, band_bytes(bundle.device))[0]
    ms["labels"] = (time.perf_counter() - t0) * 1000  # upsampling + applying the priors + statistics
    return out.labels, out.prob_sum, ms


def _group_key(pred: Prediction) -> tuple:
    """Predictions that can share one batched upsampling: same image size, same views."""
    return pred.size, tuple((v.forward_size, v.flipped, v.stride, v.offset) for v in (pred.views or (pred,)))


def label_batch(preds: Sequence[Prediction], inputs: Sequence[Mapping[str, np.ndarray]], priors: Sequence[str],
                thresholds: Mapping[str, np.ndarray] | None, num_classes: int, background_index: int | None,
                device: torch.device | str, band_bytes: int = 64 * 2**20,
                from_cells: bool | None = None) -> list[Labelled]:
    """Labels and statistics of every prediction (in order), computed on ``device``.

    ``from_cells`` (default: on the CPU): a chain without an objectness test (``ilp``,
    ``ilp,sppxl``, none) labels from the score cells where they agree
    (``_Group._argmax_from_cells``), the same result for a third of the CPU time. An
    accelerator upsamples every class in a few kernels instead: the shortcut's per-image
    steps would each wait for it.

    ``inputs[i]``: image i's host-side prior inputs (``superpixels``, ``box_obj``,
    ``seg_obj``, as :func:`~weakseg.tasks.segment.inference.compute_prior_inputs` names
    them) for the chain ``priors``; ``thresholds``: δ by prior (``bb``/``seg``), default
    0.5/K. Same-size images are labelled together, at most ``band_bytes`` of float32
    probabilities at a time.
    """
    if num_classes > UNLABELLED:
        raise ValueError(f"{num_classes} classes do not fit an 8-bit mask with 255 = unlabelled")
    if len(preds) != len(inputs):
        raise ValueError(f"{len(preds)} predictions but {len(inputs)} prior inputs")
    device = torch.device(device)
    groups: dict[tuple, list[int]] = {}
    for i, pred in enumerate(preds):
        groups.setdefault(_group_key(pred), []).append(i)
    out: list[Labelled | None] = [None] * len(preds)
    for members in groups.values():
        h, w = preds[members[0]].size
        per_batch = max(1, band_bytes // max(1, 4 * num_classes * h * w))
        for s in range(0, len(members), per_batch):
            idx = members[s:s + per_batch]
            done = _Group([preds[i] for i in idx], [inputs[i] for i in idx], priors, thresholds, num_classes,
                          background_index, device, band_bytes).run(device.type == "cpu" if from_cells is None
                                                                    else from_cells)
            for i, res in zip(idx, done, strict=True):
                out[i] = res
    return out  # type: ignore[return-value]


class _Group:
    """Same-size predictions labelled as one batch ``[B, K, rows, W]`` on the device."""

    def __init__(self, preds: Sequence[Prediction], inputs: Sequence[Mapping[str, np.ndarray]],
                 priors: Sequence[str], thresholds: Mapping[str, np.ndarray] | None, num_classes: int,
                 background_index: int | None, device: torch.device, band_bytes: int) -> None:
        self.preds, self.priors, self.k, self.dev = preds, tuple(priors), num_classes, device
        self.h, self.w = preds[0].size
        self.b = len(preds)
        self.fill = UNLABELLED if background_index is None else background_index
        self.rows = max(1, band_bytes // max(1, 4 * num_classes * self.w * self.b))
        self.image_probs = self._put(np.stack([np.asarray(p.image_probs, np.float32) for p in preds]))  # [B, K]
        self.superpixels = [np.asarray(i["superpixels"]) for i in inputs] if "sppxl" in priors else None
        self.obj = self.delta = None
        made = [objectness_prior(priors, i.get("box_obj"), i.get("seg_obj"), thresholds, num_classes) for i in inputs]
        if made[0] is not None:
            self.obj = self._put(np.stack([np.asarray(m[0], np.float32) for m in made]))  # [B, H, W]
            self.delta = self._put(np.append(np.asarray(made[0][1], np.float64), np.inf))  # δ[K], ∞ for 255

    def _put(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.dev)

    def _bands(self) -> Iterator[tuple[int, int]]:
        for r0 in range(0, self.h, self.rows):
            yield r0, min(self.h, r0 + self.rows)

    def _probs(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``[B, K, rows, W]`` probabilities of rows ``r0:r1`` (views averaged) and the chain's scores."""
        total = None
        for cells, flipped, gy, gx in self._views(r0, r1):
            up = sample_cells(cells, gy, gx)
            if flipped:
                up = up.flip(-1)
            total = up if total is None else total.add_(up)
        total = self._mean(total)  # Prediction.probs: the views' mean
        scores = total * self.image_probs[:, :, None, None] if "ilp" in self.priors else total
        return total, scores

    def run(self, from_cells: bool) -> list[Labelled]:
        b, h, w = self.b, self.h, self.w
        labels = torch.empty((b, h, w), dtype=torch.uint8, device=self.dev)
        prob_sum = torch.zeros(b * LABEL_VALUES, dtype=torch.float64, device=self.dev)
        image = torch.arange(b, device=self.dev)[:, None, None] * LABEL_VALUES
        obj = self.obj
        bands = list(self._bands())
        if self.superpixels is not None and obj is None and from_cells:  # sppxl: the vote needs labels only
            argmax = torch.empty_like(labels)
            picked = torch.empty((b, h, w), dtype=torch.float32, device=self.dev)
            kept = None
            for r0, r1 in bands:
                argmax[:, r0:r1], picked[:, r0:r1], probs = self._argmax_from_cells(r0, r1)
                kept = probs if len(bands) == 1 else None  # one band: no second upsampling
            labels, _ = self._vote(argmax, None)
            for r0, r1 in bands:
                got = self._relabelled(labels, argmax, picked[:, r0:r1], r0, r1, kept)
                _add_picked(prob_sum, image, labels[:, r0:r1].long(), got)
        elif self.superpixels is not None:
            kept = None
            for r0, r1 in bands:
                probs, scores = self._probs(r0, r1)
                labels[:, r0:r1] = scores.max(1).indices  # argmax (first on ties); faster on the CPU
                kept = (probs, scores) if len(bands) == 1 else None  # one band: no second upsampling
            labels, obj = self._vote(labels, obj)
            for r0, r1 in bands:
                probs, scores = kept or self._probs(r0, r1)
                self._finish(labels, prob_sum, image, r0, r1, probs, scores, obj)
        elif obj is None and from_cells:  # the argmax alone (ilp, or no prior): from the cells where they agree
            for r0, r1 in bands:
                labels[:, r0:r1], picked, _ = self._argmax_from_cells(r0, r1)
                _add_picked(prob_sum, image, labels[:, r0:r1].long(), picked)
        else:
            for r0, r1 in bands:
                probs, scores = self._probs(r0, r1)
                labels[:, r0:r1] = scores.max(1).indices  # argmax (first on ties); faster on the CPU
                self._finish(labels, prob_sum, image, r0, r1, probs, scores, obj)
        counts, boxes = _label_boxes(labels)
        labels_np = labels.cpu().numpy()
        counts_np, sums_np, boxes_np = counts.cpu().numpy(), prob_sum.view(b, -1).cpu().numpy(), boxes.cpu().numpy()
        return [Labelled(labels_np[i], counts_np[i], sums_np[i], boxes_np[i]) for i in range(b)]

    def _views(self, r0: int, r1: int) -> list[tuple[torch.Tensor, bool, torch.Tensor, torch.Tensor]]:
        """Per TTA view: its cells ``[B, K, ch, cw]``, whether it is mirrored, and the grid
        coordinates of rows ``r0:r1`` and of every column (:func:`~.inference.cell_grid`)."""
        out = []
        for v in range(len(self.preds[0].views) or 1):
            views = [p.views[v] if p.views else p for p in self.preds]
            cells = torch.stack([x.cells for x in views]).to(self.dev)
            gy, gx = cell_grid(tuple(cells.shape[-2:]), views[0].forward_size, (self.h, self.w), views[0].stride,
                               views[0].offset, self.dev)
            out.append((cells, views[0].flipped, gy[r0:r1], gx))
        return out

    def _mean(self, total: torch.Tensor) -> torch.Tensor:
        """The views' sum -> their mean, as ``_probs`` divides it (nothing to divide for one plain view)."""
        if not self.preds[0].views:
            return total
        return total / torch.tensor(len(self.preds[0].views), dtype=torch.float32, device=self.dev)

    def _probs_at(self, views: list, i: int, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """float32 ``[K, n]``: image ``i``'s probabilities at pixels ``(ys, xs)`` of the band (views
        averaged), each the value ``_probs`` gives there (``grid_sample`` computes every point alike)."""
        total = None
        for cells, flipped, gy, gx in views:
            cols = (self.w - 1 - xs) if flipped else xs
            pts = torch.stack([gx[cols], gy[ys]], dim=-1)[None, None]  # [1, 1, n, 2]
            vals = F.grid_sample(cells[i:i + 1], pts, mode="bilinear", align_corners=True)[0, :, 0]
            total = vals if total is None else total.add_(vals)
        return self._mean(total)

    def _argmax_from_cells(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Labels of rows ``r0:r1`` and each pixel's probability of its label, as ``_probs`` and the
        argmax give them, without upsampling all K classes everywhere.

        A pixel's scores are a convex combination of the (ILP-scaled) vectors of the cells around
        it, in every view, so where all those cells have the same argmax c the pixel's argmax is c:
        its label needs no upsampling, and its probability only class c's, one channel. Cells whose
        top two scores are within 1e-5 of each other do not count as agreeing (float rounding could
        tip them), and the pixels they reach, like those between cells that disagree (edges), get
        the full K-class upsampling at those pixels alone. Same labels; the same probabilities,
        since ``grid_sample`` computes every point alike. On the CPU, at 21 classes and 500 px,
        ``label_batch`` takes 12 ms an image this way, 24 upsampling every class. Maps so noisy
        that more than :data:`MAX_UNDECIDED` of the pixels lie between disagreeing cells (an
        untrained model's) are upsampled the plain way, whose probabilities come back too.
        """
        b = self.b
        views = self._views(r0, r1)
        agreed = picked = None
        for cells, flipped, gy, gx in views:
            ch, cw = cells.shape[-2:]
            scores = cells * self.image_probs[:, :, None, None] if "ilp" in self.priors else cells
            best = scores.max(1)
            if self.k > 1:
                top2 = scores.topk(2, dim=1).values
                sure = (top2[:, 0] - top2[:, 1]) > 1e-5 * top2[:, 0].abs()
            else:
                sure = torch.ones_like(best.indices, dtype=torch.bool)
            cell_label = torch.where(sure, best.indices, -1)  # [B, ch, cw]; -1: not sure
            if _undecided_cells(cell_label) > MAX_UNDECIDED:  # noisy maps: cheaper to upsample every class
                return self._argmax_everywhere(r0, r1)
            (ylo, ymid, yhi), (xlo, xmid, xhi) = _neighbours(gy, ch), _neighbours(gx, cw)
            a0, a1, a2 = cell_label[:, :, xlo], cell_label[:, :, xmid], cell_label[:, :, xhi]
            across = torch.where((a0 == a1) & (a1 == a2), a0, -1)  # [B, ch, W]
            c0, c1, c2 = across[:, ylo], across[:, ymid], across[:, yhi]
            label = torch.where((c0 == c1) & (c1 == c2), c0, -1)  # [B, rows, W]
            own = cells.gather(1, best.indices[:, None])  # [B, 1, ch, cw]: each cell's p(its argmax)
            up = sample_cells(own, gy, gx)[:, 0]
            if flipped:
                label, up = label.flip(-1), up.flip(-1)
            agreed = label if agreed is None else torch.where(agreed == label, agreed, -1)
            picked = up if picked is None else picked.add_(up)
        undecided = agreed < 0
        if float(undecided.float().mean()) > MAX_UNDECIDED:
            return self._argmax_everywhere(r0, r1)
        picked = self._mean(picked)
        for i in range(b):  # the rest: every class, at those pixels only
            ys, xs = torch.nonzero(undecided[i], as_tuple=True)
            if len(ys):
                probs = self._probs_at(views, i, ys, xs)
                scores = probs * self.image_probs[i, :, None] if "ilp" in self.priors else probs
                lab = scores.max(0).indices
                agreed[i, ys, xs] = lab
                picked[i, ys, xs] = probs.gather(0, lab[None])[0]
        return agreed.to(torch.uint8), picked, None

    def _argmax_everywhere(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_argmax_from_cells``'s result the plain way (every class upsampled at every pixel),
        with those probabilities."""
        probs, scores = self._probs(r0, r1)
        labels = scores.max(1).indices  # argmax (first on ties)
        return labels.to(torch.uint8), probs.gather(1, labels[:, None])[:, 0], probs

    def _relabelled(self, labels: torch.Tensor, before: torch.Tensor, picked: torch.Tensor, r0: int,
                    r1: int, probs: torch.Tensor | None) -> torch.Tensor:
        """``picked`` (p of each pixel's label ``before``, rows ``r0:r1``) where the label is
        unchanged, p of its new label where the superpixel vote changed it (from ``probs``, the
        band's probabilities, when they were computed)."""
        changed = labels[:, r0:r1] != before[:, r0:r1]
        if probs is not None or float(changed.float().mean()) > MAX_UNDECIDED:
            probs = self._probs(r0, r1)[0] if probs is None else probs
            return probs.gather(1, labels[:, r0:r1].long()[:, None])[:, 0]
        views = None
        for i in range(self.b):
            ys, xs = torch.nonzero(changed[i], as_tuple=True)
            if len(ys):
                views = views or self._views(r0, r1)
                probs = self._probs_at(views, i, ys, xs)
                picked[i, ys, xs] = probs.gather(0, labels[i, r0:r1][ys, xs].long()[None])[0]
        return picked

    def _vote(self, labels: torch.Tensor, obj: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SP-sppxl on the device: each superpixel's majority label (ties: the smaller); with an
        objectness map, p(Obj) averaged per superpixel too (:func:`~.priors.smooth_for_objectness`)."""
        ids, offset = [], 0
        for sp in self.superpixels:
            if sp.shape != (self.h, self.w):
                raise ValueError(f"superpixels {sp.shape} and labels {(self.h, self.w)} differ in shape")
            sp = sp.astype(np.int64, copy=False)
            lo, hi = (int(sp.min()), int(sp.max())) if sp.size else (0, -1)
            if lo < 0 or hi >= 4 * sp.size:  # ids far from 0..S-1: make them dense (same vote, smaller tables)
                sp = np.unique(sp.ravel(), return_inverse=True)[1].reshape(sp.shape)
                hi = int(sp.max()) if sp.size else -1
            ids.append(sp + offset)
            offset += hi + 1
        seg = self._put(np.stack(ids)).view(-1)
        votes = torch.bincount(seg * LABEL_VALUES + labels.view(-1).long(), minlength=offset * LABEL_VALUES)
        winner = votes.view(offset, LABEL_VALUES).argmax(1).to(torch.uint8)
        voted = winner[seg].view(labels.shape)
        if obj is None:
            return voted, None
        sums = torch.zeros(offset, dtype=torch.float64, device=self.dev).index_add_(0, seg, obj.reshape(-1).double())
        sizes = torch.bincount(seg, minlength=offset).clamp_(min=1)
        return voted, (sums / sizes)[seg].float().view(obj.shape)

    def _finish(self, labels: torch.Tensor, prob_sum: torch.Tensor, image: torch.Tensor, r0: int, r1: int,
                probs: torch.Tensor, scores: torch.Tensor, obj: torch.Tensor | None) -> None:
        """One band: the objectness test (:func:`~.priors.keep_objects`) and Σ p(label) per label."""
        k = self.k
        lab = labels[:, r0:r1].long()
        if obj is not None:
            own = scores.gather(1, lab.clamp(max=k - 1)[:, None])[:, 0]
            own = torch.where(lab < k, own, torch.zeros((), dtype=own.dtype, device=self.dev))  # ŷ'(label), float32
            keep = (own * obj[:, r0:r1]).double() > self.delta[lab.clamp(max=k)]
            labels[:, r0:r1] = torch.where(keep, labels[:, r0:r1], torch.full((), self.fill, dtype=torch.uint8,
                                                                              device=self.dev))
            lab = labels[:, r0:r1].long()
        _add_picked(prob_sum, image, lab, probs.gather(1, lab.clamp(max=k - 1)[:, None])[:, 0])


def _add_picked(prob_sum: torch.Tensor, image: torch.Tensor, lab: torch.Tensor, picked: torch.Tensor) -> None:
    """Σ p(label) per image and label: ``picked`` (each pixel's p of its label ``lab``, ``[B, rows, W]``)
    added into ``prob_sum`` (float64 ``[B * 256]``; ``image``: each image's offset into it)."""
    prob_sum.index_add_(0, (image + lab).view(-1), picked.reshape(-1).double())


def _undecided_cells(cell_label: torch.Tensor) -> float:
    """Share of 2x2 cell blocks ``[B, ch, cw]`` that are not one sure label: about the share of
    pixels :meth:`_Group._argmax_from_cells` would have to upsample every class at."""
    if min(cell_label.shape[-2:]) < 2:
        return float((cell_label < 0).float().mean())
    top = cell_label[..., :-1, :-1]
    mixed = ((top < 0) | (top != cell_label[..., 1:, :-1]) | (top != cell_label[..., :-1, 1:])
             | (top != cell_label[..., 1:, 1:]))
    return float(mixed.float().mean())


def _neighbours(g: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For grid coordinates ``g`` on an axis of ``cells`` cells: three cell indices per output that
    cover every cell ``grid_sample`` may read there (two, or three where it sits within 1e-3 of a
    cell, so that its own rounding of the coordinate cannot reach past them)."""
    pos = (g + 1) / 2 * (cells - 1)
    lo = torch.floor(pos - 1e-3).clamp(0, cells - 1).long()
    hi = (torch.floor(pos + 1e-3) + 1).clamp(0, cells - 1).long()
    return lo, torch.minimum(lo + 1, hi), hi


def _label_boxes(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel counts ``[B, 256]`` and bounding boxes ``[B, 256, 4]`` (x0, y0, x1, y1) of each label value."""
    b, h, w = labels.shape
    dev, lab = labels.device, labels.long()
    ar_b = torch.arange(b, device=dev)[:, None, None]
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    per_row = torch.bincount(((ar_b * h + ar_h[:, None]) * LABEL_VALUES + lab).view(-1),
                             minlength=b * h * LABEL_VALUES).view(b, h, LABEL_VALUES) > 0
    per_col = torch.bincount(((ar_b * w + ar_w[None, :]) * LABEL_VALUES + lab).view(-1),
                             minlength=b * w * LABEL_VALUES).view(b, w, LABEL_VALUES) > 0
    counts = torch.bincount((ar_b * LABEL_VALUES + lab).view(-1), minlength=b * LABEL_VALUES).view(b, LABEL_VALUES)
    y0 = torch.where(per_row, ar_h[None, :, None], h).amin(1)
    y1 = torch.where(per_row, ar_h[None, :, None], -1).amax(1) + 1
    x0 = torch.where(per_col, ar_w[None, :, None], w).amin(1)
    x1 = torch.where(per_col, ar_w[None, :, None], -1).amax(1) + 1
    return counts, torch.stack([x0, y0, x1, y1], dim=-1)
