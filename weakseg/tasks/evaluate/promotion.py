"""The promotion gate's measurements: two models scored on the same set, compared per class.

With VOC-layout ground truth, the score is mean IoU of one prior chain (segment's default,
``ilp,sppxl``) from :func:`~weakseg.tasks.evaluate.variants.score_variants`. Without it, the
score is the image-level mAP of the shards' held-out split (the LSE image scores against the
tags, as train-mil's validation measures it, with
:func:`~weakseg.tasks.train.trainer.average_precision` per class). :func:`compare` decides:
the candidate passes when its score is not below the current one's by more than the
tolerance, or when there is no current release.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..ingest.manifest import load_manifest, shard_specs
from ..segment.inference import DEFAULT_MAX_SIDE, ModelBundle
from ..segment.priors import VARIANTS, parse_priors
from ..tensors import normalize
from ..train.augment import EvalTransform
from ..train.shard_reader import eval_pipeline, make_loader
from ..train.trainer import average_precision
from .scoring import read_split_ids
from .variants import score_variants

__all__ = ["compare", "comparison_markdown", "format_score", "score_on_ground_truth", "score_on_shards", "variant_of"]


def variant_of(priors: str) -> str:
    """The :data:`~weakseg.tasks.segment.priors.VARIANTS` name of a prior chain (``ilp,sppxl`` -> ``ilp+sppxl``)."""
    chain = parse_priors(priors)
    for name, value in VARIANTS.items():
        if value == chain:
            return name
    raise ValueError(f"priors {priors!r} are not one of the scored chains: "
                     f"{', '.join(','.join(v) or 'none' for v in VARIANTS.values())}")


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def score_on_ground_truth(bundle: ModelBundle, ground_truth: str, split: str, priors: str = "ilp,sppxl",
                          max_side: int = DEFAULT_MAX_SIDE, tta: str | None = None,
                          limit: int | None = None) -> dict[str, Any]:
    """Mean IoU (and IoU per ground-truth class) of the model with ``priors`` on a VOC-layout split, small photos
    enlarged as segment's default ``--min-side`` does for this model; a progress bar in a terminal."""
    variant = variant_of(priors)
    total = len(read_split_ids(ground_truth, split)[:limit])
    with tqdm(total=total, desc=f"promote: scoring {bundle.model_id}", unit="img", disable=None) as bar:
        metrics = score_variants(bundle, ground_truth, split, None, [variant], max_side=max_side, limit=limit,
                                 min_side=bundle.resolve_min_side(None, max_side), tta=tta,
                                 progress=bar.update)[variant]
    return {"metric": "mean_iou", "value": _nan_to_none(metrics["mean_iou"]), "images": metrics["images"],
            "per_class": {name: _nan_to_none(v["iou"]) for name, v in metrics["per_class"].items()},
            "set": f"{split} split of the ground truth, priors {variant}"}


@torch.no_grad()
def score_on_shards(bundle: ModelBundle, shards: str, split: str = "val", batch_size: int = 16,
                    manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Image-level mAP (AP per class of the LSE scores against the tags) on a split of the shards;
    a progress bar in a terminal."""
    manifest = dict(manifest or load_manifest(shards))
    classes = list(manifest["classes"])
    if list(bundle.classes) != classes:
        raise ValueError(f"model {bundle.model_id} has other classes than the shards ({len(bundle.classes)} vs "
                         f"{len(classes)}): score both models on VOC-layout ground truth instead")
    specs = shard_specs(shards, manifest, split)
    size = max(bundle.checkpoint.input_size, bundle.model.min_input_size)  # as validated in training
    pipeline = eval_pipeline(list(specs), len(classes), EvalTransform(size),
                             split_by_node=False, specs=specs, classes=classes)
    model, config = bundle.model.eval(), bundle.checkpoint.config
    scores, targets = [], []
    total = manifest.get("splits", {}).get(split, {}).get("samples")  # what the manifest says the split holds
    with tqdm(total=total, desc=f"promote: scoring {bundle.model_id}", unit="img", disable=None) as bar:
        for batch in make_loader(pipeline, len(classes), batch_size):
            x = normalize(batch["images"].to(bundle.device), config.mean, config.std)
            maps = model(x, dense=True)
            scores.append(model.image_scores(maps.float(), batch["valid"].to(bundle.device), dense=True).float().cpu())
            targets.append(batch["target"])
            bar.update(len(batch["target"]))
    if not scores:
        raise ValueError(f"split {split!r} of the shards has no readable samples to score on")
    s, t = torch.cat(scores).double().numpy(), torch.cat(targets).numpy() > 0
    per_class = {name: _nan_to_none(average_precision(s[:, k], t[:, k])) for k, name in enumerate(classes)}
    aps = [v for v in per_class.values() if v is not None]
    return {"metric": "map", "value": float(np.mean(aps)) if aps else None, "images": int(s.shape[0]),
            "per_class": per_class, "set": f"{split} split of the shards"}


def compare(candidate: Mapping[str, Any], current: Mapping[str, Any] | None, tolerance: float,
            baseline: str | None = None) -> dict[str, Any]:
    """The gate's decision and the per-class table: pass when candidate >= current - tolerance, or no current.

    ``baseline``: the ``model_id`` of the release ``current`` scored, recorded with the comparison
    (the pointer moves only while that release is current)."""
    if current is None:
        passed, delta = True, None
    else:
        cand, cur = candidate["value"], current["value"]
        if cand is None:
            passed, delta = False, None
        elif cur is None:
            passed, delta = True, None
        else:
            delta = cand - cur
            passed = cand >= cur - tolerance
    names = list(candidate["per_class"]) + [n for n in (current or {}).get("per_class", {})
                                             if n not in candidate["per_class"]]
    rows = []
    for name in names:
        c = candidate["per_class"].get(name)
        r = (current or {}).get("per_class", {}).get(name)
        rows.append({"class": name, "candidate": c, "current": r,
                     "delta": None if c is None or r is None else c - r})
    return {"passed": passed, "baseline": baseline, "metric": candidate["metric"], "set": candidate.get("set"),
            "candidate": candidate["value"], "current": None if current is None else current["value"],
            "delta": delta, "tolerance": tolerance, "per_class": rows}


def format_score(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def comparison_markdown(comparison: Mapping[str, Any], candidate_id: str, current_id: str | None,
                        outcome: str) -> str:
    """The comparison as a markdown table (the promotion artifact): one row per class, then the mean."""
    metric = "mean IoU" if comparison["metric"] == "mean_iou" else "image-level mAP"
    per = "IoU" if comparison["metric"] == "mean_iou" else "AP"
    lines = [
        f"# promote-model: {outcome}",
        "",
        f"Candidate `{candidate_id}` vs current `{current_id or 'none'}` on {comparison.get('set')}: "
        f"{metric} {format_score(comparison['candidate'])} vs {format_score(comparison['current'])} "
        f"(tolerance {comparison['tolerance']}).",
        "",
        f"| class | candidate {per} | current {per} | Δ |",
        "|---|---:|---:|---:|",
    ]
    for row in comparison["per_class"]:
        lines.append(f"| {row['class']} | {format_score(row['candidate'])} | {format_score(row['current'])} | "
                     f"{format_score(row['delta'], signed=True)} |")
    lines.append(f"| **{metric}** | **{format_score(comparison['candidate'])}** | "
                 f"**{format_score(comparison['current'])}** | "
                 f"**{format_score(comparison['delta'], signed=True)}** |")
    return "\n".join(lines)
