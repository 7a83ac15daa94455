"""The train-mil data path: augmentations, the shard stream, counted errors, fsspec URLs."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.tasks.ingest.manifest import ManifestError, load_manifest, shard_urls
from weakseg.tasks.train.augment import AugmentConfig, EvalTransform, TrainTransform, resolve_crop
from weakseg.tasks.train.shard_reader import (
    Collate,
    Decode,
    ErrorLog,
    eval_pipeline,
    make_loader,
    train_pipeline,
    write_synthetic_shards,
)
from weakseg.tasks.train.trainer import average_precision, checkpoint_name, image_metrics, list_checkpoints, lr_at

CORRUPT = "train_00005"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("shards"))
    write_synthetic_shards(dest, n_train=24, n_val=8, size=64, per_shard=8, corrupt_keys=[CORRUPT])
    return dest


def _image(w=120, h=80):
    return Image.fromarray(np.full((h, w, 3), 200, np.uint8))


def test_train_transform_crops_at_input_size_and_masks_rotation_corners():
    t = TrainTransform(AugmentConfig(input_size=64, rotation=30, scale=(1.0, 1.0)))
    image, valid = t(_image(), random.Random(3))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert valid.shape == (64, 64) and valid.any()
    plain = TrainTransform(AugmentConfig(input_size=64, hflip=False, rotation=0, scale=(1, 1), brightness=0,
                                         contrast=0))
    image, valid = plain(_image(), random.Random(0))
    assert valid.all() and (image == 200).all()  # every augmentation can be switched off


def test_main_process_augmentations_depend_on_their_seed_only():
    """With num_workers=0 the draws are the transform's own: another thread's use of ``random``
    (Prefect's run in the same process) must not change a training with a given seed."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), np.uint8))
    config = AugmentConfig(input_size=64, rotation=20, scale=(0.7, 1.3))
    a, b = TrainTransform(config, seed=5), TrainTransform(config, seed=5)
    first = [a(img)[0] for _ in range(4)]
    second = []
    for _ in range(4):
        random.random()  # someone else draws from the module's generator in between
        second.append(b(img)[0])
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))
    other = TrainTransform(config, seed=6)
    assert not all(np.array_equal(x, other(img)[0]) for x in first)


def test_small_scale_pads_and_marks_padding_invalid():
    t = TrainTransform(AugmentConfig(input_size=64, rotation=0, scale=(0.5, 0.5)))
    _, valid = t(_image(64, 64), random.Random(0))
    assert valid.sum() == 32 * 32


def test_whole_crop_keeps_every_region_of_a_wide_image():
    # Left third red, right third blue: the paper's crop (shorter side to 64, a 64 square of
    # a 96-wide image) always loses part of one end; "whole" keeps both ends, in proportion.
    rgb = np.zeros((80, 120, 3), np.uint8)
    rgb[:, :40, 0] = 255
    rgb[:, 80:, 2] = 255
    img = Image.fromarray(rgb)
    fixed = dict(input_size=64, hflip=False, rotation=0, scale=(1, 1), brightness=0, contrast=0)
    image, valid = TrainTransform(AugmentConfig(**fixed, crop="whole"))(img, random.Random(0))
    assert valid.sum() == 64 * 43 and (valid.sum(0) > 0).all()  # 120x80 -> 64x43, every column
    red = (image[..., 0] > 200) & valid
    blue = (image[..., 2] > 200) & valid
    assert abs(int(red.sum()) - int(blue.sum())) <= 43 and red.sum() > 0.3 * valid.sum()
    lost = 0
    for seed in range(20):
        image, valid = TrainTransform(AugmentConfig(**fixed, crop="random"))(img, random.Random(seed))
        red = ((image[..., 0] > 200) & valid).sum()
        blue = ((image[..., 2] > 200) & valid).sum()
        lost += min(red, blue) < 0.3 * valid.sum()
    assert valid.all() and lost > 0
    with pytest.raises(ValueError):
        AugmentConfig(crop="centre")


def test_auto_crop_keeps_whole_images_for_multilabel_data():
    assert resolve_crop("auto", multilabel=True) == "whole"
    assert resolve_crop("auto", multilabel=False) == "random"
    assert resolve_crop("random", multilabel=True) == "random"
    with pytest.raises(ValueError, match="crop"):
        resolve_crop("centre", multilabel=False)


def test_eval_transform_keeps_aspect_and_pads():
    image, valid = EvalTransform(60)(_image(120, 60))
    assert image.shape == (60, 60, 3) and valid[:30].all() and not valid[30:].any()


def test_bad_augment_config_is_refused():
    with pytest.raises(ValueError):
        AugmentConfig(scale=(1.2, 0.8))


def test_decode_skips_and_counts_bad_samples():
    errors = ErrorLog()
    good = {"__key__": "a", "jpg": _jpeg(), "json": b'{"labels": [1, 2]}'}
    bad_label = {"__key__": "b", "jpg": _jpeg(), "cls": b"9"}
    samples = list(Decode(4, EvalTransform(32), errors)([bad_label, {"__key__": "c", "jpg": b"junk"}, good]))
    assert [s["__key__"] for s in samples] == ["a"]
    assert len(samples[0]["__errors__"]) == 2 and "b" in samples[0]["__errors__"][0]
    batch = Collate(4)(samples)
    assert batch["target"].tolist() == [[0, 1, 1, 0]] and len(batch["errors"]) == 2


def _jpeg():
    import io

    buf = io.BytesIO()
    _image(40, 40).save(buf, format="JPEG")
    return buf.getvalue()


def test_corrupt_sample_in_a_shard_is_skipped_and_counted(shards):
    manifest = load_manifest(shards)
    urls = shard_urls(shards, manifest, "train")
    batches = list(make_loader(eval_pipeline(urls, 4, EvalTransform(64)), 4, batch_size=5))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 23 and CORRUPT not in keys
    errors = [e for b in batches for e in b["errors"]]
    assert len(errors) == 1 and CORRUPT in errors[0] and "train-000000.tar" in errors[0]


def test_worker_processes_split_the_shards_and_carry_error_counts(shards):
    manifest = load_manifest(shards)
    urls = shard_urls(shards, manifest, "train")
    loader = make_loader(eval_pipeline(urls, 4, EvalTransform(64)), 4, batch_size=4, num_workers=2)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 23
    assert sum(len(b["errors"]) for b in batches) == 1
    stream = make_loader(train_pipeline(urls, 4, TrainTransform(AugmentConfig(input_size=64)), shuffle_buffer=8),
                         4, batch_size=4, num_workers=2)
    it = iter(stream)
    first = [next(it) for _ in range(8)]  # endless: more batches than one pass would give
    assert all(b["images"].shape == (4, 3, 64, 64) and b["images"].dtype == torch.uint8 for b in first)
    del it


def test_workers_reading_one_shard_draw_different_orders(tmp_path):
    """A small data set is one shard: every worker resamples it, and each must shuffle it its own way
    (one seed copied into both workers gave them the same order: each image twice in a row)."""
    write_synthetic_shards(str(tmp_path), n_train=16, n_val=4, size=48, per_shard=16)
    urls = shard_urls(str(tmp_path), load_manifest(str(tmp_path)), "train")
    assert len(urls) == 1
    stream = make_loader(train_pipeline(urls, 4, TrainTransform(AugmentConfig(input_size=48)), shuffle_buffer=16),
                         4, batch_size=4, num_workers=2)
    it = iter(stream)
    batches = [next(it)["keys"] for _ in range(8)]  # workers take turns: even batches from one, odd from the other
    del it
    first, second = [k for b in batches[0::2] for k in b], [k for b in batches[1::2] for k in b]
    assert set(first) | set(second) <= {f"train_{i:05d}" for i in range(16)}
    assert first != second


def test_reads_shards_from_memory_url():
    dest = "memory://weakseg-test/shards"
    write_synthetic_shards(dest, n_train=8, n_val=4, size=48, per_shard=4)
    manifest = load_manifest(dest)
    urls = shard_urls(dest, manifest, "train")
    assert urls[0].startswith("memory://")
    it = iter(train_pipeline(urls, 4, TrainTransform(AugmentConfig(input_size=48)), shuffle_buffer=4))
    samples = [next(it) for _ in range(10)]
    assert all(s["image"].shape == (48, 48, 3) for s in samples)
    assert {s["__key__"] for s in samples} <= {f"train_{i:05d}" for i in range(8)}


def test_empty_or_missing_split_is_an_error(shards):
    manifest = load_manifest(shards)
    with pytest.raises(ManifestError, match="no samples"):
        shard_urls(shards, manifest, "test")


def test_metrics():
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    target = torch.tensor([[1.0, 0, 0], [0, 0, 1]])
    m = image_metrics(scores, target, multilabel=True)
    assert m["accuracy"] == 0.5 and m["map"] == pytest.approx((1.0 + 1.0) / 2)
    assert "map" not in image_metrics(scores, target, multilabel=False)


def test_lr_schedule_decays_by_samples_seen():
    assert lr_at(0, 1e-3) == 1e-3
    assert lr_at(4_999_999, 1e-3) == 1e-3
    assert lr_at(10_000_000, 1e-3) == pytest.approx(1e-3 * 0.64)


def test_checkpoint_names_sort_by_step(tmp_path):
    for step in (120, 9, 1000):
        (tmp_path / checkpoint_name(step)).write_bytes(b"x")
    (tmp_path / "model.pt").write_bytes(b"x")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [9, 120, 1000]
    assert list_checkpoints(str(tmp_path / "missing")) == []


def test_a_stream_with_nothing_usable_ends_with_the_reason(shards):
    """Every label out of range: the endless stream raises after the skip bound instead of spinning."""
    from weakseg.tasks.train.shard_reader import NothingUsableError

    urls = shard_urls(shards, load_manifest(shards), "train")
    it = iter(train_pipeline(urls, 0, TrainTransform(AugmentConfig(input_size=32)), shuffle_buffer=4))
    with pytest.raises(NothingUsableError, match=r"0 usable.*label index"):
        next(it)
    errors = ErrorLog(max_skip_fraction=0.5, min_skipped=4)
    for _ in range(6):  # mostly good: never trips
        errors.drain()
        errors(ValueError("bad"))
    with pytest.raises(NothingUsableError):
        for _ in range(8):
            errors(ValueError("bad"))
