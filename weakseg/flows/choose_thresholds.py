"""choose-thresholds: the δ_k of SP-bb / SP-seg for one prior chain, chosen on a VOC-layout split.

model + ground truth (``JPEGImages/``, ``SegmentationClass/``,
``ImageSets/Segmentation/<split>.txt``) -> the chain's labels and objectness on every
image of the split, in one pass -> one shared δ by grid search, then per-class coordinate
ascent on mean IoU (:mod:`weakseg.tasks.evaluate.thresholds`) -> the thresholds JSON that
``weakseg segment --thresholds`` reads, and a table artifact of δ per class. δ belong to
the chain they were chosen for (``ilp,sppxl,seg`` tests smoothed labels, ``ilp,seg`` raw
ones); the file records it, and the model's id (``search.model_id``). ``--model`` may be a
registry, resolved once to its current release. Images that cannot be read are skipped and counted, never fatal.

δ are chosen on the training split by default: tuned on the split an evaluation of the same
output scores (``eval_split``, ``val`` by default), they flatter that evaluation. Asked to,
the flow still does it, with a warning in the log, the artifact and the file's ``search``.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from weakseg.flows._params import check_parameters, with_parameters
from weakseg.flows._progress import Progress
from weakseg.flows._registry import resolve_model
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.flows.params import choose_thresholds as P
from weakseg.tasks import storage
from weakseg.tasks.evaluate.scoring import read_split_ids
from weakseg.tasks.evaluate.variants import ChainThresholds, choose_chain_thresholds
from weakseg.tasks.segment.priors import has_objectness, parse_priors, threshold_prior
from weakseg.tasks.segment.tta import AUTO

__all__ = ["choose_thresholds", "read_split", "search", "split_warning", "write"]


def split_warning(split: str, eval_split: str = "val") -> str | None:
    """The warning for choosing δ on the split an evaluation of the same output uses, else None."""
    if split != eval_split:
        return None
    return (f"choosing δ on {split!r}, the split the evaluation scores: the evaluation's numbers will be "
            "flattered (choose on train or a dev split, evaluate on val once)")


@task(cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless(ValueError))
def read_split(ground_truth: str, split: str, limit: int | None) -> list[str]:
    """The split's image ids (I/O: retried), the first ``limit`` of them."""
    ids = read_split_ids(ground_truth, split)[:limit]
    if not ids:
        raise ValueError(f"split {split!r} of {ground_truth} lists no images")
    return ids


@task(cache_policy=NONE)
def search(model: str, device: str, ground_truth: str, ids: list[str], chains: dict[str, tuple[str, ...]],
           max_side: int, min_side: int, tta: str = AUTO) -> dict[str, ChainThresholds]:
    """Load the model and run the search for each chain, in one pass over the images (CPU/GPU-bound, not retried),
    with a progress bar and the ``choose-thresholds-progress`` artifact."""
    with Progress("choose-thresholds-progress", "thresholds", total=len(ids)) as progress:
        return choose_chain_thresholds(model, device, ground_truth, ids, chains, max_side, min_side, tta,
                                       progress.update)


@task(cache_policy=NONE, **IO_RETRIES, retry_condition_fn=retry_unless(ValueError))
def write(out: str, chosen: ChainThresholds, how: dict[str, Any]) -> dict[str, Any]:
    """The thresholds file, written atomically (I/O: retried)."""
    return chosen.write(out, how)


@flow(name="choose-thresholds")
@with_parameters(P.choose_thresholds)
def choose_thresholds(model, ground_truth, out, split, eval_split, priors, limit, max_side, min_side, tta,
                      device) -> dict[str, Any]:
    """Choose δ_k for one chain; returns the thresholds document."""
    logger = get_run_logger()
    chain = parse_priors(priors)
    if not has_objectness(chain):
        raise ValueError(f"priors {priors!r} have no objectness prior (bb or seg): there is no δ to choose")
    check_parameters({"min_side": min_side, "max_side": max_side, "tta": tta})
    storage.require_buckets({"--out": out})
    prior = threshold_prior(chain)
    ids = read_split(ground_truth, split, limit)
    logger.info("choosing δ of %s for priors %s on %d %s images of %s", prior, ",".join(chain), len(ids), split,
                ground_truth)
    leak = split_warning(split, eval_split)
    if leak:
        logger.warning(leak)
    resolved = resolve_model(model)  # once: a registry's pointer may move during the run
    chosen = search(resolved.url, device, ground_truth, ids, {"chain": chain}, max_side, min_side, tta)["chain"]
    resolved.check(chosen.how["model_id"])
    how = {**chosen.how, "split": split, **({"split_warning": leak} if leak else {})}
    doc = write(out, chosen, how)
    if how["skipped"]:
        logger.warning("%d of %d images could not be read and were skipped, e.g. %s", how["skipped"], len(ids),
                       next(iter(how["skipped_images"].items())))
    create_table_artifact(
        key="choose-thresholds",
        table=[{"class": c, "delta": v} for c, v in doc["thresholds"].items()],
        description=(f"{'WARNING: ' + leak + '. ' if leak else ''}"
                     f"model {how['model_id']}: δ of {prior} for priors {','.join(chain)} on {how['images']} "
                     f"{split} images ({how['skipped']} skipped): mean IoU {how['mean_iou']:.4f} with them, "
                     f"{how['shared_mean_iou']:.4f} with one shared δ = {how['shared_threshold']:.4g}. "
                     f"{out}"),
    )
    logger.info("mean IoU on the split %.4f with per-class δ (%.4f with one shared δ) -> %s", how["mean_iou"],
                how["shared_mean_iou"], out)
    return doc
