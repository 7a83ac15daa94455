"""Device-side post-processing (torch) gives what the numpy path gave: same labels, same statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from samples import image_statistics
from skimage import data

from weakseg.models import ModelConfig, create_model, save_checkpoint
from weakseg.tasks.segment import postprocess
from weakseg.tasks.segment.encode import regions
from weakseg.tasks.segment.inference import compute_prior_inputs, load_model, predict
from weakseg.tasks.segment.postprocess import label_batch
from weakseg.tasks.segment.priors import (
    VARIANTS,
    apply_priors,
    argmax_labels,
    chain_scores,
    keep_objects,
    objectness_prior,
    smooth_for_objectness,
    superpixel_vote,
)

CLASSES = ["background", "disk", "square", "stripes", "sky"]


def _numpy_label_image(pred, inputs, priors, thresholds, k, background_index, band_rows=None):
    """The flow's labelling before it moved to the device (numpy over full-resolution probabilities,
    in row bands), kept here as the reference: ``(labels, prob_sum[256])``."""
    h, w = pred.size
    rows = band_rows or h
    bands = [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]
    labels = np.empty((h, w), dtype=np.uint8)
    prob_sum = np.zeros(256)
    made = objectness_prior(priors, inputs.get("box_obj"), inputs.get("seg_obj"), thresholds, k)
    obj, delta = made if made is not None else (None, None)

    def band_scores(r0, r1):
        p = pred.probs(r0, r1)
        return p, chain_scores(p, pred.image_probs, priors)

    def finish(r0, r1, p, scores, obj):
        if obj is not None:
            labels[r0:r1] = keep_objects(scores, labels[r0:r1], obj[r0:r1], delta, background_index)
        lab = labels[r0:r1].astype(np.int64)
        picked = np.take_along_axis(p, np.minimum(lab, k - 1)[None], axis=0)[0]
        prob_sum[:] += np.bincount(lab.ravel(), weights=picked.ravel(), minlength=256)

    if "sppxl" in priors:
        for r0, r1 in bands:
            labels[r0:r1] = argmax_labels(band_scores(r0, r1)[1])
        if obj is None:
            labels[:] = superpixel_vote(labels, inputs["superpixels"])
        else:
            voted, obj = smooth_for_objectness(labels, obj, inputs["superpixels"])
            labels[:] = voted
        for r0, r1 in bands:
            finish(r0, r1, *band_scores(r0, r1), obj)
    else:
        for r0, r1 in bands:
            p, scores = band_scores(r0, r1)
            labels[r0:r1] = argmax_labels(scores)
            finish(r0, r1, p, scores, obj)
    return labels, prob_sum


def _model(path, classes, seed=0, image_prior="softmax"):
    torch.manual_seed(seed)
    config = ModelConfig(num_classes=len(classes), head_widths=(32, 32, 32), output_stride=16, image_prior=image_prior)
    model, config = create_model(config, pretrained="none")
    save_checkpoint(path, model, config, classes, input_size=128)
    return load_model(str(path), "cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("pp") / "model.pt", CLASSES)


@pytest.fixture(scope="module")
def no_background(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("pp-nobg") / "model.pt", ["cat", "dog", "tree"], seed=3,
                  image_prior="sigmoid")


def _photos():
    """Real photos (scikit-image's samples) cut to odd sizes, two of the same size, and a noise image."""
    rng = np.random.default_rng(0)
    return [data.astronaut()[40:250, 100:397], data.chelsea()[:210, :297], data.coffee()[:123, 7:180],
            data.rocket()[:90, :61], rng.integers(0, 256, (77, 131, 3), dtype=np.uint8)]


def _check(bundle, preds, images, priors, thresholds, band_bytes=64 * 2**20, band_rows=None, from_cells=None):
    k = len(bundle.classes)
    inputs = [compute_prior_inputs(im, priors)[0] for im in images]
    outs = label_batch(preds, inputs, priors, thresholds, k, bundle.background_index, "cpu", band_bytes, from_cells)
    for pred, ins, out in zip(preds, inputs, outs, strict=True):
        want, want_sum = _numpy_label_image(pred, ins, priors, thresholds, k, bundle.background_index, band_rows)
        np.testing.assert_array_equal(out.labels, want, err_msg=",".join(priors))
        np.testing.assert_allclose(out.prob_sum, want_sum, rtol=1e-9, atol=1e-9)
        # The one-shot numpy API (evaluation's) agrees too.
        np.testing.assert_array_equal(
            out.labels, apply_priors(pred.probs(), pred.image_probs, priors, thresholds=thresholds,
                                     background_index=bundle.background_index, **ins))
        got = regions(out.labels.size, out.counts, out.prob_sum, out.boxes, pred.image_probs, bundle.classes)
        ref = image_statistics(want, want_sum, pred.image_probs, bundle.classes)
        assert [r["class_index"] for r in got] == [r["class_index"] for r in ref]
        for a, b in zip(got, ref, strict=True):
            assert {n: v for n, v in a.items() if n != "mean_prob"} == {n: v for n, v in b.items() if n != "mean_prob"}
            assert a["mean_prob"] == pytest.approx(b["mean_prob"], rel=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_chain_matches_the_numpy_path_on_photos(bundle, variant):
    images = _photos()
    images.append(images[1].copy()[:, ::-1])  # same size as another: labelled in one batch with it
    preds = predict(bundle, images, max_side=160)
    thresholds = {"bb": np.linspace(0.01, 0.2, len(CLASSES)), "seg": np.full(len(CLASSES), 0.05)}
    _check(bundle, preds, images, VARIANTS[variant], thresholds)


@pytest.mark.parametrize("priors", [(), ("ilp",), ("ilp", "sppxl"), ("sppxl",)])
def test_chains_without_objectness_from_the_cells_or_upsampling_every_class(bundle, no_background, priors,
                                                                             monkeypatch):
    """On the CPU chains without an objectness test label from the score cells where they agree
    (the vote's changed pixels get their new label's probability); an accelerator upsamples
    every class. Both are the numpy path's labels and sums, with and without TTA. These
    untrained models' maps are noisy enough that the shortcut would step aside (MAX_UNDECIDED):
    here it may not, so the cells' path is what is checked."""
    monkeypatch.setattr(postprocess, "MAX_UNDECIDED", 1.0)
    for model in (bundle, no_background):
        images = _photos()
        for tta in ("1", "0.5,1+flip"):
            preds = predict(model, images, max_side=160, tta=tta)
            for from_cells in (True, False):
                _check(model, preds, images, priors, {}, from_cells=from_cells)


@pytest.mark.parametrize("priors", [("ilp", "sppxl"), ("ilp", "bb"), ("sppxl", "seg"), ("ilp", "sppxl", "bb", "seg")])
def test_no_background_class_unlabelled_and_sigmoid_prior(no_background, priors):
    images = _photos()[:3]
    preds = predict(no_background, images, max_side=128)
    _check(no_background, preds, images, priors, {"bb": np.array([0.2, 0.3, 0.25]), "seg": np.full(3, 0.3)})
    labels = label_batch(preds, [compute_prior_inputs(im, priors)[0] for im in images], priors,
                         {"bb": np.full(3, 0.9), "seg": np.full(3, 0.9)}, 3, None, "cpu")
    if {"bb", "seg"} & set(priors):  # nothing passes δ = 0.9: unlabelled, not a class
        assert all((out.labels == 255).all() and out.counts[255] == out.labels.size for out in labels)


@pytest.mark.parametrize("priors", [("ilp",), ("ilp", "sppxl"), ("ilp", "sppxl", "seg")])
def test_tta_views_and_row_bands_match(bundle, priors):
    images = [*_photos()[:3], _photos()[0].copy()]
    preds = predict(bundle, images, max_side=128, tta="0.5,1+flip")
    _check(bundle, preds, images, priors, {})
    # Bands of 7 rows (and one image per batch): the same as whole images.
    _check(bundle, preds, images, priors, {}, band_bytes=4 * len(CLASSES) * 297 * 7, band_rows=None)


def test_band_size_does_not_change_results(bundle):
    rgb = _photos()[0]
    pred = predict(bundle, [rgb], max_side=128)[0]
    for priors in (("ilp", "bb"), ("ilp", "sppxl", "seg"), ("sppxl",)):
        ins = [compute_prior_inputs(rgb, priors)[0]]
        whole = label_batch([pred], ins, priors, {}, len(CLASSES), 0, "cpu")[0]
        banded = label_batch([pred], ins, priors, {}, len(CLASSES), 0, "cpu", band_bytes=4 * len(CLASSES) * 297 * 5)[0]
        np.testing.assert_array_equal(whole.labels, banded.labels)
        np.testing.assert_array_equal(whole.counts, banded.counts)
        np.testing.assert_array_equal(whole.boxes, banded.boxes)
        np.testing.assert_allclose(whole.prob_sum, banded.prob_sum, rtol=1e-9)


def test_superpixel_ids_need_not_be_dense(bundle):
    rgb = _photos()[3]
    pred = predict(bundle, [rgb])[0]
    sp = compute_prior_inputs(rgb, ("sppxl",))[0]["superpixels"]
    sparse = {"superpixels": sp.astype(np.int64) * 1_000_003 + 17}
    a = label_batch([pred], [{"superpixels": sp}], ("ilp", "sppxl"), {}, len(CLASSES), 0, "cpu")[0]
    b = label_batch([pred], [sparse], ("ilp", "sppxl"), {}, len(CLASSES), 0, "cpu")[0]
    np.testing.assert_array_equal(a.labels, b.labels)


def test_statistics_of_a_hand_made_label_map():
    from weakseg.tasks.segment.postprocess import _label_boxes

    lab = np.full((2, 4, 5), 255, np.uint8)
    lab[0, 1:3, 2:5] = 1
    lab[0, 3, 0] = 0
    lab[1] = 2
    counts, boxes = _label_boxes(torch.from_numpy(lab))
    assert counts[0, 1] == 6 and counts[0, 0] == 1 and counts[0, 255] == 13 and counts[1, 2] == 20
    assert boxes[0, 1].tolist() == [2, 1, 5, 3] and boxes[0, 0].tolist() == [0, 3, 1, 4]
    assert boxes[1, 2].tolist() == [0, 0, 5, 4]


def test_shapes_are_checked(bundle):
    rgb = _photos()[3]
    pred = predict(bundle, [rgb])[0]
    with pytest.raises(ValueError, match="differ in shape"):
        label_batch([pred], [{"superpixels": np.zeros((3, 3), np.int32)}], ("sppxl",), {}, len(CLASSES), 0, "cpu")
    with pytest.raises(ValueError, match="prior inputs"):
        label_batch([pred], [], ("ilp",), {}, len(CLASSES), 0, "cpu")
