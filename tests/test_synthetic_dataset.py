"""The synthetic benchmark: deterministic, masks agree with labels, readable by shard and evaluate."""
import io

import fsspec
import numpy as np
import pytest
from PIL import Image

from weakseg.tasks import storage
from weakseg.tasks.evaluate.scoring import decode_mask, read_gt_classes, read_split_ids
from weakseg.tasks.ingest.sources import list_source
from weakseg.tasks.synthetic import BENCHMARK_CLASSES, SYNTHETIC_CLASSES, write_synthetic_dataset


def _files(url):
    fs, root = storage.url_to_fs(url)
    return {p[len(root):]: fs.cat_file(p) for p in fs.find(root)}


def test_deterministic_for_a_seed_and_stable_prefix():
    a = write_synthetic_dataset("memory://syn-a", n_train=6, n_val=3, seed=5, size=64)
    b = write_synthetic_dataset("memory://syn-b", n_train=6, n_val=3, seed=5, size=64)
    c = write_synthetic_dataset("memory://syn-c", n_train=6, n_val=3, seed=6, size=64)
    more = write_synthetic_dataset("memory://syn-d", n_train=8, n_val=3, seed=5, size=64)
    fa, fb, fc, fd = (_files(f"memory://syn-{x}") for x in "abcd")
    assert a == b and fa == fb
    assert a != c and fa["/JPEGImages/val_000000.jpg"] != fc["/JPEGImages/val_000000.jpg"]
    assert more["images"]["train"] == 8
    assert all(fd[k] == v for k, v in fa.items() if k.startswith(("/JPEGImages", "/SegmentationClass")))


def test_voc_part_masks_agree_with_labels():
    url = "memory://syn-voc"
    desc = write_synthetic_dataset(url, n_train=10, n_val=8, seed=1, size=(72, 96), max_objects=3,
                                   background_fraction=0.3, void_border=1)
    classes = read_gt_classes(url)
    assert classes == ("background", *BENCHMARK_CLASSES) and desc["classes"] == list(classes)
    assert set(SYNTHETIC_CLASSES) < set(BENCHMARK_CLASSES) and len(BENCHMARK_CLASSES) == 8
    rows = {r.split(",")[0]: r.split(",")[1].split(";")
            for r in storage.read_bytes(f"{url}/labels.csv").decode().split()[1:]}
    for split, n in (("train", 10), ("val", 8)):
        ids = read_split_ids(url, split)
        assert len(ids) == n
        for image_id in ids:
            mask = decode_mask(storage.read_bytes(f"{url}/SegmentationClass/{image_id}.png"))
            with Image.open(io.BytesIO(storage.read_bytes(f"{url}/JPEGImages/{image_id}.jpg"))) as img:
                assert img.size == (96, 72) and img.mode == "RGB"
            assert mask.shape == (72, 96)
            present = {classes[v] for v in np.unique(mask) if v not in (0, 255)}
            labels = set(rows[f"JPEGImages/{image_id}.jpg"])
            assert present == (labels - {"background"})
            assert labels != {"background"} or split == "train"
            if present:
                assert (mask == 255).any()  # the void band around objects
    assert desc["label_counts"]["train"]["background"] >= 1


def test_csv_and_imagefolder_are_shard_sources():
    url = "memory://syn-shard"
    write_synthetic_dataset(url, n_train=8, n_val=4, seed=0, size=48, max_objects=1, train_layout="imagefolder")
    items, layout = list_source(f"{url}/labels.csv")
    assert layout == "manifest" and len(items) == 12
    assert {i.split for i in items} == {"train", "val"} and all(len(i.labels) == 1 for i in items)
    items, layout = list_source(f"{url}/train")
    assert layout == "imagefolder" and len(items) == 8
    assert all(storage.exists(i.uri) for i in items)
    with pytest.raises(ValueError, match="one label per image"):
        write_synthetic_dataset("memory://syn-bad", n_train=1, n_val=1, max_objects=2, train_layout="imagefolder")
    with pytest.raises(ValueError, match="unknown synthetic classes"):
        write_synthetic_dataset("memory://syn-bad", n_train=1, n_val=1, classes=("unicorn",))
    fsspec.filesystem("memory").rm("/syn-shard", recursive=True)
