"""Threshold search for SP-bb / SP-seg on hand-made arrays where the best δ is known, and the file."""
import json

import numpy as np
import pytest

from weakseg.tasks import storage
from weakseg.tasks.evaluate.thresholds import (
    FORMAT,
    ThresholdFit,
    ThresholdSample,
    read_thresholds,
    search_thresholds,
    threshold_sample,
    write_thresholds,
)
from weakseg.tasks.segment import priors

GRID = np.round(np.linspace(0, 1, 101), 2)


def _sample(groups, bg_gt=0):
    """groups: (gt value, label, score, count) -> one 1-row image."""
    gt, label, score = [], [], []
    for g, lab, s, n in groups:
        gt += [g] * n
        label += [lab] * n
        score += [s] * n
    return ThresholdSample(np.array([score]), np.array([label]), np.array([gt], np.uint8))


def test_per_class_thresholds_beat_any_shared_one():
    classes = ("background", "a", "b")
    # a: true pixels at 0.8, false ones at 0.3; b: true at 0.25, false at 0.1. No single δ separates both.
    sample = _sample([(1, 1, 0.8, 10), (0, 1, 0.3, 10), (2, 2, 0.25, 10), (0, 2, 0.1, 10), (0, 0, 0.9, 10),
                      (255, 1, 0.05, 50)])  # void: never counts
    result = search_thresholds([sample], classes, grid=GRID)
    assert result.mean_iou == pytest.approx(1.0)
    assert result.shared_mean_iou < 1.0
    assert 0.3 <= result.thresholds["a"] < 0.8 and 0.1 <= result.thresholds["b"] < 0.25
    assert set(result.thresholds) == {"a", "b"}  # background has no threshold


def test_model_without_background_and_default_grid():
    # the model has no background: below threshold means 255, which counts as the gt's background
    sample = _sample([(1, 0, 0.004, 30), (0, 0, 0.001, 10), (2, 1, 0.02, 10), (0, 1, 0.006, 40)])
    result = search_thresholds([sample, sample], ("a", "b"), gt_classes=("background", "a", "b"))
    assert result.mean_iou == pytest.approx(1.0)
    assert 0.001 <= result.thresholds["a"] < 0.004 and 0.006 <= result.thresholds["b"] < 0.02


def test_noisy_case_prefers_the_better_trade_off():
    # class a: 10 true pixels at 0.5, 2 false at 0.6 (above!), 20 false at 0.2 -> best δ in [0.2, 0.5)
    sample = _sample([(1, 1, 0.5, 10), (0, 1, 0.6, 2), (0, 1, 0.2, 20), (0, 0, 0.9, 30)])
    result = search_thresholds([sample], ("background", "a"), grid=GRID)
    assert 0.2 <= result.thresholds["a"] < 0.5
    assert result.mean_iou == pytest.approx((10 / 12 + 50 / 52) / 2)


def test_threshold_sample_from_score_maps():
    scores = np.array([[[0.1, 0.6]], [[0.3, 0.2]]])  # K=2, 1x2
    sample = threshold_sample(scores, np.array([[0.5, 1.0]]), np.array([[1, 0]], np.uint8))
    assert sample.label.tolist() == [[1, 0]] and sample.score[0].tolist() == pytest.approx([0.15, 0.6])
    with pytest.raises(ValueError, match="do not line up"):
        threshold_sample(scores, np.ones((2, 2)), np.zeros((1, 2), np.uint8))


def test_samples_follow_the_rule_the_priors_apply():
    """For any δ, thresholding a sample gives exactly the labels apply_priors gives, with or without sppxl."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=(12, 16)).transpose(2, 0, 1).astype(np.float32)
    image_probs = rng.dirichlet(np.ones(4))
    obj = rng.random((12, 16)).astype(np.float32)
    segs = np.repeat(np.repeat(np.arange(12).reshape(3, 4), 4, axis=0), 4, axis=1)
    gt = rng.integers(0, 4, (12, 16)).astype(np.uint8)
    scores = priors.image_level_prior(probs, image_probs)
    delta = np.array([0.02, 0.05, 0.08, 0.03])
    for chain, sp in ((("ilp", "bb"), None), (("ilp", "sppxl", "bb"), segs)):
        sample = threshold_sample(scores, obj, gt, sp)
        expected = np.where(sample.score > delta[sample.label], sample.label, 255)
        got = priors.apply_priors(probs, image_probs, chain, superpixels=segs, box_obj=obj,
                                  thresholds={"bb": delta}, background_index=None)
        np.testing.assert_array_equal(got, expected)


def test_one_fit_fed_sample_by_sample_equals_the_search():
    samples = [_sample([(1, 1, 0.5, 10), (0, 1, 0.6, 2)]), _sample([(0, 1, 0.2, 20), (0, 0, 0.9, 30)])]
    fit = ThresholdFit(("background", "a"), grid=GRID)
    for s in samples:
        fit.add(s)
    assert fit.samples == 2
    assert fit.search() == search_thresholds(samples, ("background", "a"), grid=GRID)


def test_bad_samples_are_value_errors():
    with pytest.raises(ValueError, match="no validation samples"):
        search_thresholds([], ("a",))
    with pytest.raises(ValueError, match="labels must index"):
        search_thresholds([_sample([(0, 3, 0.5, 1)])], ("a", "b"))


def test_file_round_trip_and_validation(tmp_path):
    url = "memory://thresholds/bb.json"
    doc = write_thresholds(url, "bb", ["background", "cat", "dog"], {"dog": 0.2, "cat": np.float32(0.125)},
                           search={"mean_iou": 0.5})
    assert list(doc["thresholds"]) == ["cat", "dog"]  # class order
    back = read_thresholds(url)
    assert back == json.loads(storage.read_bytes(url)) and back["format"] == FORMAT and back["format_version"] == 1
    assert back["prior"] == "bb" and back["thresholds"] == {"cat": 0.125, "dog": 0.2}
    with pytest.raises(ValueError, match="prior must be"):
        write_thresholds(url, "box", ["cat"], {})
    with pytest.raises(ValueError, match="not in the class list"):
        write_thresholds(url, "seg", ["cat"], {"dog": 0.1})
    chained = write_thresholds(url, "seg", ["cat"], {"cat": 0.1}, priors=("ilp", "sppxl", "seg"))
    assert read_thresholds(url)["priors"] == chained["priors"] == ["ilp", "sppxl", "seg"]
    with pytest.raises(ValueError, match="prior chain"):
        write_thresholds(url, "seg", ["cat"], {"cat": 0.1}, priors=("ilp", "bb"))
    bad = tmp_path / "bad.json"
    for text, message in [('{"format": "x"}', "not a weakseg thresholds file"),
                          ('{"format": "weakseg.thresholds", "format_version": 2, "prior": "bb"}', "version 2"),
                          ("{", "not JSON")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_thresholds(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        read_thresholds(str(tmp_path / "none.json"))


def test_chain_in_the_file_must_match_its_prior():
    url = "memory://thresholds/chain.json"
    with pytest.raises(ValueError, match="prior chain"):
        write_thresholds(url, "seg", ["cat"], {"cat": 0.1}, priors=("ilp", "bb", "seg"))  # such a chain uses bb's δ
    storage.write_json(url, {"format": FORMAT, "format_version": 1, "prior": "bb", "classes": ["cat"],
                             "thresholds": {"cat": 0.1}, "priors": ["bb", {}]})
    with pytest.raises(ValueError, match="prior chain"):
        read_thresholds(url)
