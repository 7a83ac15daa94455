"""The parameters of life-cycle (``weakseg cycle``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from weakseg.flows._params import EXISTING, flow_parameters
from weakseg.flows.params.choose_thresholds import choose_thresholds
from weakseg.flows.params.promote_model import promote_model
from weakseg.flows.params.refine_mil import refine_mil
from weakseg.flows.params.segment_corpus import segment_corpus
from weakseg.flows.params.shard_imagenet import shard_imagenet
from weakseg.flows.params.train_mil import train_mil

Options = Annotated[dict[str, Any] | None, Field(description="more parameters of that step, as its command "
                                                 "takes them (JSON on the command line)")]

__all__ = ["life_cycle", "option_problems"]

# Each step's parameters, and what the cycle sets itself in it (not accepted in that step's options).
_SET_BY_CYCLE = {
    "shard": (shard_imagenet, "shard-imagenet", {"source", "dest"}),
    "train": (train_mil, "train-mil", {"shards", "out", "device", "registry"}),
    "refine": (refine_mil, "refine-mil", {"shards", "model", "out", "device", "registry"}),
    "thresholds": (choose_thresholds, "choose-thresholds", {"model", "ground_truth", "out", "priors", "device"}),
    "promote": (promote_model, "promote-model", {"model", "registry", "ground_truth", "device"}),
    "segment": (segment_corpus, "segment-corpus", {"images", "model", "out", "priors", "thresholds", "device"}),
}


def option_problems(options: dict[str, dict[str, Any]]) -> list[str]:
    """An option a step does not take, or one the cycle sets itself (``options``: step -> mapping)."""
    problems = []
    for step, given in options.items():
        spec, flow_name, fixed = _SET_BY_CYCLE[step]
        names = {p.name for p in flow_parameters(spec)}
        problems += [f"--{step}-options: {k!r} is set by the cycle" for k in given if k in fixed]
        problems += [f"--{step}-options: {flow_name} has no parameter {k!r}" for k in given if k not in names]
    return problems


def life_cycle(
    source: Annotated[str, Field(description="labelled image collection to shard (as weakseg shard --source)"),
                      EXISTING],
    registry: Annotated[str, Field(description="registry folder URL: releases are published and promoted there")],
    images: Annotated[str, Field(description="corpus to segment with the promoted release (as weakseg segment "
                                 "--images)"), EXISTING],
    out: Annotated[str, Field(description="output folder URL of the segmentation tables")],
    work: Annotated[str, Field(description="folder URL of this cycle's shards/, model/, refined/ and δ files; "
                               "{cycle_id} is replaced")] = "./cycles/{cycle_id}",
    cycle_id: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                          description="this cycle's id (default: the ISO week, e.g. 2025-W07); "
                                          "the same id resumes a cycle")] = None,
    ground_truth: Annotated[str | None, Field(description="VOC-layout folder URL: δ are chosen on its train split "
                                              "and the gate scores mean IoU on its val split; without it the gate "
                                              "scores image-level mAP on the held-out shards"), EXISTING] = None,
    refine: Annotated[bool, Field(description="refine the trained model on its pseudo-labels; the refined "
                                  "model is the candidate")] = True,
    priors: Annotated[str, Field(description="prior chain of the segmentation (and of δ when it has bb/seg)")] = (
        "ilp,sppxl"),
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: cuda when available")] = "auto",
    shard_options: Options = None,
    train_options: Options = None,
    refine_options: Options = None,
    thresholds_options: Options = None,
    promote_options: Options = None,
    segment_options: Options = None,
) -> None:
    """The parameters of life-cycle (its flow: :mod:`weakseg.flows.life_cycle`)."""
