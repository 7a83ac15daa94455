"""Streaming shard readers for training and validation (webdataset over fsspec).

Training stream: shards are *resampled* (drawn with replacement, a different draw for
every DDP rank and DataLoader worker, seeded by ``seed``, epoch and start step) so every
rank and worker gets an endless, independent stream and an epoch is simply a number of
steps; the tar members are expanded, mixed in a sample shuffle buffer (seeded per rank and
worker too: with fewer shards than workers, one seed would give every worker the same
order, so each image came once per worker), decoded with PIL,
augmented and batched. Validation stream: every val shard once, split by DDP rank and by
worker, no shuffle, a fixed resize.

One error policy: a sample that cannot be used (bad JPEG, missing or out-of-range labels,
a damaged tar member) is skipped and *counted*. Errors are recorded by an
:class:`ErrorLog` (the webdataset ``handler`` of the tar stage and the decode stage) and
travel with the next good sample to :class:`Collate`, so counts from worker processes
reach the training loop in the batch itself. Skipping has a bound: when more than
``max_skip_fraction`` of the samples a stream has seen were skipped (after at least
``MIN_SKIPPED`` skips), nothing usable is coming and the stream raises
:class:`NothingUsableError` instead of searching forever.

What the manifest records is checked, never skipped: with ``specs`` (from
:func:`~weakseg.tasks.ingest.manifest.shard_specs`) every shard is hashed before a sample of it is
used, and with ``classes`` every sample's label names must match the manifest's class
list at its label indices. A difference raises
:class:`~weakseg.tasks.ingest.manifest.ShardMismatchError`: the shards are not the ones the
manifest describes, and their class indices cannot be trusted.

Any fsspec URL works: :func:`register_fsspec_opener` routes ``s3://``, ``gs://``,
``memory://`` and friends through fsspec instead of webdataset's CLI-based openers
(``curl``, ``gsutil``); credentials come from the standard environment variables.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from torch.utils.data import DataLoader

from .. import storage
from ..ingest.manifest import ShardMismatchError, ShardSpec

wds_gopen = importlib.import_module("webdataset.gopen")  # the module; `webdataset.gopen` is also a function

__all__ = [
    "Collate",
    "Decode",
    "ErrorLog",
    "NothingUsableError",
    "ReadShards",
    "eval_pipeline",
    "make_loader",
    "open_verified",
    "register_fsspec_opener",
    "train_pipeline",
    "worker_shuffle",
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


MIN_SKIPPED = 100  # skips before the skip fraction is judged
_CHUNK = 1 << 20
_SPOOL_BYTES = 64 << 20  # remote shards are copied to memory up to this, then to a temporary file


class NothingUsableError(RuntimeError):
    """A sample stream that skips (almost) everything: training would wait forever."""


class ErrorLog:
    """A webdataset handler that records an error and says "continue", up to a bound.

    ``max_skip_fraction``: raise :class:`NothingUsableError` once at least ``min_skipped``
    samples were skipped and they are more than this fraction of all seen; ``None`` never
    raises (a finite stream, such as validation, ends on its own).
    """

    def __init__(self, max_skip_fraction: float | None = None, min_skipped: int = MIN_SKIPPED) -> None:
        self.pending: list[str] = []
        self.max_skip_fraction = max_skip_fraction
        self.min_skipped = min_skipped
        self.good = 0
        self.skipped = 0

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, ShardMismatchError):
            raise ShardMismatchError(str(exn.args[0]) if exn.args else str(exn)) from None
        message = storage.redact(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        self.pending.append(message)
        self.skipped += 1
        _logger.warning("skipped a sample: %s", message)
        self._check(message)
        return True

    def _check(self, last: str) -> None:
        limit = self.max_skip_fraction
        seen = self.skipped + self.good
        if limit is None or self.skipped < self.min_skipped or self.skipped <= limit * seen:
            return
        raise NothingUsableError(
            f"{self.skipped} of {seen} samples read could not be used ({self.good} usable; the limit is "
            f"--max-skip-fraction {limit}): nothing usable is coming from these shards. Last error: {last}. "
            "Check the shards (weakseg shard's errors.parquet) and that the manifest's classes match them."
        )

    def drain(self) -> list[str]:
        """The errors since the last good sample; called once per good sample."""
        self.good += 1
        out, self.pending = self.pending, []
        return out


def open_verified(url: str, spec: ShardSpec) -> io.IOBase:
    """``url`` opened for reading after checking its size and sha256 against ``spec``.

    Local files are hashed through the same descriptor that is then rewound and read (a
    rename in between changes nothing); remote ones are copied while hashing (memory, then
    a temporary file). No byte of a shard reaches training before the whole shard matched.
    """
    fs, path = storage.url_to_fs(url)
    shown = storage.redact_url(url)
    size = fs.size(path)
    if size != spec.bytes:
        raise ShardMismatchError(f"shard {shown} has {size} bytes, the manifest records {spec.bytes}: the shards "
                                 "changed after the manifest was written; run `weakseg shard` again to completion")
    src = fs.open(path, "rb")
    local = isinstance(fs, LocalFileSystem)
    out = src if local else tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - returned
    digest = hashlib.sha256()
    try:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            if not local:
                out.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise ShardMismatchError(f"shard {shown} does not have the sha256 the manifest records: the shards "
                                     "changed after the manifest was written; run `weakseg shard` again to completion")
        out.seek(0)
    except BaseException:
        out.close()
        raise
    finally:
        if not local:
            src.close()
    return out  # type: ignore[return-value]


class ReadShards:
    """Pipeline stage: ``{"url"}`` -> raw tar samples; with ``specs``, each shard verified first.

    A shard that cannot be opened or parsed is the ``errors`` handler's (skipped, counted);
    one that differs from its spec raises :class:`ShardMismatchError`.
    """

    def __init__(self, errors: ErrorLog, specs: Mapping[str, ShardSpec] | None = None) -> None:
        self.errors = errors
        self.specs = dict(specs) if specs is not None else None

    def _open(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in src:
            url = source["url"]
            spec = self.specs.get(url) if self.specs is not None else None
            if self.specs is not None and spec is None:
                raise ShardMismatchError(f"{storage.redact_url(url)} is not a shard the manifest names")
            try:
                stream = open_verified(url, spec) if spec is not None else wds_gopen.gopen(url)
            except ShardMismatchError:
                raise
            except Exception as err:
                self.errors(OSError(f"{storage.redact_url(url)}: {type(err).__name__}: {err}"))
                continue
            yield {**source, "stream": stream}

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        files = wds.tariterators.tar_file_expander(self._open(src), handler=self.errors)
        return wds.tariterators.group_by_keys(files, handler=self.errors)


class Decode:
    """Pipeline stage: raw tar samples -> ``{"image", "valid", "labels", "__key__"}``.

    ``transform(PIL image) -> (HxWx3 uint8, HxW bool)``. A bad sample is recorded in
    ``errors`` with its key and shard URL and skipped. With ``classes`` (the manifest's),
    a sample whose ``label_names`` are not ``classes`` at its label indices raises
    :class:`ShardMismatchError` (shards of another class list: never trained on).
    """

    def __init__(self, num_classes: int, transform: Callable, errors: ErrorLog,
                 classes: Sequence[str] | None = None) -> None:
        self.num_classes = num_classes
        self.transform = transform
        self.errors = errors
        self.classes = list(classes) if classes is not None else None

    def check_names(self, sample: dict[str, Any], labels: list[int]) -> None:
        if self.classes is None or "json" not in sample:
            return
        names = json.loads(sample["json"]).get("label_names")
        if names is not None and [self.classes[i] for i in labels] != list(names):
            raise ShardMismatchError(
                f"sample {sample.get('__key__', '?')} in {storage.redact_url(str(sample.get('__url__', '?')))} is "
                f"labelled {list(names)} at indices {labels}, but the manifest's classes there are "
                f"{[self.classes[i] for i in labels]}: the shards belong to another class list (an interrupted "
                "re-shard?); run `weakseg shard` again to completion"
            )

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
        self.check_names(sample, labels)
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
            except ShardMismatchError:
                raise
            except Exception as err:
                where = f"{sample.get('__key__', '?')} in {storage.redact_url(str(sample.get('__url__', '?')))}"
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
    specs: Mapping[str, ShardSpec] | None = None,
    classes: Sequence[str] | None = None,
    max_skip_fraction: float | None = 0.5,
) -> wds.DataPipeline:
    """An endless, resampled, shuffled, decoded sample stream (one per rank and worker).

    ``specs`` and ``classes``: verify shards and labels against the manifest (module doc);
    ``max_skip_fraction``: the skip bound that ends a stream with nothing usable.
    """
    errors = ErrorLog(max_skip_fraction)
    return wds.DataPipeline(
        # Different draws per rank and worker come from webdataset's worker seed.
        wds.ResampledShards(list(urls), seed=seed, deterministic=True),
        ReadShards(errors, specs),
        worker_shuffle(shuffle_buffer, seed),
        Decode(num_classes, transform, errors, classes),
    )


def worker_shuffle(bufsize: int, seed: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """webdataset's sample shuffle, seeded by ``seed`` and the DDP rank and DataLoader worker it runs in.

    One ``random.Random(seed)`` copied into every worker draws the same order in each: with a
    single shard (a small data set) the workers then deliver every sample twice in a row.
    """
    def run(src: Iterable[Any]) -> Iterator[Any]:
        worker_seed = wds.utils.make_seed(seed, wds.utils.pytorch_worker_seed())
        return wds.shuffle(bufsize, initial=min(bufsize, 100), seed=worker_seed)(iter(src))
    return run


def eval_pipeline(urls: Sequence[str], num_classes: int, transform: Callable, *, split_by_node: bool = True,
                  specs: Mapping[str, ShardSpec] | None = None, classes: Sequence[str] | None = None):
    """Every sample of ``urls`` once, split over DDP ranks (optionally) and DataLoader workers."""
    errors = ErrorLog()
    stages: list[Any] = [wds.SimpleShardList(list(urls))]
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, ReadShards(errors, specs), Decode(num_classes, transform, errors, classes)]
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
    from ..ingest.manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME
    from ..synthetic import SYNTHETIC_CLASSES, make_scenes

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
