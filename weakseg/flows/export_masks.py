"""export-masks: a segment-corpus run's masks as COCO (RLE) or a VOC-layout folder.

find the run (refused when it is not in the ``runs`` table, or ended Failed without
``--include-failed``) -> stream its chunks into the chosen format, with a progress bar and
the ``export-masks-progress`` artifact -> the ``export-masks`` table artifact. The formats,
and what ``--classes`` and ``--min-area-fraction`` do to each: :mod:`weakseg.tasks.export`.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from weakseg.flows._params import with_parameters
from weakseg.flows._progress import Progress
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.flows.params import export_masks as P
from weakseg.tasks import export, storage

__all__ = ["export_masks"]


@task(**IO_RETRIES, cache_policy=NONE, retry_condition_fn=retry_unless(ValueError))
def find_run(predictions: str, run_id: str, include_failed: bool, classes: list[str] | None) -> export.ExportPlan:
    """The run's row and the classes that go out (I/O: retried; a missing or Failed run is not)."""
    return export.plan_export(predictions, run_id, include_failed, classes)


@task(**IO_RETRIES, cache_policy=NONE, retry_condition_fn=retry_unless(ValueError))
def write_export(predictions: str, plan: export.ExportPlan, format: str, out: str, min_area_fraction: float,
                 images_root: str | None) -> dict[str, Any]:
    """Stream the run into the format (retried whole: every file is replaced in one piece)."""
    with Progress("export-masks-progress", f"export {format}") as progress:
        if format == "coco":
            return export.export_coco(predictions, plan, out, min_area_fraction, images_root, progress.update)
        return export.export_voc(predictions, plan, out, min_area_fraction, progress.update)


@flow(name="export-masks")
@with_parameters(P.export_masks)
def export_masks(predictions, run_id, format, out, classes, min_area_fraction, images_root,
                 include_failed) -> dict[str, Any]:
    """Export one run; returns what was written."""
    logger = get_run_logger()
    plan = find_run(predictions, run_id, include_failed, classes)
    if plan.state == "Failed":
        logger.warning("run %s ended Failed: exporting what it wrote", run_id)
    summary = write_export(predictions, plan, format, out, min_area_fraction, images_root)
    if summary["images"] == 0:
        logger.warning("run %s has no segmented image to export", run_id)
    if summary.get("outside_images_root"):
        logger.warning("%d images are not under --images-root %s: their file_name is their full URI",
                       summary["outside_images_root"], storage.redact_url(images_root or ""))
    create_table_artifact(key="export-masks", table=[{k: str(v) for k, v in summary.items()}],
                          description=f"run {run_id} (model {plan.model_id}) exported as {format} to "
                          f"{storage.redact_url(out)}")
    logger.info("run %s: %d images exported as %s to %s", run_id, summary["images"], format, storage.redact_url(out))
    return {"run_id": run_id, "model_id": plan.model_id, **summary}
