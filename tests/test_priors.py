"""The inference priors (pure numpy) and the proposal generators behind SP-sppxl/bb/seg."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from weakseg.tasks.segment import priors as P
from weakseg.tasks.segment import proposals


def _probs() -> tuple[np.ndarray, np.ndarray]:
    # K = 3 classes over a 2 x 2 image, each pixel a distribution.
    probs = np.array([
        [[0.6, 0.2], [0.1, 0.3]],
        [[0.3, 0.5], [0.1, 0.3]],
        [[0.1, 0.3], [0.8, 0.4]],
    ], dtype=np.float32)
    image_probs = np.array([0.2, 0.7, 0.1])
    return probs, image_probs


def test_ilp_equals_the_formula_on_a_hand_made_example():
    probs, image_probs = _probs()
    out = P.image_level_prior(probs, image_probs)
    for k in range(3):
        for i in range(2):
            for j in range(2):
                assert out[k, i, j] == pytest.approx(probs[k, i, j] * image_probs[k])
    # The image prior flips pixel (0, 0): 0.6*0.2 = 0.12 < 0.3*0.7 = 0.21.
    assert P.argmax_labels(probs)[0, 0] == 0
    assert P.argmax_labels(out)[0, 0] == 1
    assert P.apply_priors(probs, image_probs, ["ilp"]).tolist() == P.argmax_labels(out).tolist()
    with pytest.raises(ValueError):
        P.image_level_prior(probs, image_probs[:2])


def test_superpixel_majority_vote():
    labels = np.array([
        [1, 1, 2, 2],
        [1, 3, 2, 255],
        [0, 0, 0, 255],
    ], dtype=np.uint8)
    segments = np.array([
        [7, 7, 9, 9],
        [7, 7, 9, 9],
        [4, 4, 4, 9],
    ])
    out = P.superpixel_vote(labels, segments)
    assert out.tolist() == [
        [1, 1, 2, 2],
        [1, 1, 2, 2],  # superpixel 9: labels 2, 2, 2, 255, 255 -> 2
        [0, 0, 0, 2],
    ]
    # A tie goes to the smaller label; 255 (unlabelled) can win a superpixel too.
    tie = P.superpixel_vote(np.array([[3, 1]], dtype=np.uint8), np.array([[0, 0]]))
    assert tie.tolist() == [[1, 1]]
    unl = P.superpixel_vote(np.array([[255, 255, 1]], dtype=np.uint8), np.array([[5, 5, 5]]))
    assert unl.tolist() == [[255, 255, 255]]


def test_box_objectness_is_the_mean_score_of_covering_boxes():
    boxes = np.array([[0, 0, 2, 2], [1, 1, 4, 3]])  # x0, y0, x1, y1 (exclusive)
    scores = np.array([0.8, 0.2])
    obj = P.box_objectness(boxes, scores, (3, 4))
    expected = np.array([
        [0.8, 0.8, 0.0, 0.0],
        [0.8, 0.5, 0.2, 0.2],
        [0.0, 0.2, 0.2, 0.2],
    ])
    np.testing.assert_allclose(obj, expected, atol=1e-6)
    # Boxes partly outside the image are clipped; empty ones ignored.
    obj2 = P.box_objectness(np.array([[-5, -5, 1, 1], [2, 2, 2, 3]]), np.array([0.4, 1.0]), (3, 4))
    assert obj2[0, 0] == pytest.approx(0.4) and obj2.sum() == pytest.approx(0.4)


def test_segment_objectness_is_the_mean_score_of_covering_segments():
    level_a = (np.array([[0, 0, 1], [0, 1, 1]]), np.array([0.9, 0.3]))
    level_b = (np.array([[0, 0, 0], [1, 1, 1]]), np.array([0.5, np.nan]))  # NaN: not a proposal
    obj = P.segment_objectness([level_a, level_b], (2, 3))
    np.testing.assert_allclose(obj, [[0.7, 0.7, 0.4], [0.9, 0.3, 0.3]], atol=1e-6)


def test_objectness_thresholds_with_and_without_background():
    probs, image_probs = _probs()
    scores = P.image_level_prior(probs, image_probs)
    obj = np.array([[1.0, 1.0], [0.1, 1.0]])
    delta = np.array([0.05, 0.2, 0.05])
    # (0,0): class 1 score .21*1 > .2 keeps; (0,1): class 1 .35 > .2 keeps;
    # (1,0): class 2 .08*.1 = .008 < .05 -> background; (1,1): class 1 .21 > .2 keeps.
    out = P.objectness_labels(scores, obj, delta, background_index=0)
    assert out.tolist() == [[1, 1], [0, 1]]
    out255 = P.objectness_labels(scores, obj, delta, background_index=None)
    assert out255.tolist() == [[1, 1], [255, 1]]
    stricter = P.objectness_labels(scores, obj, np.array([0.05, 0.3, 0.05]), background_index=None)
    assert stricter.tolist() == [[255, 1], [255, 255]]  # class 1 needs > .3 now
    with pytest.raises(ValueError):
        P.objectness_labels(scores, obj, delta[:2], background_index=0)


def test_apply_priors_chains_the_paper_variants():
    probs, image_probs = _probs()
    obj = np.ones((2, 2), dtype=np.float32)
    segs = np.array([[0, 0], [0, 1]])
    base = P.apply_priors(probs, image_probs, [])
    ilp = P.apply_priors(probs, image_probs, ["ilp"])
    sppxl = P.apply_priors(probs, image_probs, ["ilp", "sppxl"], superpixels=segs)
    assert base.tolist() == [[0, 1], [2, 2]]
    assert ilp.tolist() == [[1, 1], [2, 1]]
    assert sppxl.tolist() == [[1, 1], [1, 1]]
    bb = P.apply_priors(probs, image_probs, ["ilp", "bb"], box_obj=obj,
                        thresholds={"bb": np.full(3, 0.5)}, background_index=None)
    assert bb.tolist() == [[255, 255], [255, 255]]  # nothing beats 0.5
    seg = P.apply_priors(probs, image_probs, ["ilp", "seg"], seg_obj=obj, background_index=0)
    # Default δ = 0.5/K = 1/6: ILP maxima .21, .35, .21 pass, (1, 0) with .08 becomes background.
    assert seg.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="needs"):
        P.apply_priors(probs, image_probs, ["sppxl"])


def test_parse_priors_and_default_thresholds():
    assert P.parse_priors("ilp,sppxl") == ("ilp", "sppxl")
    assert P.parse_priors("sppxl, ilp") == ("ilp", "sppxl")
    assert P.parse_priors("none") == () and P.parse_priors("") == ()
    with pytest.raises(ValueError, match="unknown prior"):
        P.parse_priors("ilp,crf")
    np.testing.assert_allclose(P.default_thresholds(4), [0.125] * 4)


def test_proposals_on_a_photo():
    img = data.astronaut()[::2, ::2]  # 256 x 256
    sp = proposals.superpixels(img)
    assert sp.shape == img.shape[:2] and sp.min() >= 0 and len(np.unique(sp)) > 20
    boxes, scores = proposals.box_proposals(img)
    assert len(boxes) > 20 and boxes.shape[1] == 4
    assert (scores >= 0).all() and (scores <= 1).all()
    assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 2] <= img.shape[1] + 1e-6).all()
    for fn in (proposals.box_objectness_map, proposals.segment_objectness_map):
        obj = fn(img)
        assert obj.shape == img.shape[:2] and obj.dtype == np.float32
        assert obj.min() >= 0 and obj.max() <= 1 and obj.max() > 0
    tiny = proposals.box_objectness_map(np.zeros((3, 5, 3), np.uint8))  # degenerate images still work
    assert tiny.shape == (3, 5)
    assert proposals.segment_objectness_map(np.zeros((1, 1, 3), np.uint8)).shape == (1, 1)


def test_superpixel_mean():
    values = np.array([[1.0, 3.0, 5.0], [2.0, 7.0, 9.0]])
    segments = np.array([[4, 4, 8], [4, 8, 8]])
    out = P.superpixel_mean(values, segments)
    np.testing.assert_allclose(out, [[2.0, 2.0, 7.0], [2.0, 7.0, 7.0]])
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        P.superpixel_mean(values, segments[:1])


def test_sppxl_with_objectness_tests_the_smoothed_labels():
    # Superpixel 0 = the first row, superpixel 1 = the second. ILP argmax per pixel:
    # [[1, 1], [2, 1]]; the second row's vote is a tie, 1 vs 2, which goes to 1.
    probs, image_probs = _probs()
    scores = P.image_level_prior(probs, image_probs)
    segs = np.array([[0, 0], [1, 1]])
    obj = np.array([[1.0, 0.2], [0.0, 1.0]], dtype=np.float32)  # per-superpixel means: 0.6 and 0.5
    delta = np.array([0.05, 0.1, 0.05])
    labels, smoothed = P.objectness_inputs(scores, obj, segs)
    assert labels.tolist() == [[1, 1], [1, 1]]
    np.testing.assert_allclose(smoothed, [[0.6, 0.6], [0.5, 0.5]])
    # Scores of class 1: .21 .35 / .07 .21; times objectness .126 .21 / .035 .105 -> (1, 0) fails δ = .1.
    chained = P.apply_priors(probs, image_probs, ["ilp", "sppxl", "bb"], superpixels=segs, box_obj=obj,
                             thresholds={"bb": delta}, background_index=None)
    assert chained.tolist() == [[1, 1], [255, 1]]
    assert P.objectness_labels(scores, obj, delta, None, segs).tolist() == chained.tolist()
    # Without sppxl the test acts on the raw argmax and the raw map: (0, 1) .35*.2 = .07 fails,
    # (1, 0) is class 2 with .08*0 = 0 < .05.
    paper = P.apply_priors(probs, image_probs, ["ilp", "bb"], box_obj=obj, thresholds={"bb": delta},
                           background_index=None)
    assert paper.tolist() == [[1, 255], [255, 1]]
    # keep_objects works on given labels (any band); unlabelled input stays unlabelled.
    kept = P.keep_objects(scores, np.array([[1, 255], [2, 0]], np.uint8), np.ones((2, 2)), delta, None)
    assert kept.tolist() == [[1, 255], [2, 0]]  # class 2 at (1, 0): .08 > .05; class 0 at (1, 1): .06 > .05
    strict = P.keep_objects(scores, np.array([[1, 255], [2, 0]], np.uint8), np.ones((2, 2)), np.full(3, 0.1), 0)
    assert strict.tolist() == [[1, 0], [0, 0]]  # background index 0 fills the refused pixels


def test_boundary_connectivity_scores_objects_over_stuff():
    # A framed photo-like image: "sky" on top, "grass" below, a red object in the middle.
    img = np.zeros((96, 128, 3), np.uint8)
    img[:48] = (110, 160, 230)
    img[48:] = (60, 150, 60)
    img[40:72, 50:82] = (200, 30, 30)
    layers, shape = proposals.segment_proposals(img, work_side=128)
    assert shape == (96, 128)
    seg, scores = layers[0]
    obj_score = scores[seg[56, 66]]
    assert obj_score > 0.9 > 0.05 > max(scores[seg[5, 5]], scores[seg[90, 5]])
    obj = proposals.segment_objectness_map(img)
    assert obj[56, 66] > 0.5 > obj[5, 5]
    # The same cue for boxes: a box with sides on the border scores lower than an inner one.
    boxes, box_scores = proposals.box_proposals(img, work_side=128)
    inner = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < 128) & (boxes[:, 3] < 96)
    assert box_scores[inner].max() > box_scores[~inner].max()
    assert proposals.box_objectness_map(img)[56, 66] > proposals.box_objectness_map(img)[5, 5]
    np.testing.assert_allclose(proposals.boundary_score(np.array([0, 10, 40]), np.array([100, 100, 100])),
                               np.exp(-0.5 * np.array([0.0, 1.0, 4.0]) ** 2))


def test_chain_helpers():
    probs, image_probs = _probs()
    ilp = P.chain_scores(probs, image_probs, ("ilp", "seg"))
    np.testing.assert_allclose(ilp, P.image_level_prior(probs, image_probs))
    assert P.chain_scores(probs, image_probs, ("sppxl", "bb")) is probs  # no ILP in the chain: the probabilities
    assert P.threshold_prior(("ilp", "sppxl", "seg")) == "seg" and P.threshold_prior(("bb", "seg")) == "bb"
    assert P.has_objectness(("ilp", "bb")) and not P.has_objectness(("ilp", "sppxl"))
    with pytest.raises(ValueError, match="no objectness prior"):
        P.threshold_prior(("ilp",))
