"""Inference for segment-corpus: sizes, padding, the model cache, thresholds, the variants API."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from samples import image_statistics

from weakseg.models import ModelConfig, create_model, save_checkpoint
from weakseg.tasks.segment import batching, inference
from weakseg.tasks.segment.inference import (
    ModelError,
    load_model,
    load_thresholds,
    predict,
    segment_image,
    segment_variants,
)
from weakseg.tasks.segment.inputs import iter_chunks, iter_inputs
from weakseg.tasks.segment.postprocess import label_image
from weakseg.tasks.segment.priors import VARIANTS

CLASSES = ["background", "disk", "square", "stripes"]


def make_checkpoint(path, classes=CLASSES, metrics=None, image_prior="softmax") -> str:
    torch.manual_seed(0)
    config = ModelConfig(num_classes=len(classes), head_widths=(32, 32, 32), output_stride=16,
                         image_prior=image_prior)
    model, config = create_model(config, pretrained="none")
    save_checkpoint(path, model, config, classes, input_size=128, metrics=metrics)
    return str(path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")
    return load_model(path, "cpu")


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predictions_come_back_at_full_size_for_any_size(bundle):
    images = [_img(3, 5), _img(100, 80, 1), _img(700, 300, 2), _img(1, 1, 3)]
    preds = predict(bundle, images, max_side=256)
    for im, p in zip(images, preds, strict=True):
        probs = p.probs()
        assert probs.shape == (4, *im.shape[:2])
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        assert p.image_probs.shape == (4,) and p.image_probs.sum() == pytest.approx(1.0)
        assert max(p.forward_size) <= 256 or min(im.shape[:2]) < 64
        assert min(p.forward_size) >= 4 * bundle.model.stride  # tiny inputs are enlarged, not refused
    assert preds[2].forward_size == (256, 110)  # shrunk to max_side for the forward pass
    up = predict(bundle, images, max_side=256, min_side=200)
    assert [p.forward_size for p in up] == [(120, 200), (200, 160), (256, 110), (200, 200)]
    assert all(p.probs().shape == (4, *im.shape[:2]) for im, p in zip(images, up, strict=True))
    # Row bands equal the whole.
    np.testing.assert_allclose(preds[1].probs(10, 30), preds[1].probs()[:, 10:30], atol=1e-6)


def test_batch_padding_is_excluded_from_the_lse(bundle):
    from weakseg.models import lse_pool
    from weakseg.tasks.tensors import normalize

    small = _img(70, 90, 5)
    alone = predict(bundle, [small])[0]
    # The LSE runs over exactly the cells centred on the image (cell i on pixel 16·i + 15, the
    # backbone's cell offset): ceil((70 - 15)/16) x ceil((90 - 15)/16) ...
    assert bundle.model.cell_offset == (15.0, 15.0)
    assert alone.cells.shape[1:] == (4, 5)
    # ... computed here by hand from the image padded to the stride: padding cells never count.
    x = np.pad(small, ((0, 10), (0, 6), (0, 0)), mode="edge")[None]
    cfg = bundle.checkpoint.config
    with torch.no_grad():
        maps = bundle.model.dense_maps(normalize(torch.from_numpy(x).permute(0, 3, 1, 2), cfg.mean, cfg.std))
    expected = lse_pool(maps[:1, :, :4, :5], cfg.lse_r).double().softmax(-1)[0].numpy()
    np.testing.assert_allclose(alone.image_probs, expected, atol=1e-5)


def test_an_image_predicts_the_same_whatever_it_is_batched_with(bundle):
    """Batches are formed by forward size: a batch-mate of another size never pads an image."""
    small, big, same = _img(70, 90, 5), _img(200, 180, 6), _img(70, 90, 8)
    alone = predict(bundle, [small])[0]
    mixed = predict(bundle, [big, small, same])
    assert [p.size for p in mixed] == [(200, 180), (70, 90), (70, 90)]
    np.testing.assert_allclose(mixed[1].image_probs, alone.image_probs, atol=1e-6)
    np.testing.assert_allclose(mixed[1].probs(), alone.probs(), atol=1e-5)
    np.testing.assert_allclose(mixed[2].probs(), predict(bundle, [same])[0].probs(), atol=1e-5)


def test_sizes_of_one_input_shape_share_a_forward_pass_and_predict_as_alone(bundle):
    """Forward sizes under a stride apart pad to one input shape: one batch, each image the input
    (and the prediction) it is alone, its own cells and forward size."""
    from weakseg.tasks.segment.inference import batch_key, input_shape

    images = [_img(70, 90, 1), _img(80, 90, 2), _img(70, 84, 3), _img(100, 90, 4)]
    assert {input_shape(im.shape[:2], 16) for im in images[:3]} == {(80, 96)}
    assert batch_key(70, 90, 16, 512) == batch_key(75, 84, 16, 512) != batch_key(100, 90, 16, 512)
    batches: list[int] = []
    hook = bundle.model.register_forward_pre_hook(lambda _m, args, _kw: batches.append(args[0].shape[0]),
                                                  with_kwargs=True)
    try:
        together = predict(bundle, images)
    finally:
        hook.remove()
    assert sorted(batches) == [1, 3]  # the three 80x96 inputs in one pass, the 112x96 one alone
    for im, pred in zip(images, together, strict=True):
        alone = predict(bundle, [im])[0]
        assert pred.forward_size == alone.forward_size == im.shape[:2]
        assert pred.cells.shape == alone.cells.shape
        np.testing.assert_allclose(pred.image_probs, alone.image_probs, atol=1e-6)
        np.testing.assert_allclose(pred.probs(), alone.probs(), atol=1e-5)
    assert [p.cells.shape[1:] for p in together[:2]] == [(4, 5), (5, 5)]  # the LSE over each one's own cells


def test_forward_batches_are_the_inputs_predict_runs(bundle):
    """The benchmarks' bare forward times the batches predict builds: one input shape each."""
    from weakseg.tasks.segment.inference import forward_batches

    images = [_img(70, 90, 1), _img(100, 90, 4), _img(80, 90, 2), _img(70, 84, 3)]
    batches = forward_batches(bundle, images, batch_size=2)
    assert [tuple(x.shape) for x in batches] == [(2, 3, 80, 96), (1, 3, 80, 96), (1, 3, 112, 96)]
    with torch.no_grad():
        maps = bundle.model.dense_maps(batches[0])
    cells = predict(bundle, images[:1])[0].cells
    torch.testing.assert_close(maps[0, :, :cells.shape[1], :cells.shape[2]].softmax(0), cells, atol=1e-5, rtol=0)


def test_multilabel_model_gives_presence_probabilities(tmp_path, bundle):
    # Same weights, but trained (as the config says) with a BCE term: p(k|I) = sigmoid(s_k),
    # which the image-level prior and the images table then use.
    presence = load_model(make_checkpoint(tmp_path / "ml.pt", image_prior="sigmoid"), "cpu")
    im = _img(90, 120, 7)
    soft, sig = predict(bundle, [im])[0], predict(presence, [im])[0]
    scores = np.log(soft.image_probs)  # softmax is shift-invariant: recover s up to a constant
    assert sig.image_probs.sum() != pytest.approx(1.0)
    np.testing.assert_allclose(np.argsort(sig.image_probs), np.argsort(scores))
    np.testing.assert_allclose(np.log(sig.image_probs / (1 - sig.image_probs)) - scores,
                               np.full(4, np.log(sig.image_probs[0] / (1 - sig.image_probs[0])) - scores[0]),
                               atol=1e-6)
    np.testing.assert_allclose(sig.probs(), soft.probs())  # pixel probabilities stay a softmax


def test_model_cache_and_clear_errors(tmp_path, bundle):
    path = make_checkpoint(tmp_path / "m.pt")
    assert load_model(path, "cpu") is load_model(path, "cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"), "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"junk\.pt"):
        load_model(str(tmp_path / "junk.pt"), "cpu")
    with pytest.raises(ModelError, match="folder"):
        load_model(str(tmp_path), "cpu")


def test_thresholds_from_file_and_checkpoint(tmp_path):
    doc = {"format": "weakseg.thresholds", "format_version": 1, "prior": "seg", "classes": CLASSES,
           "thresholds": {"background": 0.1, "disk": 0.2, "square": 0.3, "stripes": 0.4}}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    prior, vec, chain, views = load_thresholds(str(tmp_path / "t.json"), CLASSES)
    assert prior == "seg" and vec.tolist() == [0.1, 0.2, 0.3, 0.4] and chain is None and views is None
    (tmp_path / "chain.json").write_text(json.dumps({**doc, "priors": ["ilp", "sppxl", "seg"]}))
    assert load_thresholds(str(tmp_path / "chain.json"), CLASSES)[2] == ("ilp", "sppxl", "seg")
    (tmp_path / "wrong-chain.json").write_text(json.dumps({**doc, "priors": ["ilp", "bb"]}))
    with pytest.raises(ModelError, match="chain"):
        load_thresholds(str(tmp_path / "wrong-chain.json"), CLASSES)
    (tmp_path / "bad.json").write_text(json.dumps({**doc, "classes": ["a", "b", "c", "d"]}))
    with pytest.raises(ModelError, match="classes"):
        load_thresholds(str(tmp_path / "bad.json"), CLASSES)
    with pytest.raises(ModelError, match="does not exist"):
        load_thresholds(str(tmp_path / "nope.json"), CLASSES)
    ckpt = make_checkpoint(tmp_path / "with-t.pt", metrics={"thresholds": {"bb": {"disk": 0.33}}})
    b = load_model(ckpt, "cpu")
    assert b.thresholds_source == "checkpoint"
    assert b.thresholds["bb"].tolist() == [0.125, 0.33, 0.125, 0.125]  # missing classes: the default 0.5/K


def test_segment_image_and_all_variants_from_one_forward_pass(bundle):
    rgb = _img(90, 120, 9)
    pred = predict(bundle, [rgb])[0]
    variants = segment_variants(bundle, rgb, prediction=pred)
    assert set(variants) == set(VARIANTS)
    for labels in variants.values():
        assert labels.shape == (90, 120) and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 255}
    single = segment_image(bundle, rgb, "ilp,sppxl", prediction=pred)
    np.testing.assert_array_equal(single.labels, variants["ilp+sppxl"])
    assert set(single.prior_ms) >= {"sppxl"}
    # The flow's banded labelling gives the same labels as the one-shot API, for every chain.
    for name, chain in VARIANTS.items():
        banded, _, _ = label_image(bundle, pred, rgb, chain, bundle.thresholds)
        np.testing.assert_array_equal(banded, variants[name], err_msg=name)
    labels, prob_sum, _ = label_image(bundle, pred, rgb, ("ilp", "sppxl"), {})
    regions = image_statistics(labels, prob_sum, pred.image_probs, CLASSES)
    assert sum(r["pixel_count"] for r in regions) == 90 * 120
    assert sum(r["area_fraction"] for r in regions) == pytest.approx(1.0)
    for r in regions:
        mask = labels == r["class_index"]
        ys, xs = np.nonzero(mask)
        assert (r["bbox_x0"], r["bbox_y0"], r["bbox_x1"], r["bbox_y1"]) == (xs.min(), ys.min(), xs.max() + 1,
                                                                           ys.max() + 1)
        assert r["mean_prob"] == pytest.approx(pred.probs()[r["class_index"]][mask].mean(), abs=1e-5)


def test_banded_labels_match_for_large_images(bundle, monkeypatch):
    from weakseg.tasks.segment import postprocess

    rgb = _img(300, 200, 4)
    pred = predict(bundle, [rgb])[0]
    for chain in (("ilp", "bb"), ("ilp", "sppxl", "seg")):
        whole = label_image(bundle, pred, rgb, chain, {})
        with monkeypatch.context() as m:
            m.setattr(postprocess, "BAND_BYTES", 4 * 4 * 200 * 7)  # 7-row bands
            banded = label_image(bundle, pred, rgb, chain, {})
        np.testing.assert_array_equal(whole[0], banded[0])
        np.testing.assert_allclose(whole[1], banded[1], rtol=1e-5)
        np.testing.assert_array_equal(whole[0], segment_image(bundle, rgb, chain, prediction=pred).labels)


def test_corpus_listing_kinds(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "c"
    (root / "b" / ".hidden").mkdir(parents=True)
    for name in ("a.JPG", "b/c.png", "b/.hidden/x.jpg", "b/notes.txt", "z.tar"):
        (root / name).write_bytes(b"x")
    kinds = list(iter_inputs(str(root)))
    # Sorted by path, a folder's name sorting as "name/" (the order S3 lists keys in); hidden ones skipped.
    assert kinds == [("image", f"{root}/a.JPG"), ("image", f"{root}/b/c.png"), ("shard", f"{root}/z.tar")]
    assert [u for _, u in iter_inputs(f"{root}/**/*.png")] == [f"{root}/b/c.png"]
    (tmp_path / "list.txt").write_text("# comment\nc/a.JPG\n\n/abs/x.jpg\nmemory://m/y.jpg\n")
    assert [u for _, u in iter_inputs(str(tmp_path / "list.txt"))] == [f"{tmp_path}/c/a.JPG", "/abs/x.jpg",
                                                                        "memory://m/y.jpg"]
    pq.write_table(pa.table({"image_uri": [f"{root}/a.JPG", "c/b/c.png"]}), tmp_path / "m.parquet")
    assert [u for _, u in iter_inputs(str(tmp_path / "m.parquet"))] == [f"{root}/a.JPG", f"{tmp_path}/c/b/c.png"]
    chunks = list(iter_chunks(str(root), 1))
    assert [(c.index, c.uris, c.shard) for c in chunks] == [
        (0, (f"{root}/a.JPG",), None), (1, (f"{root}/b/c.png",), None), (2, (), f"{root}/z.tar")]
    assert [u for _, u in iter_inputs("memory://nothing/s-{000..002}.tar")] == [
        "memory://nothing/s-000.tar", "memory://nothing/s-001.tar", "memory://nothing/s-002.tar"]
    from weakseg.tasks.ingest.sources import SourceError

    with pytest.raises(SourceError, match="does not exist"):
        list(iter_inputs(str(tmp_path / "missing")))


def test_inference_module_documents_its_defaults():
    assert inference.DEFAULT_MAX_SIDE == 512 and batching.MIN_CELLS == 4


def test_reads_retry_once_then_become_error_records(monkeypatch):
    from weakseg.tasks.segment import read as read_module
    from weakseg.tasks.segment.inputs import ChunkSpec
    from weakseg.tasks.segment.read import TransientInputError, read_chunk

    calls: dict[str, int] = {}

    def read(uri, max_bytes):
        name = uri.rsplit("/", 1)[-1]
        calls[name] = calls.get(name, 0) + 1
        if name == "flaky" and calls[name] == 1:
            raise OSError("connection reset")
        if name == "broken":
            raise OSError("still broken")
        if name == "gone":
            raise FileNotFoundError(uri)
        if name == "throttled":
            raise OSError("An error occurred (SlowDown) when calling the GetObject operation")
        return b"data"

    monkeypatch.setattr(read_module, "_read_bounded", read)
    records = {r.uri.rsplit("/", 1)[-1]: r for r in read_chunk(ChunkSpec(0, ("/d/ok", "/d/flaky", "/d/broken",
                                                                             "/d/gone")))}
    assert records["ok"].data == b"data" and records["flaky"].data == b"data"
    assert isinstance(records["broken"].error, OSError) and calls["broken"] == 2
    assert isinstance(records["gone"].error, FileNotFoundError) and calls["gone"] == 1  # no retry for a vanished file
    with pytest.raises(TransientInputError):  # throttled twice: the whole chunk is retried, no error row
        list(read_chunk(ChunkSpec(0, ("/d/throttled",))))
    assert calls["throttled"] == 2


def test_batch_padded_to_a_power_of_two_predicts_the_same(tmp_path, tiny_checkpoint):
    """Accelerators fill a batch up to a power of two (cuDNN plans are per shape); the padding's
    outputs are dropped and the real images' predictions are what they are unpadded."""
    from skimage import data

    from weakseg.tasks.segment.forward import _forward
    from weakseg.tasks.segment.inference import load_model

    path = tmp_path / "model.pt"
    path.write_bytes(tiny_checkpoint(["background", "disk", "square"], 0))
    bundle = load_model(str(path), "cpu")
    photo = data.astronaut()
    images = [np.ascontiguousarray(photo[10 * i:10 * i + 96, 7 * i:7 * i + 128]) for i in range(3)]
    with torch.no_grad():
        plain = _forward(bundle, images, [(96, 128)] * 3)
        padded = _forward(bundle, images, [(96, 128)] * 3, pad_batch=True)  # 3 -> 4
    assert len(padded) == 3
    for a, b in zip(plain, padded, strict=True):
        torch.testing.assert_close(a.cells, b.cells, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(a.image_probs, b.image_probs, atol=1e-6)
