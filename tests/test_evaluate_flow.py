"""evaluate-segmentation end to end: segment-corpus-shaped Parquet tables against VOC ground truth."""
import io
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from weakseg.flows.cli import main
from weakseg.flows.evaluate_segmentation import evaluate_segmentation
from weakseg.tasks import storage
from weakseg.tasks.evaluate.scoring import decode_mask, read_gt_classes, read_split_ids
from weakseg.tasks.ingest.sources import image_key

RUN_DATE = "2026-11-26"
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def _png(mask: np.ndarray) -> bytes:
    img = Image.fromarray(mask.astype(np.uint8), "P")
    img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write(url: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(url, sink.getvalue())


def write_run(out: str, run_id: str, classes: list[str], masks: dict[str, np.ndarray], ended: datetime,
              uri_prefix: str = "s3://corpus/JPEGImages/", chunk: str = "chunk-000000",
              failed: tuple[str, ...] = ()) -> None:
    """A segment-corpus output run as the DESIGN contract describes it (only the columns read here)."""
    part = f"run_date={RUN_DATE}"
    uris = {i: f"{uri_prefix}{i}.jpg" for i in [*masks, *failed]}
    _write(storage.join(out, "images", part, f"{run_id}-{chunk}.parquet"), pa.table({
        "run_id": [run_id] * len(uris), "image_key": [image_key(u) for u in uris.values()],
        "image_uri": list(uris.values()), "status": ["ok"] * len(masks) + ["error"] * len(failed)}))
    _write(storage.join(out, "masks", part, f"{run_id}-{chunk}.parquet"), pa.table({
        "run_id": [run_id] * len(masks), "image_key": [image_key(uris[i]) for i in masks],
        "width": pa.array([m.shape[1] for m in masks.values()], pa.int32()),
        "height": pa.array([m.shape[0] for m in masks.values()], pa.int32()),
        "mask_png": pa.array([_png(m) for m in masks.values()], pa.binary())}))
    _write(storage.join(out, "runs", part, f"{run_id}.parquet"), pa.table({
        "run_id": [run_id], "classes": pa.array([classes], pa.list_(pa.string())),
        "started_at": pa.array([ended - timedelta(minutes=5)], pa.timestamp("us", tz="UTC")),
        "ended_at": pa.array([ended], pa.timestamp("us", tz="UTC"))}))


@pytest.fixture(scope="module")
def gt_masks(msrc21):
    ids = read_split_ids(str(msrc21), "val")[:40]
    return {i: decode_mask((msrc21 / "SegmentationClass" / f"{i}.png").read_bytes()) for i in ids}


@pytest.fixture(scope="module")
def val_subset(msrc21, gt_masks, tmp_path_factory):
    """MSRC-21's real ground truth, with a 40-image val split (keeps the test quick)."""
    root = tmp_path_factory.mktemp("gt")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(gt_masks) + "\n")
    (root / "SegmentationClass").symlink_to(msrc21 / "SegmentationClass")
    (root / "classes.txt").write_text((msrc21 / "classes.txt").read_text())
    return str(root)


def _perturb(masks, classes_n, rng):
    out = {}
    for i, m in masks.items():
        p = m.copy()
        p[: p.shape[0] // 4] = rng.integers(0, classes_n)  # a band of wrong labels
        out[i] = p
    return out


@pytest.mark.slow
def test_perfect_perturbed_and_missing(prefect_harness, msrc21, gt_masks, val_subset, tmp_path):
    classes = list(read_gt_classes(str(msrc21)))
    preds = str(tmp_path / "preds")
    # an older perfect run: predictions on void are ignored, so the ground truth itself is perfect
    write_run(preds, "run-perfect", classes, gt_masks, T0)
    # the latest run: perturbed masks, classes in another order, three images missing, one of the wrong size
    rng = np.random.default_rng(0)
    perturbed = _perturb(gt_masks, len(classes), rng)
    order = classes[::-1]
    remap = np.full(256, 255, np.uint8)
    remap[: len(classes)] = [order.index(c) for c in classes]
    ids = list(gt_masks)
    latest = {i: remap[perturbed[i]] for i in ids[3:]}
    latest[ids[3]] = latest[ids[3]][:-1]  # one row short
    latest["not_in_split"] = np.zeros((5, 5), np.uint8)
    write_run(preds, "run-latest", order, latest, T0 + timedelta(hours=1), failed=(ids[1],))

    doc = evaluate_segmentation(predictions=preds, ground_truth=val_subset, run_id="run-perfect")
    assert doc["mean_iou"] == 1.0 and doc["pixel_accuracy"] == 1.0 and doc["mean_class_accuracy"] == 1.0
    assert doc["images"]["scored"] == 40 and doc["images"]["missing_prediction"] == 0
    assert doc["run_id"] == "run-perfect" and doc["split"] == "val"
    out = tmp_path / "preds" / "evaluation"
    assert json.loads((out / "metrics.json").read_text())["mean_iou"] == 1.0

    doc = evaluate_segmentation(predictions=preds, ground_truth=val_subset, out=str(tmp_path / "eval2"))
    assert doc["run_id"] == "run-latest"
    assert 0 < doc["mean_iou"] < 1
    im = doc["images"]
    assert (im["scored"], im["missing_prediction"], im["size_mismatch"], im["masks_without_ground_truth"]) == (
        36, 3, 1, 1)
    per_class = pq.read_table(tmp_path / "eval2" / "per_class.parquet").to_pylist()
    assert [r["class_name"] for r in per_class] == classes
    present = [r for r in per_class if r["in_mean"]]
    assert doc["mean_iou"] == pytest.approx(np.mean([r["iou"] for r in present]))
    conf = pq.read_table(tmp_path / "eval2" / "confusion.parquet")
    assert sum(conf.column("pixels").to_pylist()) == doc["pixels"]
    per_image = {r["image_id"]: r for r in pq.read_table(tmp_path / "eval2" / "per_image.parquet").to_pylist()}
    assert per_image[ids[0]]["status"] == "missing_prediction"
    assert per_image[ids[1]]["status"] == "missing_prediction" and "status in the run: error" in \
        per_image[ids[1]]["message"]
    assert per_image[ids[3]]["status"] == "size_mismatch" and "ground truth is" in per_image[ids[3]]["message"]
    assert per_image[ids[5]]["status"] == "scored" and 0 < per_image[ids[5]]["pixel_accuracy"] < 1

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        art = client.read_latest_artifacts()
        art = [a for a in art if a.key == "evaluate-segmentation"]
    assert art and "3 without prediction" in art[0].description


@pytest.mark.slow
def test_cli_on_memory_storage_with_voc_default_classes(prefect_harness):
    """No classes.txt: the VOC list; predictions without background: unlabelled counts as background."""
    gt_root = "memory://evalgt"
    gt = {"a": np.array([[0, 0, 15, 15], [0, 255, 15, 12]], np.uint8), "b": np.array([[8, 8], [0, 0]], np.uint8)}
    for i, m in gt.items():
        storage.write_bytes(f"{gt_root}/SegmentationClass/{i}.png", _png(m))
    storage.write_bytes(f"{gt_root}/ImageSets/Segmentation/val.txt", b"a\nb\n")
    classes = ["person", "cat", "dog"]  # no background
    pred = {"a": np.array([[255, 255, 0, 0], [255, 1, 0, 2]], np.uint8),
            "b": np.array([[1, 1], [255, 1]], np.uint8)}
    write_run("memory://evalpred", "r1", classes, pred, T0)
    assert main(["evaluate", "--predictions", "memory://evalpred", "--ground-truth", gt_root]) == 0
    doc = json.loads(storage.read_bytes("memory://evalpred/evaluation/metrics.json"))
    pc = doc["per_class"]
    assert pc["person"]["iou"] == 1.0 and pc["dog"]["iou"] == 1.0
    assert pc["background"]["tp"] == 4 and pc["background"]["fn"] == 1  # one background pixel called cat
    assert pc["cat"]["iou"] == pytest.approx(2 / 3)
    assert pc["aeroplane"]["iou"] is None and doc["classes_in_mean"] == 4
    assert doc["class_alignment"]["unlabelled_counts_as"] == "background"
    per_class = pq.read_table(io.BytesIO(storage.read_bytes("memory://evalpred/evaluation/per_class.parquet")))
    assert per_class.num_rows == 21


@pytest.mark.slow
def test_nothing_matches_fails_clearly(prefect_harness, val_subset, tmp_path):
    write_run(str(tmp_path), "r", ["grass"], {"elsewhere": np.zeros((2, 2), np.uint8)}, T0)
    state = evaluate_segmentation(predictions=str(tmp_path), ground_truth=val_subset, return_state=True)
    assert state.is_failed() and "no image of split 'val' could be scored" in state.message
    state = evaluate_segmentation(predictions=str(tmp_path), ground_truth=val_subset, split="nope",
                                  return_state=True)
    assert state.is_failed() and "split 'nope' not found" in state.message


@pytest.mark.slow
def test_synthetic_benchmark_scores_itself(prefect_harness, tmp_path):
    """The generator's VOC set against a run built from its own masks: void border, no background class."""
    from weakseg.tasks.synthetic import write_synthetic_dataset

    gt = str(tmp_path / "bench")
    desc = write_synthetic_dataset(gt, n_train=2, n_val=6, seed=3, size=64, void_border=1)
    objects = desc["classes"][1:][::-1]  # the model: no background, another order
    remap = np.full(256, 255, np.uint8)
    for i, name in enumerate(desc["classes"]):
        if name != "background":
            remap[i] = objects.index(name)
    masks = {i: remap[decode_mask(storage.read_bytes(f"{gt}/SegmentationClass/{i}.png"))]
             for i in read_split_ids(gt, "val")}
    write_run(str(tmp_path / "preds"), "synthetic", objects, masks, T0, uri_prefix=f"{gt}/JPEGImages/")
    doc = evaluate_segmentation(predictions=str(tmp_path / "preds"), ground_truth=gt)
    assert doc["mean_iou"] == 1.0 and doc["images"]["scored"] == 6
    assert doc["class_alignment"]["unlabelled_counts_as"] == "background"
