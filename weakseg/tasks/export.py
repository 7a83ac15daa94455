"""A segment-corpus run's masks in the formats that annotation, browsing and training tools read.

- **COCO** (CVAT, Label Studio, FiftyOne, Detectron2, MMDetection): one ``annotations.json``
  with ``images`` (``file_name``: the image's URI, or its path under ``images_root``; width,
  height), ``categories`` (the run's classes without ``background``, ids 1..N in the run's
  order) and one annotation per region (image x class): ``segmentation`` as compressed RLE
  encoded by ``pycocotools`` (the reference implementation), its ``area`` and ``bbox``
  ``[x, y, width, height]`` computed from that RLE, ``score`` the region's mean probability,
  ``iscrowd`` 0 (as COCO-Stuff stores its semantic regions).
- **VOC** (MMSegmentation, the layout ``weakseg evaluate``/``thresholds`` read):
  ``SegmentationClass/{image_key}.png`` (palette PNGs, the VOC colours),
  ``ImageSets/Segmentation/{run_id}.txt`` and ``classes.txt``.

``classes`` keeps some classes only, ``min_area_fraction`` drops regions under that share
of their image. In a VOC mask a pixel of a class left out becomes background when the run
has a ``background`` class, else 255 (unlabelled), as for a run that only knew the classes
kept; ``classes.txt`` then lists background (if any) and the kept classes, re-indexed.

Streaming: a run is read one chunk at a time — its ``images``, ``regions`` and ``masks``
files share the name ``{run_id}-{chunk}`` (:func:`weakseg.tasks.segment.tables.run_files`) —
masks in row-group batches, so memory is flat in the number of images. ``images`` is the
commit marker: a chunk without its ``images`` file (a crashed attempt) exports nothing, and
only images with status ``ok`` are exported. The COCO file is assembled from temporary
files on local disk and published in one piece (a rename, or one upload), like every VOC file.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow.dataset as ds
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from pycocotools import mask as mask_utils

from .. import __version__
from . import storage
from .evaluate.scoring import VOID, decode_mask, latest_run, read_runs
from .images import voc_palette
from .segment import tables

__all__ = ["ExportPlan", "Region", "RunMask", "coco_annotations", "export_coco", "export_voc", "iter_run_masks",
           "plan_export", "voc_labels"]

BACKGROUND = "background"


@dataclass(frozen=True)
class ExportPlan:
    """The run to export and which of its classes go out."""

    run_id: str
    model_id: str | None
    state: str | None
    classes: tuple[str, ...]  # the run's, in index order (mask values)
    kept: tuple[int, ...]  # indices of the classes exported (every one, or those of --classes)
    background: int | None  # index of the run's background class

    @property
    def coco_categories(self) -> dict[int, int]:
        """Run class index -> COCO category id (1..N), background left out."""
        return {i: n + 1 for n, i in enumerate(i for i in self.kept if i != self.background)}


def plan_export(predictions: str, run_id: str, include_failed: bool = False,
                classes: Sequence[str] | None = None) -> ExportPlan:
    """Find the run in the ``runs`` table; refuse one that is not there, or one that ended Failed
    unless ``include_failed``, and class names the run does not have."""
    tables.check_run_id(run_id)
    run = latest_run(read_runs(predictions), run_id)  # ValueError naming the runs there when it is missing
    if run.get("state") == "Failed" and not include_failed:
        raise ValueError(f"run {run_id!r} ended Failed (its tables may lack images): pass --include-failed to "
                         "export what it wrote")
    names = tuple(run["classes"])
    lower = [n.lower() for n in names]
    background = lower.index(BACKGROUND) if BACKGROUND in lower else None
    if classes:
        unknown = [c for c in classes if c.lower() not in lower]
        if unknown:
            raise ValueError(f"--classes {unknown} are not classes of run {run_id!r} (its classes: {list(names)})")
        wanted = {c.lower() for c in classes}
        kept = tuple(i for i, n in enumerate(lower) if n in wanted)
    else:
        kept = tuple(range(len(names)))
    return ExportPlan(run_id, run.get("model_id"), run.get("state"), names, kept, background)


@dataclass(frozen=True)
class Region:
    class_index: int
    area_fraction: float
    mean_prob: float


@dataclass
class RunMask:
    """One segmented image of a run: its mask (class indices, 255 unlabelled) and its regions."""

    image_key: str
    image_uri: str
    width: int
    height: int
    labels: np.ndarray = field(repr=False)
    regions: list[Region]


def _chunk_files(predictions: str, run_id: str) -> list[dict[str, str]]:
    """Per chunk (in order), the run's file of each table: ``{"images": path, "masks": ..., "regions": ...}``."""
    chunks: dict[int, dict[str, str]] = {}
    for table, _, path in tables.run_files(predictions, run_id):
        m = re.fullmatch(rf"{re.escape(run_id)}-(\d{{6,}})\.parquet", posixpath.basename(path))
        if m and table in ("images", "masks", "regions"):
            chunks.setdefault(int(m.group(1)), {})[table] = path
    return [chunks[c] for c in sorted(chunks)]


def _rows(fs, path: str | None, columns: list[str], flt: ds.Expression, batch_rows: int) -> Iterator[dict[str, Any]]:
    if path is None:
        return
    dataset = ds.dataset(path, filesystem=fs, format="parquet")
    for batch in dataset.to_batches(columns=columns, filter=flt, batch_size=batch_rows):
        yield from batch.to_pylist()


def iter_run_masks(predictions: str, run_id: str, batch_rows: int = 64) -> Iterator[RunMask]:
    """The run's images with status ``ok``, with their masks and regions, chunk by chunk
    (memory: one chunk's images and regions rows and ``batch_rows`` masks)."""
    fs, _ = storage.url_to_fs(predictions)
    of_run = ds.field("run_id") == run_id
    for files in _chunk_files(predictions, run_id):
        if "images" not in files:  # not committed: a crashed attempt's leftovers
            continue
        images = {r["image_key"]: r for r in _rows(fs, files["images"], ["image_key", "image_uri", "width", "height"],
                                                   of_run & (ds.field("status") == "ok"), 65536)}
        regions: dict[str, list[Region]] = {}
        for r in _rows(fs, files.get("regions"), ["image_key", "class_index", "area_fraction", "mean_prob"], of_run,
                       65536):
            regions.setdefault(r["image_key"], []).append(
                Region(int(r["class_index"]), float(r["area_fraction"] or 0.0), float(r["mean_prob"] or 0.0)))
        for m in _rows(fs, files.get("masks"), ["image_key", "mask_png"], of_run, batch_rows):
            image = images.get(m["image_key"])
            if image is None:
                continue
            labels = decode_mask(m["mask_png"])
            yield RunMask(m["image_key"], image["image_uri"], int(image["width"] or labels.shape[1]),
                          int(image["height"] or labels.shape[0]), labels,
                          sorted(regions.get(m["image_key"], []), key=lambda r: r.class_index))


def coco_annotations(mask: RunMask, categories: Mapping[int, int], min_area_fraction: float = 0.0
                     ) -> list[dict[str, Any]]:
    """One COCO annotation per region of a kept class (``categories``: class index -> category id),
    without ``id``/``image_id``; RLE, area and bbox from ``pycocotools``."""
    out = []
    for region in mask.regions:
        if region.class_index not in categories or region.area_fraction < min_area_fraction:
            continue
        rle = mask_utils.encode(np.asfortranarray(mask.labels == region.class_index, dtype=np.uint8))
        area = float(mask_utils.area(rle))
        if area == 0:  # a region row without pixels: nothing to annotate
            continue
        out.append({"category_id": categories[region.class_index],
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
                    "score": round(region.mean_prob, 6)})
    return out


def voc_labels(mask: RunMask, plan: ExportPlan, min_area_fraction: float = 0.0) -> np.ndarray:
    """The mask in the export's class indices (:func:`voc_classes`): a class left out, or a region
    under ``min_area_fraction``, becomes background (255 when the run has none)."""
    if plan.kept == tuple(range(len(plan.classes))) and min_area_fraction <= 0:
        return mask.labels
    out_classes = voc_classes(plan)
    index = {plan.classes.index(name): i for i, name in enumerate(out_classes)}
    other = index.get(plan.background, VOID) if plan.background is not None else VOID
    small = {r.class_index for r in mask.regions if r.area_fraction < min_area_fraction}
    lut = np.full(256, other, np.uint8)
    for i, j in index.items():
        if i not in small or i == plan.background:
            lut[i] = j
    lut[VOID] = VOID
    return lut[mask.labels]


def voc_classes(plan: ExportPlan) -> list[str]:
    """``classes.txt`` of a VOC export: the run's classes, or background (if any) and those kept."""
    if plan.kept == tuple(range(len(plan.classes))):
        return list(plan.classes)
    keep = sorted({*plan.kept, *([plan.background] if plan.background is not None else [])})
    return [plan.classes[i] for i in keep]


def _relative(uri: str, images_root: str | None) -> tuple[str, bool]:
    """``file_name`` of an image: its path under ``images_root`` (True), else its URI (False)."""
    if images_root is None:
        return uri, True
    root = images_root if "://" in images_root else os.path.abspath(images_root)
    root = root.rstrip("/") + "/"
    return (uri[len(root):], True) if uri.startswith(root) else (uri, False)


class _Publish:
    """A file built on local disk, then put at ``url`` in one piece (rename locally, one upload else)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = storage.url_to_fs(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        folder = os.path.dirname(self.path) if self.local else None
        if folder:
            os.makedirs(folder, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=".weakseg-export-", suffix=".tmp")
        self.file = os.fdopen(fd, "w+b")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.local:
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        else:
            parent = posixpath.dirname(self.path)
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            self.fs.put_file(self.tmp, self.path)
            os.unlink(self.tmp)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def export_coco(predictions: str, plan: ExportPlan, out: str, min_area_fraction: float = 0.0,
                images_root: str | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``{out}/annotations.json``; returns counts. Images, then annotations, stream into
    temporary files that are joined into the published file at the end."""
    categories = plan.coco_categories
    url = storage.join(out, "annotations.json")
    counts = {"images": 0, "annotations": 0, "outside_images_root": 0}
    with tempfile.TemporaryDirectory(prefix="weakseg-coco-") as tmp:
        parts = {name: open(os.path.join(tmp, name), "w+b")  # noqa: SIM115
                 for name in ("images", "annotations")}
        try:
            for image_id, mask in enumerate(iter_run_masks(predictions, plan.run_id), start=1):
                file_name, inside = _relative(mask.image_uri, images_root)
                counts["outside_images_root"] += not inside
                entry = {"id": image_id, "file_name": file_name, "width": mask.width, "height": mask.height,
                         "image_key": mask.image_key}
                parts["images"].write((("" if image_id == 1 else ",\n") + json.dumps(entry)).encode())
                for ann in coco_annotations(mask, categories, min_area_fraction):
                    counts["annotations"] += 1
                    ann = {"id": counts["annotations"], "image_id": image_id, **ann}
                    sep = "" if counts["annotations"] == 1 else ",\n"
                    parts["annotations"].write((sep + json.dumps(ann)).encode())
                counts["images"] = image_id
                if progress is not None:
                    progress(1)
            head = {"info": {"description": f"weakseg segment-corpus run {plan.run_id}", "version": __version__,
                             "date_created": datetime.now(UTC).isoformat(timespec="seconds"),
                             "run_id": plan.run_id, "model_id": plan.model_id},
                    "licenses": [],
                    "categories": [{"id": cid, "name": plan.classes[i], "supercategory": ""}
                                   for i, cid in categories.items()]}
            target = _Publish(url)
            try:
                target.file.write(json.dumps(head)[:-1].encode() + b', "images": [\n')
                _append(target.file, parts["images"])
                target.file.write(b'\n], "annotations": [\n')
                _append(target.file, parts["annotations"])
                target.file.write(b"\n]}\n")
                target.commit()
            except BaseException:
                target.discard()
                raise
        finally:
            for part in parts.values():
                part.close()
    return {"format": "coco", "annotations_json": storage.redact_url(url), "categories": len(categories), **counts}


def _append(dest, part) -> None:
    part.flush()
    part.seek(0)
    shutil.copyfileobj(part, dest, 1 << 20)


def _palette_png(labels: np.ndarray) -> bytes:
    img = Image.fromarray(labels, mode="P")
    img.putpalette(voc_palette())
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def export_voc(predictions: str, plan: ExportPlan, out: str, min_area_fraction: float = 0.0,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``SegmentationClass/{image_key}.png`` per image, then ``classes.txt`` and, last,
    ``ImageSets/Segmentation/{run_id}.txt`` (its presence means the export is whole)."""
    split = storage.join(out, "ImageSets", "Segmentation", f"{plan.run_id}.txt")
    ids = _Publish(split)
    n = 0
    try:
        for mask in iter_run_masks(predictions, plan.run_id):
            labels = voc_labels(mask, plan, min_area_fraction)
            storage.write_bytes(storage.join(out, "SegmentationClass", f"{mask.image_key}.png"), _palette_png(labels))
            ids.file.write(f"{mask.image_key}\n".encode())
            n += 1
            if progress is not None:
                progress(1)
        classes = voc_classes(plan)
        storage.write_bytes(storage.join(out, "classes.txt"), ("\n".join(classes) + "\n").encode())
        ids.commit()
    except BaseException:
        ids.discard()
        raise
    return {"format": "voc", "images": n, "classes": classes, "split": plan.run_id,
            "image_set": storage.redact_url(split)}

