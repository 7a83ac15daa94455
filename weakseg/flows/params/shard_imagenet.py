"""The parameters of shard-imagenet (``weakseg shard``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weakseg.flows._params import EXISTING, Existing
from weakseg.flows.params._shared import TaskRunnerKind
from weakseg.tasks.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

__all__ = ["shard_imagenet"]


def shard_imagenet(
    source: Annotated[str, Field(description="image collection: folder URL or CSV/Parquet manifest (uri,labels)"),
                      EXISTING],
    dest: Annotated[str, Field(description="output folder URL for the shards and manifest.json")],
    label_map: Annotated[str, Field(description="identity, voc, or the URL of a source_label,label CSV"),
                         Existing(keywords=("identity", "voc"))] = "identity",
    layout: Literal["auto", "ilsvrc", "synset-tars", "imagefolder", "manifest"] = "auto",
    max_side: Annotated[int, Field(ge=16, description="shrink so the shorter side is at most this")] = 512,
    val_fraction: Annotated[float, Field(ge=0, lt=1, description="val share when the source has no split")] = 0.0,
    seed: Annotated[int, Field(description="shuffle, split and background sampling seed")] = 0,
    shard_size: Annotated[int, Field(ge=1, description="samples per shard at most")] = 1000,
    shard_max_bytes: Annotated[int, Field(ge=1024, description="bytes per shard at most")] = 256 * 2**20,
    jpeg_quality: Annotated[int, Field(ge=1, le=100, description="JPEG quality when re-encoding")] = 90,
    max_pixels: Annotated[
        int, Field(ge=1, description="refuse larger images (decompression bombs)")
    ] = DEFAULT_MAX_PIXELS,
    max_bytes: Annotated[
        int, Field(ge=1, description="refuse larger files and tar members before reading them (64 MiB)")
    ] = DEFAULT_MAX_BYTES,
    background_fraction: Annotated[
        float, Field(ge=0, le=1, description="voc: share of unrelated synsets kept as background")
    ] = 0.25,
    task_runner: Annotated[TaskRunnerKind, Field(description="threads, or dask worker processes")] = "threads",
    workers: Annotated[int, Field(ge=1, description="threads or Dask worker processes")] = 4,
    dask_address: Annotated[
        str | None, Field(description="join this Dask scheduler instead of starting a local cluster")
    ] = None,
) -> None:
    """The parameters of shard-imagenet (its flow: :mod:`weakseg.flows.shard_imagenet`)."""
