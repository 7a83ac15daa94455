"""weakseg export: a run's masks as COCO RLE (decoded by pycocotools) and as a VOC-layout folder."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from samples import latest_artifact

from weakseg.tasks import export, storage
from weakseg.tasks.evaluate.scoring import decode_mask, read_gt_classes, read_split_ids
from weakseg.tasks.segment import tables
from weakseg.tasks.segment.encode import encode_mask

CLASSES = ["background", "cat", "dog", "tree"]


def _scene(seed: int, h: int, w: int, classes: int) -> np.ndarray:
    """A label map with a few rectangles of random classes, some pixels unlabelled (255)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        labels[y : y + rng.integers(2, h - y), x : x + rng.integers(2, w - x)] = rng.integers(1, classes)
    labels[0, :3] = 255
    return labels


def write_run(out: str, run_id: str, classes: list[str], chunks: list[list[np.ndarray]], state: str = "Completed",
              failed_image: bool = True, crashed_chunk: bool = True) -> dict[str, np.ndarray]:
    """A segment-corpus run written with the tables' own writer: ``chunks`` of label maps; per chunk one more
    image whose status is ``error`` (no mask), and a chunk left by a crashed attempt (masks, no images file)."""
    rng = np.random.default_rng(0)
    date = "2026-01-05"
    masks_by_key = {}
    for c, labels_list in enumerate([*chunks, *([[np.zeros((5, 5), np.uint8)]] if crashed_chunk else [])]):
        rows: dict[str, list] = {"images": [], "regions": [], "masks": []}
        for i, labels in enumerate(labels_list):
            key = f"{run_id}k{c}i{i}"
            h, w = labels.shape
            rows["images"].append({"run_id": run_id, "model_id": "m1", "image_key": key, "status": "ok",
                                   "image_uri": f"/data/photos/c{c}/{i}.jpg", "width": w, "height": h})
            rows["masks"].append({"run_id": run_id, "image_key": key, "width": w, "height": h,
                                  "mask_png": encode_mask(labels)})
            for k in sorted(set(np.unique(labels).tolist()) - {255}):
                ys, xs = np.nonzero(labels == k)
                rows["regions"].append({
                    "run_id": run_id, "image_key": key, "class_name": classes[k], "class_index": k,
                    "pixel_count": len(ys), "area_fraction": len(ys) / labels.size,
                    "mean_prob": float(rng.uniform(0.3, 1)), "image_prob": 0.9, "bbox_x0": int(xs.min()),
                    "bbox_y0": int(ys.min()), "bbox_x1": int(xs.max()) + 1, "bbox_y1": int(ys.max()) + 1})
            masks_by_key[key] = labels
        if failed_image:
            rows["images"].append({"run_id": run_id, "image_key": f"{run_id}bad{c}", "status": "error",
                                   "image_uri": f"/data/photos/c{c}/bad.jpg"})
        last = crashed_chunk and c == len(chunks)
        for table in ("regions", "masks", *(() if last else ("images",))):
            tables.write_rows(tables.chunk_file(out, table, date, run_id, c), table, rows[table])
    if crashed_chunk:
        masks_by_key.pop(f"{run_id}k{len(chunks)}i0")
    tables.write_rows(tables.runs_file(out, date, run_id), "runs", [{
        "run_id": run_id, "model_id": "m1", "classes": classes, "priors": "ilp", "state": state}])
    return masks_by_key


@pytest.fixture
def run(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    out = str(tmp_path / "tables")
    chunks = [[_scene(s, 24 + s, 31 - s, len(CLASSES)) for s in range(c * 3, c * 3 + 3)] for c in range(2)]
    return out, write_run(out, "r1", CLASSES, chunks)


def _coco(path: str) -> COCO:
    return COCO(path)


def test_every_coco_rle_decodes_to_the_runs_mask(run, tmp_path):
    out, masks = run
    plan = export.plan_export(out, "r1")
    summary = export.export_coco(out, plan, str(tmp_path / "coco"))
    coco = _coco(str(tmp_path / "coco" / "annotations.json"))  # the reference loader accepts it
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog", "tree"]  # background left out
    images = {im["image_key"]: im for im in coco.dataset["images"]}
    assert set(images) == set(masks)  # status ok only; the crashed attempt's chunk is not exported
    assert summary["images"] == len(masks) and summary["annotations"] == len(coco.dataset["annotations"])
    regions = {(r["image_key"], r["class_name"]): r for r in tables.read_table(out, "regions").to_pylist()}
    seen = 0
    for key, labels in masks.items():
        image = images[key]
        assert (image["width"], image["height"]) == (labels.shape[1], labels.shape[0])
        assert image["file_name"].startswith("/data/photos/")
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        names = [coco.cats[a["category_id"]]["name"] for a in anns]
        assert sorted(names) == sorted(CLASSES[k] for k in set(np.unique(labels).tolist()) - {0, 255})
        for ann, name in zip(anns, names, strict=True):
            k = CLASSES.index(name)
            decoded = mask_utils.decode(ann["segmentation"])
            assert np.array_equal(decoded.astype(bool), labels == k)  # pixel for pixel
            assert np.array_equal(coco.annToMask(ann).astype(bool), labels == k)
            region = regions[(key, name)]
            assert ann["area"] == region["pixel_count"] and ann["iscrowd"] == 0
            assert ann["bbox"] == [region["bbox_x0"], region["bbox_y0"], region["bbox_x1"] - region["bbox_x0"],
                                   region["bbox_y1"] - region["bbox_y0"]]
            assert ann["score"] == pytest.approx(region["mean_prob"], abs=1e-6)
            seen += 1
    assert seen == len(coco.dataset["annotations"]) > 10


def test_classes_min_area_and_images_root(run, tmp_path):
    out, masks = run
    plan = export.plan_export(out, "r1", classes=["Dog", "tree"])
    export.export_coco(out, plan, str(tmp_path / "c"), min_area_fraction=0.2, images_root="/data/photos")
    doc = json.loads((tmp_path / "c" / "annotations.json").read_text())
    assert [c["name"] for c in doc["categories"]] == ["dog", "tree"]
    assert {im["file_name"] for im in doc["images"]} >= {"c0/0.jpg", "c1/2.jpg"}
    regions = tables.read_table(out, "regions").to_pylist()
    expected = sum(r["class_name"] in ("dog", "tree") and r["area_fraction"] >= 0.2 for r in regions)
    assert len(doc["annotations"]) == expected > 0

    export.export_voc(out, plan, str(tmp_path / "v"), min_area_fraction=0.2)
    assert read_gt_classes(str(tmp_path / "v")) == ("background", "dog", "tree")  # re-indexed
    small = {(r["image_key"], r["class_index"]) for r in regions if r["area_fraction"] < 0.2}
    for key, labels in masks.items():
        got = decode_mask((tmp_path / "v" / "SegmentationClass" / f"{key}.png").read_bytes())
        want = np.zeros_like(labels)  # cat and small regions become background
        for k, j in ((2, 1), (3, 2)):
            if (key, k) not in small:
                want[labels == k] = j
        want[labels == 255] = 255
        assert np.array_equal(got, want), key


def test_a_voc_export_is_the_layout_evaluate_reads(run, tmp_path):
    from PIL import Image

    out, masks = run
    summary = export.export_voc(out, export.plan_export(out, "r1"), str(tmp_path / "voc"))
    voc = str(tmp_path / "voc")
    assert read_split_ids(voc, "r1") == list(masks) and summary["images"] == len(masks)
    assert read_gt_classes(voc) == tuple(CLASSES)
    for key, labels in masks.items():
        with Image.open(tmp_path / "voc" / "SegmentationClass" / f"{key}.png") as img:
            assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]  # the VOC colours
            assert np.array_equal(np.asarray(img), labels)


def test_missing_failed_and_unknown_are_refused(tmp_path):
    out = str(tmp_path / "t")
    write_run(out, "ok", CLASSES, [[_scene(0, 20, 20, 4)]])
    write_run(out, "bad", CLASSES, [[_scene(1, 20, 20, 4)]], state="Failed")
    with pytest.raises(ValueError, match=r"run 'nope' not in the runs table"):
        export.plan_export(out, "nope")
    with pytest.raises(ValueError, match=r"ended Failed.*--include-failed"):
        export.plan_export(out, "bad")
    assert export.plan_export(out, "bad", include_failed=True).state == "Failed"
    with pytest.raises(ValueError, match=r"--classes \['horse'\] are not classes of run 'ok'"):
        export.plan_export(out, "ok", classes=["cat", "horse"])
    with pytest.raises(ValueError, match="does not exist"):
        export.plan_export(str(tmp_path / "elsewhere"), "ok")


def test_export_from_and_to_s3(s3, tmp_path):
    out = "s3://weakseg-test/tables"
    masks = write_run(out, "s3run", ["cat", "dog"], [[_scene(s, 18, 22, 2) for s in range(3)]])
    plan = export.plan_export(out, "s3run")
    assert export.export_coco(out, plan, "s3://weakseg-test/coco")["images"] == 3
    doc = json.loads(storage.read_bytes("s3://weakseg-test/coco/annotations.json"))
    key_of = {im["id"]: im["image_key"] for im in doc["images"]}
    for ann in doc["annotations"]:  # no background class: every class is a category, ids 1..N
        k = ann["category_id"] - 1
        assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), masks[key_of[ann["image_id"]]] == k)
    export.export_voc(out, plan, "s3://weakseg-test/voc")
    assert read_split_ids("s3://weakseg-test/voc", "s3run") == list(masks)
    assert not list(Path(tempfile.gettempdir()).glob(".weakseg-export-*"))  # no temporary file left behind


@pytest.mark.slow
def test_cli_export_of_a_real_run_round_trips_and_scores_itself_perfectly(prefect_harness, tmp_path,
                                                                            tiny_checkpoint, capfd):
    """segment (a real run) -> export coco and voc -> every RLE equals mask_png; evaluate of the run against its
    own VOC export gives mean IoU 1.0."""
    from PIL import Image

    from weakseg.flows.cli import main
    from weakseg.tasks.synthetic import SYNTHETIC_CLASSES, make_scenes

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, scene in enumerate(make_scenes(5, seed=1, size=(72, 72))):
        Image.fromarray(scene.image).save(photos / f"p{i}.jpg")
    (tmp_path / "model.pt").write_bytes(tiny_checkpoint(["background", *SYNTHETIC_CLASSES], 2))
    out = str(tmp_path / "tables")
    assert main(["segment", "--images", str(photos), "--model", str(tmp_path / "model.pt"), "--out", out,
                 "--run-id", "real", "--priors", "ilp,sppxl", "--device", "cpu", "--chunk-size", "2",
                 "--max-side", "64", "--tta", "1", "--thumbnails", "0"]) == 0
    coco_dir, voc_dir = tmp_path / "coco", tmp_path / "voc"
    assert main(["export", "--predictions", out, "--run-id", "real", "--format", "coco", "--out", str(coco_dir),
                 "--images-root", str(photos)]) == 0
    assert main(["export", "--predictions", out, "--run-id", "real", "--format", "voc", "--out", str(voc_dir)]) == 0

    coco = _coco(str(coco_dir / "annotations.json"))
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == [f"p{i}.jpg" for i in range(5)]
    masks = {r["image_key"]: decode_mask(r["mask_png"]) for r in tables.read_table(out, "masks").to_pylist()}
    classes = tables.read_table(out, "runs").to_pylist()[0]["classes"]
    assert coco.dataset["annotations"]
    for ann in coco.dataset["annotations"]:
        key = coco.imgs[ann["image_id"]]["image_key"]
        k = classes.index(coco.cats[ann["category_id"]]["name"])
        assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), masks[key] == k)
    for key, labels in masks.items():  # the classes of each image are all there (background left out)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[i for i, im in coco.imgs.items() if im["image_key"] == key]))
        assert {classes.index(coco.cats[a["category_id"]]["name"]) for a in anns} == \
            set(np.unique(labels).tolist()) - {255, classes.index("background")}

    assert main(["evaluate", "--predictions", out, "--ground-truth", str(voc_dir), "--split", "real", "--out",
                 str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["mean_iou"] == 1.0 and metrics["images"]["scored"] == 5
    capfd.readouterr()
    assert main(["export", "--predictions", out, "--run-id", "nope", "--format", "voc", "--out",
                 str(tmp_path / "x")]) == 1
    console = "".join(capfd.readouterr())
    assert "run 'nope' not in the runs table" in console and "Traceback" not in console  # no Prefect traceback

    for key, done in (("segment-corpus-progress", "5/5 img done"), ("export-masks-progress", "5/5 img done"),
                      ("evaluate-segmentation-progress", "5/5 img done")):
        assert latest_artifact(key).data == 100.0 and done in latest_artifact(key).description, key  # complete
