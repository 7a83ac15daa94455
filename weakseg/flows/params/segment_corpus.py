"""The parameters of segment-corpus (``weakseg segment``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weakseg.flows._params import EXISTING
from weakseg.flows.params._shared import DEFAULT_MAX_SIDE, TaskRunnerKind
from weakseg.tasks.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from weakseg.tasks.segment import tables
from weakseg.tasks.segment.tta import AUTO

__all__ = ["segment_corpus"]


def segment_corpus(
    images: Annotated[str, Field(description="folder, glob, .txt/.csv/.parquet manifest of URIs, or "
                                 "WebDataset .tar shards (any fsspec URL)"), EXISTING],
    model: Annotated[str, Field(description="checkpoint URL (train-mil's model.pt), or a registry (its "
                                "current release, resolved once at the start)"), EXISTING],
    out: Annotated[str, Field(description="output folder URL for the Parquet tables")],
    priors: Annotated[str, Field(pattern=r"^(none|(ilp|sppxl|bb|seg)( *, *(ilp|sppxl|bb|seg))*)$",
                                 description="comma list of ilp, sppxl, bb, seg; or none")] = "ilp,sppxl",
    batch_size: Annotated[int, Field(ge=1, le=4096, description="images per forward pass")] = 8,
    run_id: Annotated[str | None, Field(pattern=tables.RUN_ID.pattern,
                                        description="run id (default: time + flow run id); reuse to redo a "
                                        "run")] = None,
    skip_existing: Annotated[bool, Field(description="only images not yet in the output for this model "
                                         "(same URI and content hash)")] = False,
    chunk_size: Annotated[int, Field(ge=1, description="images per chunk (one task, one file per table)")] = 512,
    max_side: Annotated[int, Field(ge=32, description="forward-pass longer side; results come back at "
                                   "full size")] = DEFAULT_MAX_SIDE,
    min_side: Annotated[int | None, Field(ge=0, description=(
        "enlarge images whose longer side is under this for the forward pass (0: never; none, the default: the "
        "size the model trained at, so a small photo is seen at the scale the model learnt; larger photos are "
        "unchanged)"))] = None,
    tta: Annotated[str, Field(description="test-time views averaged: scales of the forward size, +flip for "
                              "mirrored ones (e.g. 1,1.5,2+flip); 1: one plain pass; auto: the views chosen on "
                              "dev data for the model's kind (1.25, one pass at 1.25x, ~1.6x the forward cost; 1.5 "
                              "for a refined model without a background class, ~2.2x)")] = AUTO,
    max_pixels: Annotated[
        int, Field(ge=1, description="refuse larger images (decompression bombs)")
    ] = DEFAULT_MAX_PIXELS,
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: cuda when available")] = "auto",
    decode: Annotated[Literal["auto", "host", "device"], Field(description="where JPEGs are decoded: device "
                      "(nvjpeg on CUDA) when no prior needs host pixels; auto: device on CUDA, else "
                      "host")] = "auto",
    host_workers: Annotated[int | None, Field(ge=0, le=256, description="worker processes for the host stages "
                            "(reading, decoding, superpixels, PNG masks); 0: inline in the flow's process; default: "
                            "the cores minus one when the model runs on an accelerator, 0 on the CPU")] = None,
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp16"], Field(description="number format of the "
                         "forward pass: auto is bf16 autocast (channels_last) on CUDA, fp32 on the "
                         "CPU")] = "auto",
    thresholds: Annotated[str | None, Field(description="thresholds JSON URL (weakseg thresholds) for bb/seg "
                                            "(default: the checkpoint's, else 0.5/K)"), EXISTING] = None,
    task_runner: Annotated[TaskRunnerKind, Field(description="where chunks run: threads, or Dask worker "
                                                 "processes (one model per process)")] = "threads",
    workers: Annotated[int, Field(ge=1, le=256, description="chunks in flight at once (threads or local "
                                  "Dask worker processes)")] = 2,
    dask_address: Annotated[
        str | None, Field(description="join this Dask scheduler instead of starting a local cluster")
    ] = None,
    thumbnails: Annotated[int, Field(ge=0, le=32, description="overlay thumbnails in the markdown artifact")] = 4,
    max_bytes: Annotated[int, Field(ge=1, description="inputs (files, tar members) over this many bytes become "
                                    "error rows without being read")] = DEFAULT_MAX_BYTES,
    max_error_fraction: Annotated[float, Field(ge=0, le=1, description="the run ends Failed (exit 1) when more "
                                               "than this fraction of its inputs failed")] = 0.5,
) -> None:
    """The parameters of segment-corpus (its flow: :mod:`weakseg.flows.segment_corpus`)."""
