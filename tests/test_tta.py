"""Test-time augmentation: the spec, the plain path unchanged, un-flipping, averaging, sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg.models import ModelConfig, create_model, save_checkpoint
from weakseg.tasks.segment.inference import Prediction, load_model, predict, segment_image, segment_variants
from weakseg.tasks.segment.postprocess import label_image
from weakseg.tasks.segment.tta import (
    DEFAULT_TTA,
    MAX_VIEW_SIDE,
    REFINED_TTA,
    TTA,
    TTAError,
    default_tta,
    parse_tta,
    resolve_tta,
    view_size,
)

CLASSES = ["background", "disk", "square", "stripes"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(num_classes=len(CLASSES), head_widths=(32, 32, 32), output_stride=16)
    model, config = create_model(config, pretrained="none")
    path = tmp_path_factory.mktemp("tta") / "model.pt"
    save_checkpoint(path, model, config, CLASSES, input_size=128)
    return load_model(str(path), "cpu")


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("spec", "scales", "flip"), [
    (None, (1.0,), False), ("", (1.0,), False), ("none", (1.0,), False), ("1", (1.0,), False),
    ("1+flip", (1.0,), True), ("flip", (1.0,), True), ("+flip", (1.0,), True),
    ("1,1.5,2+flip", (1.0, 1.5, 2.0), True), (" 1, 1.5 + FLIP ", (1.0, 1.5), True), ("0.5,1", (0.5, 1.0), False),
])
def test_spec_parses(spec, scales, flip):
    tta = parse_tta(spec)
    assert (tta.scales, tta.flip) == (scales, flip)
    assert tta.plain == (scales == (1.0,) and not flip)
    assert len(tta.views()) == len(scales) * (2 if flip else 1)
    assert parse_tta(str(tta)) == tta and parse_tta(tta) is tta


@pytest.mark.parametrize(("spec", "message"), [
    ("1,a", "'a' is not a scale"), ("1,,2", "'' is not a scale"), ("1+flop", "only 'flip'"),
    ("1+flip+flip", "only 'flip'"), ("0", r"outside \[0.25, 4\]"), ("8", "outside"), ("-1", "outside"),
    ("nan", "outside"), ("inf", "outside"), ("1,1.0", "listed twice"), ("mirror", "not a scale"), (1.5, "string"),
])
def test_spec_errors_say_what_is_wrong(spec, message):
    with pytest.raises(TTAError, match=message):
        parse_tta(spec)
    assert issubclass(TTAError, ValueError)


def test_view_sizes_scale_the_plain_forward_size_within_the_cap():
    assert view_size((213, 320), 1.0, 16) == (213, 320)
    assert view_size((213, 320), 1.5, 16) == (320, 480)
    assert view_size((213, 320), 0.5, 16) == (106, 160)
    assert view_size((213, 320), 0.25, 16) == (64, 80)  # every side keeps 4 cells
    assert view_size((600, 800), 2.0, 16) == (768, MAX_VIEW_SIDE)  # capped: the longer side stops at the limit
    assert view_size((900, 1200), 2.0, 16) == (900, 1200)  # plain already over the cap: scale 1, never smaller


def test_scale_one_without_flip_is_the_plain_path_exactly(bundle):
    images = [_img(70, 90, 1), _img(213, 320, 2), _img(3, 5, 3)]
    plain = predict(bundle, images, max_side=256)
    for tta in (None, "1", "", TTA()):
        same = predict(bundle, images, max_side=256, tta=tta)
        for a, b in zip(plain, same, strict=True):
            assert np.array_equal(a.probs(), b.probs()) and np.array_equal(a.image_probs, b.image_probs)
            assert a.forward_size == b.forward_size and not b.views
    # The averaging machinery over one unflipped view is the identity too.
    one = Prediction.average([plain[1]])
    assert np.array_equal(one.probs(), plain[1].probs()) and np.array_equal(one.image_probs, plain[1].image_probs)
    rgb = images[0]
    assert np.array_equal(segment_image(bundle, rgb, tta="1").labels, segment_image(bundle, rgb).labels)
    variants = ("base", "ilp+sppxl")
    assert all(np.array_equal(a, b) for a, b in zip(segment_variants(bundle, rgb, tta="1", variants=variants).values(),
                                                    segment_variants(bundle, rgb, variants=variants).values(),
                                                    strict=True))


def test_flipped_views_are_mirrored_back(bundle):
    """+flip averages P(x) with mirror(P(mirror(x))), so the result mirrors exactly with its input.

    Averaging P(mirror(x)) without mirroring it back would give mirror(x) and x the *same*
    map, and this test would fail (the random network is far from mirror-symmetric).
    """
    im = _img(70, 90, 4)
    mirrored = np.ascontiguousarray(im[:, ::-1])
    plain, plain_m = predict(bundle, [im, mirrored])
    both = predict(bundle, [im], tta="1+flip")[0]
    expected = (plain.probs() + plain_m.probs()[:, :, ::-1]) / 2
    np.testing.assert_allclose(both.probs(), expected, atol=1e-6)
    assert not np.allclose(plain.probs(), plain_m.probs()[:, :, ::-1], atol=1e-3)  # the test can tell
    other = predict(bundle, [mirrored], tta="1+flip")[0]
    np.testing.assert_allclose(other.probs(), both.probs()[:, :, ::-1], atol=1e-6)
    np.testing.assert_allclose(other.image_probs, both.image_probs, atol=1e-9)
    # Row bands of an averaged, mirrored prediction equal the whole.
    np.testing.assert_allclose(both.probs(20, 41), both.probs()[:, 20:41], atol=1e-6)


def test_image_probs_are_the_mean_of_the_views(bundle):
    im = _img(90, 120, 5)
    pred = predict(bundle, [im], tta="1,1.5+flip")[0]
    assert [(v.forward_size, v.flipped) for v in pred.views] == [
        ((90, 120), False), ((135, 180), False), ((90, 120), True), ((135, 180), True)]
    np.testing.assert_allclose(pred.image_probs, np.mean([v.image_probs for v in pred.views], axis=0))
    assert pred.image_probs.sum() == pytest.approx(1.0)
    assert pred.inference_ms == pytest.approx(sum(v.inference_ms for v in pred.views))
    # The views are each what that view alone gives (a scaled view is the image at that size).
    big = predict(bundle, [im], max_side=180, min_side=180)[0]
    assert big.forward_size == (135, 180)
    np.testing.assert_allclose(pred.views[1].probs(), big.probs(), atol=1e-5)
    np.testing.assert_allclose(pred.views[1].image_probs, big.image_probs, atol=1e-6)


def test_full_resolution_for_odd_sizes_and_mixed_batches(bundle):
    images = [_img(3, 5, 6), _img(77, 131, 7), _img(301, 97, 8), _img(131, 77, 9)]
    alone = [predict(bundle, [im], max_side=128, tta="0.5,1,2+flip")[0] for im in images]
    batched = predict(bundle, images, max_side=128, tta="0.5,1,2+flip")
    for im, a, b in zip(images, alone, batched, strict=True):
        probs = b.probs()
        assert probs.shape == (len(CLASSES), *im.shape[:2]) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        assert len(b.views) == 6 and max(max(v.forward_size) for v in b.views) <= MAX_VIEW_SIDE
        # Batched by forward size: an image's views never share a padded batch with another size.
        np.testing.assert_allclose(b.probs(), a.probs(), atol=1e-5)
    # Views in the spec's order, unflipped first: 0.5x, 1x (the plain (128, 64): 41 px are under 4 cells), 2x of it.
    assert [v.forward_size for v in batched[2].views[:3]] == [(64, 64), (128, 64), (256, 128)]


def test_tta_predictions_work_through_the_chunk_labeller(bundle):
    rgb = _img(120, 160, 10)
    pred = predict(bundle, [rgb], tta="1,1.5+flip")[0]
    labels, _, _ = label_image(bundle, pred, rgb, ("ilp", "sppxl"), bundle.thresholds)
    assert np.array_equal(labels, segment_image(bundle, rgb, ("ilp", "sppxl"), tta="1,1.5+flip").labels)


def _saved(tmp_path, classes, training_state):
    torch.manual_seed(0)
    model, config = create_model(ModelConfig(num_classes=len(classes), head_widths=(32, 32, 32)), pretrained="none")
    path = tmp_path / f"model-{len(classes)}-{bool(training_state)}.pt"
    save_checkpoint(path, model, config, classes, input_size=128, training_state=training_state)
    return load_model(str(path), "cpu")


@pytest.mark.parametrize(("classes", "refined", "views"), [
    (CLASSES, False, DEFAULT_TTA), (CLASSES, True, DEFAULT_TTA),
    (CLASSES[1:], False, DEFAULT_TTA), (CLASSES[1:], True, REFINED_TTA),
])
def test_auto_runs_the_views_chosen_for_the_kind_of_model(tmp_path, classes, refined, views):
    b = _saved(tmp_path, classes, {"refined_from": {"model_id": "0" * 16}} if refined else {})
    assert b.default_tta == views == default_tta(refined=refined, background="background" in classes)
    assert b.resolve_tta(" AUTO ") == views and b.resolve_tta("1+flip") == "1+flip"
    img = _img(70, 90)
    auto = predict(b, [img], max_side=96, tta="auto")[0]
    torch.testing.assert_close(auto.probs(), predict(b, [img], max_side=96, tta=views)[0].probs())
    assert parse_tta(views) != parse_tta("1")  # so the comparison above tells the views apart


def test_auto_cannot_be_parsed_without_a_model():
    with pytest.raises(TTAError, match="resolve it with the model"):
        parse_tta("auto")
    assert resolve_tta("auto", "1,2") == "1,2" and resolve_tta(None, "1,2") is None
