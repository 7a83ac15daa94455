"""promote-model: the promotion gate of the model registry.

candidate checkpoint -> published as an immutable release (a no-op when it already is one)
-> candidate and current release scored on the same set: mean IoU on VOC-layout ground truth
(``--ground-truth``), else image-level mAP on a held-out split of the shards (``--shards``,
by default the ones the candidate was trained on) -> ``{registry}/current.json`` moved to the
candidate when it is not worse than the current release by more than ``--tolerance``, or
with ``--force`` (recorded). The per-class comparison is the ``promote-model`` markdown
artifact. Refused: the run ends Failed (``weakseg promote`` exits 1) with the comparison as
its data.

Concurrent promotions: from reading the current release to moving the pointer, the flow
holds its registry's slot of a Prefect global concurrency limit (created with one slot on
first use), so promotions of one registry queue. The move itself is a compare-and-swap:
the pointer moves only while it still names the release the candidate was compared with.
When another promotion moved it first (one that did not queue: another Prefect server, a
plain ``write_pointer``), the candidate is scored against the new current release and
compared again, up to :data:`COMPARISONS` times, then refused; never promoted on a stale
comparison. The entry's ``previous`` is always the comparison's ``baseline``.

The return value (also a refused run's data) is a plain dict with ``promoted``, ``model_id``,
``previous``, ``comparison`` and ``pointer``, for a parent flow to read.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.states import Failed

from weakseg.flows._params import check_parameters, with_parameters
from weakseg.flows._registry import PROMOTED, announce, registry_slot
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.flows.params import promote_model as P
from weakseg.tasks import registry as reg
from weakseg.tasks import storage
from weakseg.tasks.evaluate.promotion import (
    compare,
    comparison_markdown,
    format_score,
    score_on_ground_truth,
    score_on_shards,
)
from weakseg.tasks.evaluate.promotion import variant_of as _variant_of
from weakseg.tasks.segment.inference import load_model

__all__ = ["COMPARISONS", "promote_model"]

COMPARISONS = 3  # comparisons with a current release that keeps moving, before the candidate is refused


@task(**IO_RETRIES, retry_condition_fn=retry_unless(ValueError), cache_policy=NONE)
def publish_candidate(model: str, registry: str) -> dict[str, Any]:
    """The candidate as a release of the registry (I/O: retried; a clash of bytes is not)."""
    resolved = reg.resolve_model(model)
    release = reg.publish_checkpoint(registry, resolved.url)
    return {"model_id": release.model_id, "url": release.model_url, "card": release.card}


@task(**IO_RETRIES, retry_condition_fn=retry_unless(ValueError), cache_policy=NONE)
def read_current(registry: str) -> dict[str, Any] | None:
    """The pointer, or None before the first promotion (I/O: retried)."""
    return reg.read_pointer(registry)


@task(cache_policy=NONE)
def score(model_url: str, device: str, ground_truth: str | None, split: str, shards: str | None, priors: str,
          max_side: int, tta: str, limit: int | None, batch_size: int) -> dict[str, Any]:
    """One model on the gate's set (compute-bound, not retried)."""
    bundle = load_model(model_url, device)
    if ground_truth:
        return score_on_ground_truth(bundle, ground_truth, split, priors, max_side, tta, limit)
    return score_on_shards(bundle, shards, split, batch_size)


@task(**IO_RETRIES, retry_condition_fn=retry_unless(ValueError), cache_policy=NONE)
def move_pointer(registry: str, model_id: str, baseline: str | None, forced: bool, comparison: dict[str, Any],
                 reason: str) -> dict[str, Any]:
    """``current.json`` by compare-and-swap against ``baseline``, then the history entry (I/O: retried; an
    incomplete release, or a baseline that moved (:class:`~weakseg.tasks.registry.BaselineMoved`), is not)."""
    return reg.write_pointer(registry, model_id, expected=baseline, forced=forced, comparison=comparison,
                             reason=reason)


@flow(name="promote-model")
@with_parameters(P.promote_model)
def promote_model(model, registry, ground_truth, split, tolerance, force, reason, shards, priors, limit, max_side, tta,
                  batch_size, device) -> dict[str, Any]:
    """Publish the candidate, score it against the current release, move the pointer or refuse."""
    logger = get_run_logger()
    _variant_of(priors)  # a chain the gate cannot score is refused before any work
    check_parameters({"tta": tta})
    storage.require_buckets({"--registry": registry})
    candidate = publish_candidate(model, registry)
    shards = shards or (None if ground_truth else candidate["card"].get("manifest", {}).get("url"))
    if not ground_truth and not shards:
        raise ValueError("no --ground-truth and no --shards, and the candidate records no shards: nothing to "
                         "score it on")
    args = (device, ground_truth, split, shards, priors, max_side, tta, limit, batch_size)
    scores = {candidate["model_id"]: score(candidate["url"], *args)}  # model_id -> its score on the set
    with registry_slot(registry):
        for attempt in range(1, COMPARISONS + 1):
            current = read_current(registry)
            baseline = None if current is None else current["model_id"]
            if baseline is not None and baseline not in scores:
                scores[baseline] = score(storage.join(registry, current["model"]), *args)
            comparison = compare(scores[candidate["model_id"]], None if baseline is None else scores[baseline],
                                 tolerance, baseline=baseline)
            promote = comparison["passed"] or force
            same = baseline == candidate["model_id"]
            result: dict[str, Any] = {"promoted": promote, "forced": force and not comparison["passed"],
                                      "model_id": candidate["model_id"], "previous": baseline,
                                      "comparison": comparison, "pointer": current}
            if not promote or same:
                break
            try:
                result["pointer"] = move_pointer(registry, candidate["model_id"], baseline, result["forced"],
                                                 comparison, reason)
                break
            except reg.BaselineMoved as moved:
                logger.warning("%s: %s", moved, "comparing again" if attempt < COMPARISONS else "refused")
        else:
            message = (f"candidate {candidate['model_id']} refused: the current release of "
                       f"{storage.redact_url(registry)} moved {COMPARISONS} times while it was being compared; "
                       "promote it again")
            logger.error("%s", message)
            return Failed(message=message, data={**result, "promoted": False})
    if promote and not same:
        announce(PROMOTED, registry, candidate["model_id"])
    outcome = ("already current" if same else "promoted (forced)" if result["forced"] else "promoted") if promote \
        else "refused"
    create_markdown_artifact(key="promote-model", markdown=comparison_markdown(
        comparison, candidate["model_id"], result["previous"], outcome),
        description=f"promote-model {candidate['model_id']}: {outcome}")
    message = (f"candidate {candidate['model_id']} {comparison['metric']} {format_score(comparison['candidate'])} vs "
               f"current {result['previous']} {format_score(comparison['current'])} (tolerance {tolerance}): {outcome}")
    if not promote:
        logger.error("%s", message)
        return Failed(message=message, data=result)
    logger.info("%s; %s -> %s", message, storage.redact_url(storage.join(registry, reg.POINTER)),
                candidate["model_id"])
    return result
