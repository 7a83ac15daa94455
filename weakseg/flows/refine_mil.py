"""refine-mil: fine-tune a trained MIL model on its own pseudo-labels (the refinement stage).

shards + model -> ``{out}/pseudo-labels/pseudo-*.tar`` (each training image labelled among
its own tags, with the priors; :mod:`weakseg.tasks.train.pseudo_labels`) -> the network
fine-tuned on them with per-pixel cross-entropy plus the MIL loss
(:mod:`weakseg.tasks.train.refine`) -> ``{out}/model.pt``, an ordinary checkpoint that
``weakseg segment``, ``thresholds`` and ``evaluate`` use unchanged; with ``--registry URL``
also published as the immutable release ``{registry}/releases/{model_id}/``, its card naming
the parent model (``refined_from``). ``--model`` may be a registry (its current release). The
pseudo-label statistics (coverage, pixels per class) and the per-epoch losses go to the log,
the checkpoint and the ``refine-mil-metrics`` artifact. ``--rounds N`` repeats the stage on
pseudo-labels from the model the round before made (iterated self-training); on dev a second
round lifted a Lite0 model a lot and a Lite2 one not at all, so the default is one round
(docs/method.md, *Choices*). Rounds before the last write ``{out}/round-N/`` (kept: a rerun
reuses a finished round); the last writes ``{out}/model.pt``.

Step checkpoints (``{out}/checkpoint-step-*.pt``, removed once ``model.pt`` is written) let
``--resume`` continue a killed refinement on the same pseudo-labels to the weights an
uninterrupted run gives; without ``--resume`` a folder that holds them is refused.
"""
from __future__ import annotations

import hashlib
import io
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from weakseg.flows._gpu import gpu_slot
from weakseg.flows._params import check_parameters, with_parameters
from weakseg.flows._registry import PUBLISHED, announce, publish_release, resolve_model
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.flows.params import refine_mil as P
from weakseg.models import load_checkpoint
from weakseg.tasks import storage
from weakseg.tasks.devices import resolve_device
from weakseg.tasks.ingest.manifest import ManifestError, load_manifest
from weakseg.tasks.segment.inference import load_model
from weakseg.tasks.segment.priors import parse_priors
from weakseg.tasks.storage import redact_url
from weakseg.tasks.train.pseudo_labels import check_pseudo_labels, write_pseudo_labels
from weakseg.tasks.train.refine import RefineConfig, image_loss_of, run_refine
from weakseg.tasks.train.trainer import list_checkpoints

__all__ = ["refine_mil"]


@task(**IO_RETRIES, retry_condition_fn=retry_unless(ManifestError), cache_policy=NONE)
def read_manifest(shards: str) -> dict[str, Any]:
    """The shard manifest (I/O: retried)."""
    return load_manifest(shards)


@task(cache_policy=NONE)
def label_training_images(model: str, device: str, shards: str, manifest: dict[str, Any], out: str,
                          priors: tuple[str, ...], confidence: float, max_side: int, tta: str,
                          finetune_from: int | None = None, precision: str = "auto") -> dict[str, Any]:
    """Pseudo-label the training split with the model (compute-bound, not retried)."""
    bundle = load_model(model, device)
    if list(bundle.classes) != list(manifest["classes"]):
        raise ValueError(f"the model's {len(bundle.classes)} classes are not the shards' {len(manifest['classes'])} "
                         "(in order): refine a model on the shards it was trained on")
    bundle.checkpoint.model.backbone.stage_index(finetune_from)  # a stage it lacks: fails before the pseudo-labels
    background = image_loss_of(bundle.checkpoint).background  # as the model's training had it
    stats = write_pseudo_labels(bundle, shards, manifest, storage.join(out, "pseudo-labels"), priors=priors,
                                confidence=confidence, max_side=max_side, background=background, tta=tta,
                                precision=precision)
    return {**stats.to_dict(), "parent": {"url": bundle.model_uri, "model_id": bundle.model_id,
                                          "sha256": bundle.sha256}}


@task(**IO_RETRIES, cache_policy=NONE)
def unfinished_refinement(out: str) -> str | None:
    """The newest step checkpoint of a refinement in ``out`` that did not finish, or None (I/O: retried)."""
    existing = list_checkpoints(out)
    return existing[-1][1] if existing else None


def _training_state_refining(checkpoint: str, model: str, what: str, fix: str) -> dict[str, Any]:
    """The training state of ``checkpoint``, a refinement of ``model`` (the same bytes: its ``refined_from``
    sha256); a checkpoint that refines another model is refused, ``what`` naming it and ``fix`` the remedy."""
    state = load_checkpoint(io.BytesIO(storage.read_bytes(checkpoint))).training_state
    made_from = state.get("refined_from", {}).get("sha256")
    digest = hashlib.sha256(storage.read_bytes(model)).hexdigest()
    if made_from != digest:
        raise ValueError(f"{what}: it refines another model (sha256 {str(made_from)[:12]}..., not "
                         f"{redact_url(model)}'s {digest[:12]}...); {fix}")
    return state


@task(cache_policy=NONE)
def resumed_pseudo_labels(checkpoint: str, model: str) -> dict[str, Any]:
    """The pseudo-labels an unfinished refinement trains on, checked: made from ``model`` (same bytes), every
    shard there and unchanged. A resume trains on them instead of labelling the images again."""
    state = _training_state_refining(checkpoint, model, f"cannot resume from {redact_url(checkpoint)}",
                                     "use another --out")
    parent = state["refined_from"]
    pseudo = dict(state["pseudo_labels"])
    check_pseudo_labels(pseudo)
    return {**pseudo, "parent": parent}


@task(cache_policy=NONE)
def refine(model: str, device: str, pseudo: dict[str, Any], out: str, config: RefineConfig) -> dict[str, Any]:
    """The fine-tuning loop on a fresh copy of the model (never cached, never retried)."""
    ckpt = load_checkpoint(io.BytesIO(storage.read_bytes(model)))
    return run_refine(ckpt, pseudo["shards"], pseudo["images"], out, config, device=resolve_device(device),
                      parent=pseudo["parent"], pseudo_stats={k: v for k, v in pseudo.items() if k != "parent"},
                      on_epoch=lambda row: get_run_logger().info("epoch %s", row))


@task(cache_policy=NONE)
def publish_metrics(pseudo: dict[str, Any], result: dict[str, Any]) -> None:
    """Per-epoch losses and the pseudo-label statistics as the ``refine-mil-metrics`` artifact."""
    per_class = ", ".join(f"{k} {v}" for k, v in pseudo["class_pixels"].items())
    create_table_artifact(
        key="refine-mil-metrics", table=result["history"],
        description=f"refine-mil: {pseudo['images']} images pseudo-labelled ({pseudo['coverage']:.1%} of pixels "
                    f"kept; pixels per class: {per_class}); {result['steps']} steps; checkpoint "
                    f"{redact_url(result['checkpoint'])}")


@task(**IO_RETRIES, cache_policy=NONE)
def finished_round(out: str, parent: str) -> dict[str, Any] | None:
    """``{out}/model.pt``'s URL and parent record when an earlier run finished this round from ``parent`` (same
    bytes), else None; a model there refined from another parent is refused (I/O: retried)."""
    url = storage.join(out, "model.pt")
    if not storage.exists(url) or list_checkpoints(out):
        return None
    made_from = _training_state_refining(url, parent, redact_url(url), "choose another --out")["refined_from"]
    return {"checkpoint": url, "parent": made_from}


@flow(name="refine-mil")
@with_parameters(P.refine_mil)
def refine_mil(shards, model, out, priors, confidence, epochs, steps_per_epoch, batch_size, input_size, scale, lr,
               mil_weight, class_weights, lr_schedule, rounds, soup, finetune_from, backbone_lr_scale, output_stride,
               max_side, tta, device, num_workers, precision, seed, progress, checkpoint_every, resume,
               registry) -> dict[str, Any]:
    """Pseudo-label the training images with the model, fine-tune it on them (``rounds`` times, each round on
    the labels of the model the round before made); returns the last round's checkpoint URL."""
    logger = get_run_logger()
    chain = parse_priors(priors)
    check_parameters({"tta": tta})
    storage.require_buckets({"--out": out, "--registry": registry})
    config = RefineConfig(epochs=epochs, batch_size=batch_size, input_size=input_size, scale=(scale[0], scale[1]),
                          lr=lr, mil_weight=mil_weight, class_weights=class_weights, lr_schedule=lr_schedule,
                          finetune_from=finetune_from, steps_per_epoch=steps_per_epoch, soup=soup,
                          num_workers=num_workers, precision=precision, seed=seed, progress=progress,
                          checkpoint_every=checkpoint_every,
                          backbone_lr_scale=backbone_lr_scale, output_stride=output_stride,
                          resume=resume)  # a bad range fails here, not later
    manifest = read_manifest(shards)
    model = resolve_model(model).url  # once: a registry's pointer may move during the run
    earlier: list[dict[str, Any]] = []
    origin = None  # the model the first round refined: every round's checkpoint names it
    for number in range(1, rounds + 1):
        last = number == rounds
        round_out = out if last else storage.join(out, f"round-{number}")
        lineage = None if rounds == 1 else {"round": number, "rounds": rounds, "origin": origin}
        done = None if last else finished_round(round_out, model)
        if done:  # a rerun (or --resume) of a multi-round refinement: this round finished before
            logger.info("round %d/%d: done before, %s", number, rounds, redact_url(done["checkpoint"]))
            result = done
        else:
            if rounds > 1:
                logger.info("round %d/%d: refining %s into %s", number, rounds, redact_url(model),
                            redact_url(round_out))
            result = refine_round(shards, model, round_out, manifest, chain, confidence, max_side, tta, device,
                                  finetune_from, precision, resume, config, lineage)
        origin = origin or _origin(result["parent"] if done else result["pseudo_labels"]["parent"])
        if not last:
            earlier.append({"round": number, "checkpoint": result["checkpoint"]})
            model = result["checkpoint"]
    logger.info("refined model %s", redact_url(result["checkpoint"]))
    if registry:
        result["release"] = publish_release(registry, result["checkpoint"])
        announce(PUBLISHED, registry, result["release"]["model_id"])
    return {**result, "earlier_rounds": earlier}


def _origin(parent: dict[str, Any]) -> dict[str, Any]:
    """The first round's parent: the one a round's parent record names, or the record itself in round 1."""
    return parent.get("origin") or {k: parent[k] for k in ("url", "model_id", "sha256") if k in parent}


def refine_round(shards: str, model: str, out: str, manifest: dict[str, Any], chain: tuple[str, ...],
                 confidence: float, max_side: int, tta: str, device: str, finetune_from: int | None, precision: str,
                 resume: bool, config: RefineConfig, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """One refinement of ``model`` into ``out``: its pseudo-labels (or, resumed, the unfinished run's), then the
    fine-tuning. ``lineage`` (several rounds): this round's number, the count and the first round's parent
    (``origin``; None in round 1), kept in the checkpoint's parent record so a registry card names the model the
    rounds started from."""
    logger = get_run_logger()
    unfinished = unfinished_refinement(out)
    if unfinished and not resume:  # before the pseudo-labels, which would overwrite the ones it trains on
        raise ValueError(f"{redact_url(out)} holds an unfinished refinement ({redact_url(unfinished)}); pass "
                         "--resume to continue it, or choose another --out")
    with gpu_slot(str(resolve_device(device))):
        if unfinished:
            pseudo = resumed_pseudo_labels(unfinished, model)
            logger.info("resuming: the pseudo-labels of %s", redact_url(unfinished))
        else:
            pseudo = label_training_images(model, device, shards, manifest, out, chain, confidence, max_side, tta,
                                           finetune_from, precision)
        logger.info("pseudo-labels: %d images, %.1f%% of pixels kept, %d skipped", pseudo["images"],
                    100 * pseudo["coverage"], pseudo["skipped"])
        if lineage is not None:
            pseudo["parent"] = {**pseudo["parent"], **{k: v for k, v in lineage.items() if v is not None}}
        result = refine(model, device, pseudo, out, config)
    publish_metrics(pseudo, result)
    return {**result, "pseudo_labels": pseudo}
