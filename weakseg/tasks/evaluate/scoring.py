"""Scoring segmentations against PASCAL VOC-layout ground truth.

Pure functions first (class alignment, confusion matrices, metrics), then the readers:
VOC-layout ground truth and segment-corpus output tables, from any fsspec URL.

Conventions (the ones PASCAL VOC's devkit uses, plus what corpora with other class lists
need):

- Ground-truth value 255 is *void*: the pixel is not scored at all, whatever is predicted.
- The confusion matrix has one row per ground-truth class and one column per ground-truth
  class, then one column per predicted class the ground truth does not know (matched by
  name, case-insensitively), then ``(unlabelled)`` for predicted 255. A pixel in the last
  two kinds of columns is a false negative of its ground-truth class and a false positive
  of no scored class.
- When the ground truth has a ``background`` class and the run's classes do not, predicted
  255 ("no class") *is* background (``unlabelled_as_background``, on by default): that is
  how a model without a background class says background.
- Per-class IoU = TP / (TP + FP + FN) (the paper's "AP"); NaN for a class that is in
  neither the ground truth nor the prediction of any scored image, and such classes are
  left out of the mean IoU. Class accuracy = TP / ground-truth pixels (recall); NaN and
  out of the mean class accuracy for classes without ground-truth pixels. Pixel accuracy
  = correctly labelled / all non-void ground-truth pixels.
"""
from __future__ import annotations

import glob
import io
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from PIL import Image

from .. import storage
from ..images import IMAGE_EXTENSIONS
from ..ingest.label_maps import VOC_CLASSES
from ..uris import split_tar_uri

__all__ = [
    "UNLABELLED_NAME",
    "VOID",
    "ClassAlignment",
    "ImageScore",
    "PredictedMask",
    "align_classes",
    "confusion_matrix",
    "decode_mask",
    "find_predicted_masks",
    "latest_run",
    "metrics_document",
    "read_gt_classes",
    "read_runs",
    "read_split_ids",
    "read_voc_image",
    "score_image",
    "segmentation_metrics",
    "unmatched_scores",
    "voc_image_url",
]

VOID = 255
UNLABELLED_NAME = "(unlabelled)"  # the confusion column of predicted 255 (priors.UNLABELLED)


def _norm(name: str) -> str:
    return name.strip().lower()


# ---------------------------------------------------------------------------------------------
# metrics (pure)


@dataclass(frozen=True)
class ClassAlignment:
    """How predicted class indices land in the ground truth's class space."""

    gt_classes: tuple[str, ...]
    pred_classes: tuple[str, ...]
    columns: tuple[str, ...]  # confusion columns: gt classes, unknown predicted classes, (unlabelled)
    lut: np.ndarray = field(repr=False)  # int64[256]: predicted value -> column; -1 = not a valid value

    @property
    def unlabelled_column(self) -> int:
        return int(self.lut[VOID])


def align_classes(gt_classes: Sequence[str], pred_classes: Sequence[str],
                  unlabelled_as_background: bool = True) -> ClassAlignment:
    """Map predicted class indices onto ground-truth classes by name."""
    gt_classes, pred_classes = tuple(gt_classes), tuple(pred_classes)
    for what, names in (("ground-truth", gt_classes), ("predicted", pred_classes)):
        dupes = sorted({n for n in names if [_norm(m) for m in names].count(_norm(n)) > 1})
        if dupes:
            raise ValueError(f"{what} classes name {dupes} more than once")
    if not gt_classes:
        raise ValueError("the ground truth has no classes")
    if len(gt_classes) > VOID or len(pred_classes) > VOID:
        raise ValueError(f"at most {VOID} classes fit in 8-bit masks (255 is reserved)")
    index = {_norm(n): i for i, n in enumerate(gt_classes)}
    columns = list(gt_classes)
    lut = np.full(256, -1, np.int64)
    for i, name in enumerate(pred_classes):
        j = index.get(_norm(name))
        if j is None:
            columns.append(name)
            j = len(columns) - 1
        lut[i] = j
    background = index.get("background")
    if unlabelled_as_background and background is not None and "background" not in map(_norm, pred_classes):
        lut[VOID] = background
    else:
        columns.append(UNLABELLED_NAME)
        lut[VOID] = len(columns) - 1
    return ClassAlignment(gt_classes, pred_classes, tuple(columns), lut)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, alignment: ClassAlignment) -> np.ndarray:
    """Pixel counts, rows = ground-truth classes, columns = ``alignment.columns``; void ignored."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction is {_size(pred)} but the ground truth is {_size(gt)} (width x height)")
    k, c = len(alignment.gt_classes), len(alignment.columns)
    valid = gt != VOID
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= k):
        bad = sorted(int(v) for v in np.unique(g[(g < 0) | (g >= k)]))
        raise ValueError(f"ground truth has class values {bad} but {k} classes (255 = void)")
    if p.size and (p.min() < 0 or p.max() > VOID):
        raise ValueError(f"prediction has values outside 0..255: {int(p.min())}..{int(p.max())}")
    cols = alignment.lut[p]
    if (cols < 0).any():
        bad = sorted(int(v) for v in np.unique(p[cols < 0]))
        raise ValueError(f"prediction has class values {bad} but the run has {len(alignment.pred_classes)} "
                         "classes (255 = unlabelled)")
    return np.bincount(g * c + cols, minlength=k * c).reshape(k, c)


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}" if a.ndim == 2 else str(a.shape)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def segmentation_metrics(conf: np.ndarray, alignment: ClassAlignment) -> dict[str, Any]:
    """Per-class IoU and accuracy, mean IoU, pixel accuracy, mean class accuracy (NaN when undefined)."""
    conf = np.asarray(conf, np.int64)
    k = len(alignment.gt_classes)
    if conf.shape != (k, len(alignment.columns)):
        raise ValueError(f"confusion matrix is {conf.shape}, expected {(k, len(alignment.columns))}")
    tp = np.diag(conf[:, :k]).copy()
    gt_pixels = conf.sum(axis=1)
    pred_pixels = conf[:, :k].sum(axis=0)  # predicted as class k on non-void ground truth
    fn, fp = gt_pixels - tp, pred_pixels - tp
    iou = _ratio(tp, tp + fp + fn)
    accuracy = _ratio(tp, gt_pixels)
    precision = _ratio(tp, pred_pixels)
    total = int(conf.sum())
    return {
        "mean_iou": _nanmean(iou),
        "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
        "mean_class_accuracy": _nanmean(accuracy),
        "classes_in_mean": int((~np.isnan(iou)).sum()),
        "pixels": total,
        "per_class": {
            name: {"index": i, "iou": float(iou[i]), "accuracy": float(accuracy[i]),
                   "precision": float(precision[i]), "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]),
                   "gt_pixels": int(gt_pixels[i]), "pred_pixels": int(pred_pixels[i])}
            for i, name in enumerate(alignment.gt_classes)
        },
    }


# ---------------------------------------------------------------------------------------------
# ground truth (VOC layout)


def read_gt_classes(ground_truth: str) -> tuple[str, ...]:
    """Class names in index order: ``classes.txt`` (one per line) or the 21 PASCAL VOC classes."""
    url = storage.join(ground_truth, "classes.txt")
    if not storage.exists(url):
        return VOC_CLASSES
    names = tuple(line.strip() for line in storage.read_bytes(url).decode("utf-8-sig").splitlines() if line.strip())
    if not names:
        raise ValueError(f"{url} lists no classes")
    return names


def read_split_ids(ground_truth: str, split: str) -> list[str]:
    """Image ids of ``ImageSets/Segmentation/<split>.txt`` in file order, without duplicates."""
    folder = storage.join(ground_truth, "ImageSets", "Segmentation")
    url = storage.join(folder, f"{split}.txt")
    if not storage.exists(url):
        fs, path = storage.url_to_fs(folder)
        have = sorted(posixpath.basename(p)[:-4] for p in fs.ls(path, detail=False) if p.endswith(".txt")) \
            if fs.isdir(path) else []
        raise ValueError(f"split {split!r} not found: {url} does not exist (splits there: {have or 'none'})")
    ids = [line.split()[0] for line in storage.read_bytes(url).decode("utf-8-sig").splitlines() if line.strip()]
    return list(dict.fromkeys(ids))


def gt_mask_url(ground_truth: str, image_id: str) -> str:
    return storage.join(ground_truth, "SegmentationClass", f"{image_id}.png")


def _voc_image_candidates(ground_truth: str, image_id: str) -> list[str]:
    """``JPEGImages/<id>.<ext>`` files with an image extension (any case), as URLs."""
    fs, folder = storage.url_to_fs(storage.join(ground_truth, "JPEGImages"))
    found = fs.glob(posixpath.join(folder, glob.escape(image_id) + ".*"))
    return sorted(storage.to_url(fs, p) for p in found if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS)


def _no_voc_image(ground_truth: str, image_id: str, found: list[str]) -> Exception:
    if found:
        return ValueError(f"{storage.redact_url(ground_truth)}: JPEGImages/ holds several images of id {image_id!r} "
                          f"({[posixpath.basename(f) for f in found]}); keep one")
    return FileNotFoundError(f"{storage.redact_url(ground_truth)}: no image of id {image_id!r} in JPEGImages/ (a VOC "
                             f"layout holds JPEGImages/{image_id}.jpg, or the same name with another image "
                             f"extension: {', '.join(IMAGE_EXTENSIONS)})")


def voc_image_url(ground_truth: str, image_id: str) -> str:
    """The image of ``image_id`` in a VOC layout: ``JPEGImages/<id>.jpg`` or, when there is none,
    the one file ``JPEGImages/<id>.<ext>`` with another image extension (PNG, ...)."""
    url = storage.join(ground_truth, "JPEGImages", f"{image_id}.jpg")
    if storage.exists(url):
        return url
    found = _voc_image_candidates(ground_truth, image_id)
    if len(found) != 1:
        raise _no_voc_image(ground_truth, image_id, found)
    return found[0]


def read_voc_image(ground_truth: str, image_id: str) -> bytes:
    """The bytes of :func:`voc_image_url`, read without a listing when the image is a ``.jpg``.

    Raises ``FileNotFoundError`` saying what a VOC layout holds when there is no such image.
    """
    try:
        return storage.read_bytes(storage.join(ground_truth, "JPEGImages", f"{image_id}.jpg"))
    except FileNotFoundError:
        found = _voc_image_candidates(ground_truth, image_id)
        if len(found) != 1:
            raise _no_voc_image(ground_truth, image_id, found) from None
        return storage.read_bytes(found[0])


def decode_mask(data: bytes) -> np.ndarray:
    """A label PNG as a uint8 HxW array of index values (palette indices for palette PNGs)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("P", "L", "I", "I;16", "I;16B"):
            raise ValueError(f"a label mask must be a palette or grey PNG, not mode {img.mode}")
        arr = np.asarray(img)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > VOID):
            raise ValueError(f"label values outside 0..255 ({int(arr.min())}..{int(arr.max())})")
        arr = arr.astype(np.uint8)
    return arr


# ---------------------------------------------------------------------------------------------
# predictions (segment-corpus output tables)


def _dataset(url: str) -> ds.Dataset | None:
    fs, path = storage.url_to_fs(url)
    if not fs.exists(path):
        return None
    return ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")


def read_runs(predictions: str) -> list[dict[str, Any]]:
    """Rows of ``{predictions}/runs`` (run_id, classes, started_at, ended_at, ...)."""
    dataset = _dataset(storage.join(predictions, "runs"))
    if dataset is None:
        raise ValueError(f"{storage.join(predictions, 'runs')} does not exist: is {predictions} a "
                         "segment-corpus output folder?")
    names = set(dataset.schema.names)
    missing = {"run_id", "classes"} - names
    if missing:
        raise ValueError(f"the runs table of {predictions} lacks columns {sorted(missing)}")
    columns = [c for c in ("run_id", "classes", "started_at", "ended_at", "model_id", "priors", "state")
               if c in names]
    return dataset.to_table(columns=columns).to_pylist()


def _when(row: dict[str, Any]) -> str:
    value = row.get("ended_at") or row.get("started_at")
    return "" if value is None else (value.isoformat() if hasattr(value, "isoformat") else str(value))


def latest_run(runs: Sequence[dict[str, Any]], run_id: str | None = None,
               include_failed: bool = False) -> dict[str, Any]:
    """The run to score: ``run_id`` when given (whatever its state), else the latest finished one
    by ended_at that did not fail (``state`` Failed), unless ``include_failed``.

    Runs without ``ended_at`` (still going, or killed) are chosen only when no run has
    ended, then by started_at.
    """
    if not runs:
        raise ValueError("the runs table is empty")
    if run_id is not None:
        chosen = [r for r in runs if r["run_id"] == run_id]
        if not chosen:
            known = sorted({r["run_id"] for r in runs})
            raise ValueError(f"run {run_id!r} not in the runs table (runs: {known[-10:]})")
        runs = chosen
    elif not include_failed:
        ok = [r for r in runs if r.get("state") != "Failed"]
        if not ok:
            raise ValueError(f"every run in the runs table failed ({sorted(r['run_id'] for r in runs)[-10:]}); "
                             "pick one with --run-id or pass --include-failed")
        runs = ok
    ended = [r for r in runs if r.get("ended_at") is not None]
    return max(ended or runs, key=lambda r: (_when(r), r["run_id"]))


@dataclass(frozen=True)
class PredictedMask:
    image_id: str  # ground-truth id it was matched to
    image_key: str
    width: int
    height: int
    mask_png: bytes


def _stem(uri: str) -> str:
    """File name without extension; for ``tar://member::archive`` the member's."""
    member_of = split_tar_uri(uri)
    if member_of is not None:
        uri = member_of[0]
    name = posixpath.basename(uri.rstrip("/"))
    return name.rsplit(".", 1)[0] if "." in name else name


def find_predicted_masks(predictions: str, run_id: str, image_ids: Sequence[str],
                         batch_rows: int = 1024) -> tuple[dict[str, PredictedMask], dict[str, Any]]:
    """The masks of ``run_id`` for the given ground-truth ids, and matching counts.

    ``counts["image_status"]`` holds the images table's ``status`` of each matched id, so
    a missing mask can be told apart from an image the run failed on.

    An id matches an image whose ``image_key`` equals it, else whose ``image_uri`` has it
    as file stem (``JPEGImages/2007_000033.jpg`` -> ``2007_000033``). Several images with
    the same stem make that id ambiguous: it is reported, not guessed.
    """
    key_to_id, ambiguous, status = _match_image_keys(predictions, run_id, set(image_ids), batch_rows)
    masks = _dataset(storage.join(predictions, "masks"))
    if masks is None:
        raise ValueError(f"{storage.join(predictions, 'masks')} does not exist")
    missing_cols = {"run_id", "image_key", "mask_png"} - set(masks.schema.names)
    if missing_cols:
        raise ValueError(f"the masks table of {predictions} lacks columns {sorted(missing_cols)}")
    found: dict[str, PredictedMask] = {}
    run_masks = duplicates = 0
    flt = ds.field("run_id") == run_id
    for batch in masks.to_batches(columns=["image_key"], filter=flt, batch_size=batch_rows * 16):
        run_masks += batch.num_rows
    cols = ["image_key", "width", "height", "mask_png"]
    flt = flt & ds.field("image_key").isin(sorted(key_to_id))
    for batch in masks.to_batches(columns=[c for c in cols if c in masks.schema.names], filter=flt,
                                  batch_size=batch_rows):
        for row in batch.to_pylist():
            image_id = key_to_id[row["image_key"]]
            if image_id in ambiguous:
                continue
            if image_id in found:
                duplicates += 1
                continue
            found[image_id] = PredictedMask(image_id, row["image_key"], int(row.get("width") or 0),
                                            int(row.get("height") or 0), row["mask_png"])
    counts = {"run_masks": run_masks, "duplicate_masks": duplicates, "ambiguous": ambiguous, "image_status": status,
              "masks_without_ground_truth": run_masks - len(found) - duplicates}
    return found, counts


def _match_image_keys(predictions: str, run_id: str, wanted: set[str], batch_rows: int
                      ) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """From the run's images table: image_key -> ground-truth id (by key, else by unique file
    stem), the ids several images share a stem with, and each matched id's status."""
    key_to_id: dict[str, str] = {k: k for k in wanted}
    ambiguous: dict[str, list[str]] = {}
    status: dict[str, str] = {}  # the run's status of each matched image (images table)
    images = _dataset(storage.join(predictions, "images"))
    if images is None or not {"image_key", "image_uri"} <= set(images.schema.names):
        return key_to_id, ambiguous, status
    by_stem: dict[str, set[str]] = {}
    flt = ds.field("run_id") == run_id if "run_id" in images.schema.names else None
    cols = ["image_key", "image_uri", *(["status"] if "status" in images.schema.names else [])]
    for batch in images.to_batches(columns=cols, filter=flt, batch_size=batch_rows * 16):
        statuses = batch.column("status").to_pylist() if "status" in cols else [None] * batch.num_rows
        for key, uri, st in zip(batch.column("image_key").to_pylist(), batch.column("image_uri").to_pylist(),
                                statuses, strict=True):
            stem = _stem(uri or "")
            image_id = key if key in wanted else stem if stem in wanted else None
            if image_id is None:
                continue
            if st is not None:
                status[image_id] = st
            if key not in wanted:
                by_stem.setdefault(stem, set()).add(key)
    for stem, keys in by_stem.items():
        if stem in ambiguous:
            continue
        if len(keys) > 1:
            ambiguous[stem] = sorted(keys)
        else:
            key_to_id[next(iter(keys))] = stem
    return key_to_id, ambiguous, status


# ---------------------------------------------------------------------------------------------
# per image, and the whole evaluation


@dataclass(frozen=True)
class ImageScore:
    image_id: str
    image_key: str | None
    status: str  # scored | missing_prediction | missing_ground_truth | ambiguous | size_mismatch | invalid
    message: str = ""
    confusion: np.ndarray | None = field(default=None, repr=False)

    def row(self, alignment: ClassAlignment) -> dict[str, Any]:
        row: dict[str, Any] = {"image_id": self.image_id, "image_key": self.image_key, "status": self.status,
                               "message": self.message, "gt_pixels": None, "correct_pixels": None,
                               "pixel_accuracy": None, "mean_iou": None}
        if self.confusion is not None:
            k = len(alignment.gt_classes)
            m = segmentation_metrics(self.confusion, alignment)
            row.update(gt_pixels=int(self.confusion.sum()), correct_pixels=int(np.trace(self.confusion[:, :k])),
                       pixel_accuracy=_json_float(m["pixel_accuracy"]), mean_iou=_json_float(m["mean_iou"]))
        return row


def score_image(image_id: str, gt_png: bytes | None, pred: PredictedMask, alignment: ClassAlignment) -> ImageScore:
    """One image's confusion matrix, or a status saying why it cannot be scored (never raises)."""
    if gt_png is None:
        return ImageScore(image_id, pred.image_key, "missing_ground_truth", "SegmentationClass PNG not found")
    try:
        gt = decode_mask(gt_png)
    except Exception as err:  # a bad ground-truth file is reported, not fatal
        return ImageScore(image_id, pred.image_key, "invalid", f"ground truth: {type(err).__name__}: {err}")
    try:
        mask = decode_mask(pred.mask_png)
    except Exception as err:
        return ImageScore(image_id, pred.image_key, "invalid", f"prediction: {type(err).__name__}: {err}")
    gh, gw = gt.shape[:2]
    if mask.shape != gt.shape or (pred.width and pred.height and (pred.width, pred.height) != (gw, gh)):
        return ImageScore(image_id, pred.image_key, "size_mismatch",
                          f"prediction is {mask.shape[1]}x{mask.shape[0]} (table: {pred.width}x{pred.height}) "
                          f"but the ground truth is {gw}x{gh}")
    try:
        conf = confusion_matrix(gt, mask, alignment)
    except ValueError as err:
        return ImageScore(image_id, pred.image_key, "invalid", str(err))
    return ImageScore(image_id, pred.image_key, "scored", "", conf)


def _json_float(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return _json_float(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def unmatched_scores(image_ids: Sequence[str], found: Mapping[str, PredictedMask],
                     counts: Mapping[str, Any]) -> list[ImageScore]:
    """The scores of the ids without a mask to score: ambiguous ones, and those the run has no mask for."""
    scores = []
    for image_id in image_ids:
        if image_id in counts["ambiguous"]:
            scores.append(ImageScore(image_id, None, "ambiguous",
                                     f"several images of the run have this file stem: {counts['ambiguous'][image_id]}"))
        elif image_id not in found:
            run_status = counts["image_status"].get(image_id)
            scores.append(ImageScore(image_id, None, "missing_prediction", "no mask for this image in the run"
                                     + (f" (its status in the run: {run_status})" if run_status else "")))
    return scores


def metrics_document(scores: Iterable[ImageScore], alignment: ClassAlignment, *, run_id: str, split: str,
                     predictions: str, ground_truth: str, gt_images: int,
                     match_counts: dict[str, Any], model_id: str | None = None) -> dict[str, Any]:
    """``metrics.json``: totals over the scored images plus what could not be scored, NaN as null;
    ``model_id``: the model that made the run's masks (the ``runs`` row's)."""
    scores = list(scores)
    k, c = len(alignment.gt_classes), len(alignment.columns)
    conf = np.zeros((k, c), np.int64)
    gt_images_per_class = np.zeros(k, np.int64)
    status: dict[str, int] = {}
    for s in scores:
        status[s.status] = status.get(s.status, 0) + 1
        if s.confusion is not None:
            conf += s.confusion
            gt_images_per_class += s.confusion.sum(axis=1) > 0
    metrics = segmentation_metrics(conf, alignment)
    for i, name in enumerate(alignment.gt_classes):
        metrics["per_class"][name]["gt_images"] = int(gt_images_per_class[i])
    images = {
        "ground_truth": gt_images,
        "scored": status.get("scored", 0),
        "missing_prediction": status.get("missing_prediction", 0),
        "missing_ground_truth": status.get("missing_ground_truth", 0),
        "ambiguous": status.get("ambiguous", 0),
        "size_mismatch": status.get("size_mismatch", 0),
        "invalid": status.get("invalid", 0),
        "run_masks": match_counts.get("run_masks", 0),
        "masks_without_ground_truth": match_counts.get("masks_without_ground_truth", 0),
        "duplicate_masks": match_counts.get("duplicate_masks", 0),
    }
    return _jsonable({
        "format": "weakseg.evaluation",
        "format_version": 1,
        "run_id": run_id,
        "model_id": model_id,
        "split": split,
        "predictions": predictions,
        "ground_truth": ground_truth,
        **{key: metrics[key] for key in ("mean_iou", "pixel_accuracy", "mean_class_accuracy", "classes_in_mean",
                                         "pixels")},
        "mean_iou_convention": "mean of per-class IoU over ground-truth classes present in the ground truth or "
                               "the prediction of the scored images; void (255) ground truth not scored",
        "images": images,
        "per_class": metrics["per_class"],
        "confusion": {"rows": list(alignment.gt_classes), "columns": list(alignment.columns),
                      "matrix": conf.tolist()},
        "class_alignment": {"ground_truth": list(alignment.gt_classes), "predicted": list(alignment.pred_classes),
                            "unlabelled_counts_as": alignment.columns[alignment.unlabelled_column]},
    })


def per_class_table(doc: dict[str, Any]) -> pa.Table:
    rows = [{"run_id": doc["run_id"], "split": doc["split"], "class_index": v["index"], "class_name": name,
             **{k: v[k] for k in ("iou", "accuracy", "precision", "tp", "fp", "fn", "gt_pixels", "pred_pixels",
                                  "gt_images")}, "in_mean": v["iou"] is not None}
            for name, v in doc["per_class"].items()]
    schema = pa.schema([("run_id", pa.string()), ("split", pa.string()), ("class_index", pa.int32()),
                        ("class_name", pa.string()), ("iou", pa.float64()), ("accuracy", pa.float64()),
                        ("precision", pa.float64()), ("tp", pa.int64()), ("fp", pa.int64()), ("fn", pa.int64()),
                        ("gt_pixels", pa.int64()), ("pred_pixels", pa.int64()), ("gt_images", pa.int64()),
                        ("in_mean", pa.bool_())])
    return pa.Table.from_pylist(rows, schema=schema)


def confusion_table(doc: dict[str, Any]) -> pa.Table:
    conf = doc["confusion"]
    rows = [{"run_id": doc["run_id"], "split": doc["split"], "gt_class": g, "pred_class": p, "pixels": n}
            for g, row in zip(conf["rows"], conf["matrix"], strict=True)
            for p, n in zip(conf["columns"], row, strict=True)]
    schema = pa.schema([("run_id", pa.string()), ("split", pa.string()), ("gt_class", pa.string()),
                        ("pred_class", pa.string()), ("pixels", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def per_image_table(scores: Iterable[ImageScore], alignment: ClassAlignment, run_id: str, split: str) -> pa.Table:
    schema = pa.schema([("run_id", pa.string()), ("split", pa.string()), ("image_id", pa.string()),
                        ("image_key", pa.string()), ("status", pa.string()), ("message", pa.string()),
                        ("gt_pixels", pa.int64()), ("correct_pixels", pa.int64()), ("pixel_accuracy", pa.float64()),
                        ("mean_iou", pa.float64())])
    rows = [{"run_id": run_id, "split": split, **s.row(alignment)} for s in scores]
    return pa.Table.from_pylist(rows, schema=schema)


