"""Streaming shard readers for training and validation (webdataset over fsspec).

Training stream: shards are *resampled* (drawn with replacement, a different draw for
every DDP rank and DataLoader worker, seeded by ``seed``, epoch and start step) so every
rank and worker gets an endless, independent stream and an epoch is simply a number of
steps; the tar members are expanded, mixed in a sample shuffle buffer, decoded with PIL,
augmented and batched. Validation stream: every val shard once, split by DDP rank and by
worker, no shuffle, a fixed resize.

One error policy: a sample that cannot be used (bad JPEG, missing or out-of-range labels,
a damaged tar member) is skipped and *counted*. Errors are recorded by an
:class:`ErrorLog` (the webdataset ``handler`` of the tar stage and the decode stage) and
travel with the next good sample to :class:`Collate`, so counts from worker processes
reach the training loop in the batch itself.

Any fsspec URL works: :func:`register_fsspec_opener` routes ``s3://``, ``gs://``,
``memory://`` and friends through fsspec instead of webdataset's CLI-based openers
(``curl``, ``gsutil``); credentials come from the standard environment variables.
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

wds_gopen = importlib.import_module("webdataset.gopen")  # the module; `webdataset.gopen` is also a function

__all__ = [
    "Collate",
    "Decode",
    "ErrorLog",
    "eval_pipeline",
    "make_loader",
    "register_fsspec_opener",
    "train_pipeline",
    "write_synthetic_shards",
]

_logger = logging.getLogger(__name__)

FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory", "http", "https", "hf")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    return fsspec.open(url, mode).open()


def register_fsspec_opener(schemes: Iterable[str] = FSSPEC_SCHEMES) -> None:
    """Open those URL schemes with fsspec in webdataset (no shelling out to a cloud CLI)."""
    for scheme in schemes:
        wds_gopen.gopen_schemes[scheme] = _fsspec_open


register_fsspec_opener()  # at import, so spawned DataLoader workers have it too


class ErrorLog:
    """A webdataset handler that records an error and says "continue"."""

    def __init__(self) -> None:
        self.pending: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        self.pending.append(f"{type(exn).__name__}: {exn}")
        _logger.warning("skipped a sample: %s: %s", type(exn).__name__, exn)
        return True

    def drain(self) -> list[str]:
        out, self.pending = self.pending, []
        return out


class Decode:
    """Pipeline stage: raw tar samples -> ``{"image", "valid", "labels", "__key__"}``.

    ``transform(PIL image) -> (HxWx3 uint8, HxW bool)``. A bad sample is recorded in
    ``errors`` with its key and shard URL and skipped.
    """

    def __init__(self, num_classes: int, transform: Callable, errors: ErrorLog) -> None:
        self.num_classes = num_classes
        self.transform = transform
        self.errors = errors

    def labels(self, sample: dict[str, Any]) -> list[int]:
        if "json" in sample:
            meta = json.loads(sample["json"])
            labels = [int(i) for i in meta["labels"]]
        elif "cls" in sample:
            labels = [int(sample["cls"])]
        else:
            raise ValueError("no labels (neither json nor cls)")
        if not labels:
            raise ValueError("empty label list")
        bad = [i for i in labels if not 0 <= i < self.num_classes]
        if bad:
            raise ValueError(f"label index {bad} outside [0, {self.num_classes})")
        return labels

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "jpg" not in sample:
            raise ValueError("no jpg member")
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            img.load()
            image, valid = self.transform(img)
        return {"image": image, "valid": valid, "labels": self.labels(sample), "__key__": sample["__key__"]}

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            try:
                out = self.decode(sample)
            except Exception as err:
                where = f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}"
                self.errors(ValueError(f"{where}: {type(err).__name__}: {err}"))
                continue
            out["__errors__"] = self.errors.drain()
            yield out
        # Errors after the last good sample have no sample to ride on: they stay logged.


class Collate:
    """Samples -> a batch: uint8 images ``[B,3,S,S]``, valid ``[B,S,S]``, multi-hot target ``[B,K]``."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).contiguous()
        valid = torch.from_numpy(np.stack([s["valid"] for s in samples]))
        target = torch.zeros(len(samples), self.num_classes)
        for row, s in enumerate(samples):
            target[row, s["labels"]] = 1.0
        return {
            "images": images,
            "valid": valid,
            "target": target,
            "keys": [s["__key__"] for s in samples],
            "errors": [e for s in samples for e in s.get("__errors__", ())],
        }


def train_pipeline(
    urls: Sequence[str],
    num_classes: int,
    transform: Callable,
    *,
    seed: int = 0,
    shuffle_buffer: int = 1000,
) -> wds.DataPipeline:
    """An endless, resampled, shuffled, decoded sample stream (one per rank and worker)."""
    errors = ErrorLog()
    return wds.DataPipeline(
        # Different draws per rank and worker come from webdataset's worker seed.
        wds.ResampledShards(list(urls), seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=errors),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(seed)),
        Decode(num_classes, transform, errors),
    )


def eval_pipeline(urls: Sequence[str], num_classes: int, transform: Callable, *, split_by_node: bool = True):
    """Every sample of ``urls`` once, split over DDP ranks (optionally) and DataLoader workers."""
    errors = ErrorLog()
    stages: list[Any] = [wds.SimpleShardList(list(urls))]
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, wds.tarfile_to_samples(handler=errors), Decode(num_classes, transform, errors)]
    return wds.DataPipeline(*stages)


def make_loader(
    dataset: torch.utils.data.IterableDataset,
    num_classes: int,
    batch_size: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Batches of :class:`Collate`; worker processes when ``num_workers > 0``."""
    generator = torch.Generator().manual_seed(seed)  # DataLoader derives worker seeds from it
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=Collate(num_classes),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
        generator=generator,
    )


def write_synthetic_shards(
    dest: str,
    n_train: int = 48,
    n_val: int = 24,
    *,
    size: int = 96,
    per_shard: int = 16,
    multilabel: bool = False,
    seed: int = 0,
    corrupt_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Shards of synthetic scenes in the shard-imagenet format, for tests and benchmarks.

    ``corrupt_keys``: samples whose JPEG bytes are replaced by garbage (error handling).
    Writes ``{dest}/{split}-{i:06d}.tar`` and ``{dest}/manifest.json``; returns the manifest.
    """
    import hashlib

    from . import storage
    from .manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME
    from .synthetic import SYNTHETIC_CLASSES, make_scenes

    classes = list(SYNTHETIC_CLASSES)
    shards, splits = [], {}
    for split, n, split_seed in (("train", n_train, seed), ("val", n_val, seed + 1000)):
        scenes = make_scenes(n, seed=split_seed, size=(size, size), objects_per_image=2 if multilabel else 1)
        counts = dict.fromkeys(classes, 0)
        for index, start in enumerate(range(0, n, per_shard)):
            buf = io.BytesIO()
            with wds.TarWriter(buf) as writer:
                for i, scene in enumerate(scenes[start : start + per_shard], start):
                    key = f"{split}_{i:05d}"
                    jpg = io.BytesIO()
                    Image.fromarray(scene.image).save(jpg, format="JPEG", quality=90)
                    data = b"\xff\xd8 not a jpeg" if key in corrupt_keys else jpg.getvalue()
                    labels = [classes.index(c) for c in scene.labels]
                    for c in scene.labels:
                        counts[c] += 1
                    meta = {"labels": labels, "label_names": list(scene.labels), "source": f"synthetic://{key}",
                            "width": size, "height": size, "wnid": None}
                    writer.write({"__key__": key, "jpg": data, "cls": str(labels[0]).encode(),
                                  "json": json.dumps(meta).encode()})
            name = f"{split}-{index:06d}.tar"
            blob = buf.getvalue()
            storage.write_bytes(storage.join(dest, name), blob)
            shards.append({"name": name, "split": split, "samples": len(scenes[start : start + per_shard]),
                           "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        splits[split] = {"samples": n, "class_counts": counts}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "classes": classes, "multilabel": multilabel,
        "label_map": {"kind": "identity"}, "splits": splits, "shards": shards,
        "errors": {"count": 0, "table": "errors.parquet"},
        "parameters": {"synthetic": True, "size": size, "seed": seed}, "source_fingerprint": f"synthetic-{seed}",
    }
    storage.write_json(storage.join(dest, MANIFEST_NAME), manifest)
    return manifest
