"""Evaluation math on hand-made masks, and the readers of VOC ground truth and run tables."""
import math

import numpy as np
import pytest

from weakseg.tasks.evaluate.scoring import (
    UNLABELLED_NAME,
    PredictedMask,
    align_classes,
    confusion_matrix,
    decode_mask,
    latest_run,
    metrics_document,
    read_gt_classes,
    read_split_ids,
    score_image,
    segmentation_metrics,
)
from weakseg.tasks.ingest.label_maps import VOC_CLASSES

ABC = ("a", "b", "c")


def _metrics(gt, pred, gt_classes=ABC, pred_classes=ABC, **kw):
    al = align_classes(gt_classes, pred_classes, **kw)
    return segmentation_metrics(confusion_matrix(np.array(gt, np.uint8), np.array(pred, np.uint8), al), al), al


def test_perfect_prediction_and_void_is_ignored():
    gt = [[0, 0, 1], [2, 255, 255]]
    pred = [[0, 0, 1], [2, 1, 255]]  # anything on void is not scored
    m, _ = _metrics(gt, pred)
    assert m["mean_iou"] == 1.0 and m["pixel_accuracy"] == 1.0 and m["mean_class_accuracy"] == 1.0
    assert m["pixels"] == 4 and m["per_class"]["b"]["pred_pixels"] == 1


def test_hand_computed_iou_accuracy():
    gt = [[0, 0, 0, 0], [1, 1, 1, 1]]
    pred = [[0, 0, 1, 1], [1, 1, 1, 0]]
    m, _ = _metrics(gt, pred)
    a, b = m["per_class"]["a"], m["per_class"]["b"]
    assert (a["tp"], a["fp"], a["fn"]) == (2, 1, 2) and a["iou"] == pytest.approx(2 / 5)
    assert (b["tp"], b["fp"], b["fn"]) == (3, 2, 1) and b["iou"] == pytest.approx(3 / 6)
    assert math.isnan(m["per_class"]["c"]["iou"])  # in neither: NaN, not in the mean
    assert m["mean_iou"] == pytest.approx((2 / 5 + 3 / 6) / 2) and m["classes_in_mean"] == 2
    assert m["pixel_accuracy"] == pytest.approx(5 / 8)
    assert m["mean_class_accuracy"] == pytest.approx((2 / 4 + 3 / 4) / 2)


def test_class_only_in_prediction_counts_with_iou_zero():
    m, _ = _metrics([[0, 0], [0, 0]], [[0, 0], [0, 2]])
    assert m["per_class"]["c"]["iou"] == 0.0 and m["per_class"]["c"]["fp"] == 1
    assert math.isnan(m["per_class"]["c"]["accuracy"])  # no gt pixels: no accuracy
    assert m["mean_iou"] == pytest.approx((3 / 4 + 0) / 2)
    assert m["mean_class_accuracy"] == pytest.approx(3 / 4)


def test_class_only_in_ground_truth_counts_with_iou_zero():
    m, _ = _metrics([[1, 1], [0, 0]], [[0, 0], [0, 0]])
    assert m["per_class"]["b"]["iou"] == 0.0 and m["per_class"]["b"]["accuracy"] == 0.0
    assert m["mean_iou"] == pytest.approx((2 / 4 + 0) / 2)


def test_predicted_unlabelled_is_a_miss_not_a_false_positive():
    m, al = _metrics([[0, 1], [1, 1]], [[255, 1], [255, 1]])
    assert al.columns == (*ABC, UNLABELLED_NAME)
    assert m["per_class"]["a"]["fn"] == 1 and m["per_class"]["a"]["iou"] == 0.0
    assert m["per_class"]["b"]["fn"] == 1 and m["per_class"]["b"]["fp"] == 0
    assert m["per_class"]["b"]["iou"] == pytest.approx(2 / 3)
    assert m["pixel_accuracy"] == pytest.approx(2 / 4)


def test_empty_and_all_void_images():
    al = align_classes(ABC, ABC)
    for gt in (np.zeros((0, 0), np.uint8), np.full((3, 3), 255, np.uint8)):
        conf = confusion_matrix(gt, np.zeros_like(gt), al)
        assert conf.sum() == 0
        m = segmentation_metrics(conf, al)
        assert math.isnan(m["mean_iou"]) and math.isnan(m["pixel_accuracy"]) and m["classes_in_mean"] == 0


def test_classes_align_by_name_and_unknown_predictions_are_wrong():
    gt_classes = ("background", "cat", "dog")
    pred_classes = ("dog", "cat", "person")  # other order, no background, one unknown class
    al = align_classes(gt_classes, pred_classes)
    assert al.columns == ("background", "cat", "dog", "person")
    gt = np.array([[0, 0, 1, 1, 2, 2]], np.uint8)
    pred = np.array([[255, 2, 1, 1, 0, 2]], np.uint8)  # 255 -> background; 2 = person
    conf = confusion_matrix(gt, pred, al)
    assert conf.tolist() == [[1, 0, 0, 1], [0, 2, 0, 0], [0, 0, 1, 1]]
    m = segmentation_metrics(conf, al)
    assert m["per_class"]["background"]["iou"] == pytest.approx(1 / 2)
    assert m["per_class"]["cat"]["iou"] == 1.0 and m["per_class"]["dog"]["iou"] == pytest.approx(1 / 2)
    # without the background rule, unlabelled is its own column and a miss
    al2 = align_classes(gt_classes, pred_classes, unlabelled_as_background=False)
    assert al2.columns[-1] == UNLABELLED_NAME
    assert segmentation_metrics(confusion_matrix(gt, pred, al2), al2)["per_class"]["background"]["iou"] == 0.0


def test_background_matched_by_name_when_both_have_it():
    al = align_classes(("background", "cat"), ("cat", "Background"))
    assert al.lut[0] == 1 and al.lut[1] == 0 and al.columns == ("background", "cat", UNLABELLED_NAME)


def test_bad_inputs_are_value_errors():
    al = align_classes(ABC, ABC)
    with pytest.raises(ValueError, match="2x1 but the ground truth is 1x2"):
        confusion_matrix(np.zeros((2, 1), np.uint8), np.zeros((1, 2), np.uint8), al)
    with pytest.raises(ValueError, match=r"class values \[7\] but the run has 3"):
        confusion_matrix(np.zeros((1, 2), np.uint8), np.array([[0, 7]], np.uint8), al)
    with pytest.raises(ValueError, match=r"ground truth has class values \[9\]"):
        confusion_matrix(np.array([[9, 0]], np.uint8), np.zeros((1, 2), np.uint8), al)
    with pytest.raises(ValueError, match="more than once"):
        align_classes(("a", "A"), ABC)


def _png(arr, mode="P"):
    import io

    from PIL import Image

    img = Image.fromarray(np.asarray(arr, np.uint8), "L")
    if mode == "P":
        img = img.convert("P")  # same indices; palette = grey levels
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_score_image_reports_instead_of_raising():
    al = align_classes(ABC, ABC)
    gt = _png([[0, 1], [2, 255]])
    ok = score_image("x", gt, PredictedMask("x", "k", 2, 2, _png([[0, 1], [2, 0]], "L")), al)
    assert ok.status == "scored" and np.trace(ok.confusion) == 3
    small = score_image("x", gt, PredictedMask("x", "k", 1, 2, _png([[0], [1]])), al)
    assert small.status == "size_mismatch" and "1x2" in small.message and "2x2" in small.message
    lying = score_image("x", gt, PredictedMask("x", "k", 5, 5, _png([[0, 1], [2, 0]])), al)
    assert lying.status == "size_mismatch"
    assert score_image("x", None, PredictedMask("x", "k", 2, 2, gt), al).status == "missing_ground_truth"
    assert score_image("x", gt, PredictedMask("x", "k", 2, 2, b"not a png"), al).status == "invalid"
    bad = score_image("x", gt, PredictedMask("x", "k", 2, 2, _png([[0, 9], [2, 0]])), al)
    assert bad.status == "invalid" and "[9]" in bad.message
    doc = metrics_document([ok, small, lying, bad], al, run_id="r", split="val", predictions="p", ground_truth="g",
                           gt_images=5, match_counts={"run_masks": 4})
    assert doc["images"]["scored"] == 1 and doc["images"]["size_mismatch"] == 2 and doc["images"]["invalid"] == 1
    assert doc["mean_iou"] == 1.0 and doc["per_class"]["a"]["gt_images"] == 1
    assert doc["confusion"]["columns"] == [*ABC, UNLABELLED_NAME]


def test_palette_png_decodes_to_indices(msrc21):
    mask = decode_mask((msrc21 / "SegmentationClass" / "1_4_s.png").read_bytes())
    assert mask.dtype == np.uint8 and mask.shape == (213, 320) and set(np.unique(mask)) <= {1, 255}


def test_voc_reader(msrc21, tmp_path):
    assert read_gt_classes(str(msrc21))[:3] == ("building", "grass", "tree")
    assert read_gt_classes(str(tmp_path)) == VOC_CLASSES and len(VOC_CLASSES) == 21
    ids = read_split_ids(str(msrc21), "val")
    assert len(ids) == 236 and ids[0] == "1_4_s"
    with pytest.raises(ValueError, match=r"split 'test' not found.*train.*val"):
        read_split_ids(str(msrc21), "test")


def test_latest_run_by_end_time():
    runs = [{"run_id": "a", "ended_at": "2026-11-26T10:00:00"}, {"run_id": "b", "ended_at": "2026-11-26T12:00:00"},
            {"run_id": "c", "ended_at": None, "started_at": "2026-11-26T13:00:00"}]
    assert latest_run(runs)["run_id"] == "b"  # c is still running
    assert latest_run(runs[2:])["run_id"] == "c"
    assert latest_run(runs, "c")["run_id"] == "c"
    with pytest.raises(ValueError, match="'zz' not in the runs table"):
        latest_run(runs, "zz")


def test_a_voc_layout_with_png_images_is_read_by_promote_and_thresholds(tmp_path, tiny_checkpoint):
    """JPEGImages/ may hold PNGs (or any image extension); a missing image says what the layout should hold."""
    from PIL import Image

    from weakseg.tasks.evaluate.promotion import score_on_ground_truth
    from weakseg.tasks.evaluate.scoring import read_voc_image, voc_image_url
    from weakseg.tasks.evaluate.variants import fit_thresholds, read_voc, score_variants
    from weakseg.tasks.segment.inference import load_model
    from weakseg.tasks.synthetic import SYNTHETIC_CLASSES, write_synthetic_dataset

    gt = tmp_path / "gt"
    write_synthetic_dataset(str(gt), n_train=3, n_val=3, size=64, classes=SYNTHETIC_CLASSES[:2], max_objects=1)
    for jpg in (gt / "JPEGImages").glob("*.jpg"):
        Image.open(jpg).save(jpg.with_suffix(".PNG"))
        jpg.unlink()
    first = read_split_ids(str(gt), "val")[0]
    assert voc_image_url(str(gt), first) == str(gt / "JPEGImages" / f"{first}.PNG")
    rgb, mask = read_voc(str(gt), first)
    assert rgb.shape[:2] == mask.shape

    (tmp_path / "m.pt").write_bytes(tiny_checkpoint(read_gt_classes(str(gt))))
    bundle = load_model(str(tmp_path / "m.pt"), "cpu")
    assert score_on_ground_truth(bundle, str(gt), "val", max_side=64, tta="1")["images"] == 3  # promote's measure
    seen: list[int] = []
    score_variants(bundle, str(gt), "val", None, ["ilp"], max_side=64, tta="1", progress=seen.append)
    assert seen == [1, 1, 1]  # one progress step an image (promote's bar)
    found = fit_thresholds(bundle, str(gt), read_split_ids(str(gt), "train"), ["ilp+seg"], max_side=64, tta="1")
    assert found["ilp+seg"][1]["skipped"] == 0  # thresholds read every image

    (gt / "JPEGImages" / f"{first}.PNG").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no image of id '{first}' in JPEGImages/ \(a VOC layout holds "
                       rf"JPEGImages/{first}\.jpg, or the same name with another image extension"):
        read_voc_image(str(gt), first)
