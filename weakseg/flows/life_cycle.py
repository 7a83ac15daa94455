"""life-cycle: the whole model life cycle as one flow, for a weekly schedule.

shard-imagenet -> train-mil -> refine-mil (``--refine``) -> choose-thresholds (when the
segment chain ``--priors`` has bb or seg, on ``--ground-truth``) -> promote-model (the gate)
-> segment-corpus with the promoted release, each step a subflow. Every output lands under
``{work}`` (``{cycle_id}`` replaced; the ISO week by default), the releases in ``--registry``.

Resumable: before each step its output is checked against this cycle's inputs
(:mod:`weakseg.tasks.cycle`: the shard manifest of this source, ``model.pt`` trained on these
shards, the refined ``model.pt`` refined from this training, the δ file naming the
candidate, the pointer naming it, the ``runs`` row of the segmentation with it); a finished
step is skipped, so a rerun after a kill or a failure starts at the first unfinished one
(training resumes from its newest step checkpoint), and a step redone makes the later ones
redo theirs: never a refined model of an earlier training, δ of another model. Checkpoints
of a training on other shards are removed before training. Output buckets are checked
before any work. A refused promotion ends the cycle Failed before segmenting: the corpus keeps
the current release (``segment-corpus/nightly``). Each step's other parameters come as a
mapping (``--train-options '{"epochs": 4}'``), named as its own command takes them.
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.states import Failed

from weakseg.flows._params import with_parameters
from weakseg.flows._registry import publish_release
from weakseg.flows._retries import IO_RETRIES
from weakseg.flows.choose_thresholds import choose_thresholds
from weakseg.flows.params import life_cycle as P
from weakseg.flows.params.life_cycle import option_problems
from weakseg.flows.promote_model import promote_model
from weakseg.flows.refine_mil import refine_mil
from weakseg.flows.segment_corpus import segment_corpus
from weakseg.flows.shard_imagenet import shard_imagenet
from weakseg.flows.train_mil import train_mil
from weakseg.tasks import cycle, storage
from weakseg.tasks.segment.priors import has_objectness, parse_priors

__all__ = ["life_cycle"]

def check_options(options: dict[str, dict[str, Any]]) -> None:
    """Refuse an option a step does not take, or one the cycle sets itself, before any work."""
    problems = option_problems(options)
    if problems:
        raise ValueError("; ".join(problems))


@task(**IO_RETRIES, cache_policy=NONE)
def finished(check: str, args: list[Any]) -> bool:
    """Whether a step's output is there and made from this cycle's inputs (:mod:`weakseg.tasks.cycle`; I/O:
    retried)."""
    return bool(getattr(cycle, check)(*args))


@task(**IO_RETRIES, cache_policy=NONE)
def clear_stale_training(model_dir: str, shards: str) -> list[str]:
    """Remove checkpoints of a training on other shards, which a resume would continue (I/O: retried)."""
    stale = cycle.stale_training(model_dir, shards)
    for url in stale:
        fs, path = storage.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path)
    if stale:
        get_run_logger().warning("removed %d checkpoints of a training on other shards from %s", len(stale),
                                 storage.redact_url(model_dir))
    return stale


@flow(name="life-cycle")
@with_parameters(P.life_cycle)
def life_cycle(source, registry, images, out, work, cycle_id, ground_truth, refine, priors, device, shard_options,
               train_options, refine_options, thresholds_options, promote_options, segment_options) -> dict[str, Any]:
    """Run the cycle's unfinished steps; returns what each step did, the candidate and the segmentation run."""
    logger = get_run_logger()
    opts = {"shard": shard_options or {}, "train": train_options or {}, "refine": refine_options or {},
            "thresholds": thresholds_options or {}, "promote": promote_options or {},
            "segment": {"skip_existing": True, **(segment_options or {})}}
    check_options(opts)
    chain = parse_priors(priors)
    cycle_id = cycle_id or cycle.default_cycle_id(datetime.now(UTC))
    layout = cycle.CycleLayout.for_cycle(work, cycle_id)
    storage.require_buckets({"--work": layout.root, "--registry": registry, "--out": out})
    steps: dict[str, str] = {}

    def step(name: str, done: bool, run) -> Any:
        steps[name] = "reused" if done else "ran"
        logger.info("cycle %s: %s %s", cycle_id, name, "finished before: skipped" if done else "running")
        return None if done else run()

    step("shard", finished("shards_done", [layout.shards, source, opts["shard"]]),
         lambda: shard_imagenet(source=source, dest=layout.shards, **opts["shard"]))

    def train() -> Any:
        clear_stale_training(layout.model_dir, layout.shards)
        return train_mil(shards=layout.shards, out=layout.model_dir, device=device,
                         **{"resume": True, **opts["train"]})

    step("train", finished("trained_done", [layout.model_dir, layout.shards]), train)
    trained = candidate = publish_release(registry, storage.join(layout.model_dir, "model.pt"))
    if refine:
        step("refine", finished("refined_done", [layout.refined_dir, trained["model_id"]]),
             lambda: refine_mil(shards=layout.shards, model=trained["url"], out=layout.refined_dir, device=device,
                                **{"resume": True, **opts["refine"]}))
        candidate = publish_release(registry, storage.join(layout.refined_dir, "model.pt"))
    else:
        steps["refine"] = "off"
    thresholds = None
    if not has_objectness(chain):
        steps["thresholds"] = "not needed (no bb/seg in the chain)"
    elif not ground_truth:
        steps["thresholds"] = "skipped: no ground truth (the checkpoint's δ)"
        logger.warning("priors %s use δ but there is no --ground-truth to choose them on", priors)
    else:
        thresholds = layout.thresholds(",".join(chain))
        step("thresholds", finished("thresholds_done", [thresholds, candidate["model_id"], list(chain)]),
             lambda: choose_thresholds(model=candidate["url"], ground_truth=ground_truth, out=thresholds,
                                       priors=",".join(chain), device=device, **opts["thresholds"]))
    result: dict[str, Any] = {"cycle_id": cycle_id, "work": layout.root, "steps": steps, "trained": trained,
                              "candidate": candidate, "thresholds": thresholds}
    gate = step("promote", finished("promoted", [registry, candidate["model_id"]]),
                lambda: promote_model(model=candidate["url"], registry=registry, ground_truth=ground_truth,
                                      device=device, return_state=True, **opts["promote"]))
    if gate is not None and gate.is_failed():
        _report(cycle_id, steps, candidate)
        return Failed(message=f"cycle {cycle_id}: the gate refused {candidate['model_id']}: {gate.message}",
                      data=result)
    run_id = opts["segment"].pop("run_id", None) or f"cycle-{cycle_id}"
    segmentation = step("segment", finished("segmented", [out, run_id, candidate["model_id"]]),
                        lambda: segment_corpus(images=images, model=candidate["url"], out=out, priors=priors,
                                               thresholds=thresholds, device=device, run_id=run_id,
                                               return_state=True, **opts["segment"]))
    result["run_id"] = run_id
    _report(cycle_id, steps, candidate)
    if segmentation is not None and segmentation.is_failed():
        return Failed(message=f"cycle {cycle_id}: segment-corpus failed: {segmentation.message}", data=result)
    return result


def _report(cycle_id: str, steps: dict[str, str], candidate: dict[str, Any]) -> None:
    create_table_artifact(key="life-cycle", table=[{"step": s, "outcome": steps.get(s, "not reached")}
                                                   for s in cycle.STEPS],
                          description=f"life-cycle {cycle_id}: candidate release {candidate['model_id']}")
