import numpy as np
import pytest

from weakseg.tasks.synthetic import SYNTHETIC_CLASSES, make_scenes, render_scene


def test_deterministic_for_a_seed():
    a, b, c = make_scenes(4, seed=3), make_scenes(4, seed=3), make_scenes(4, seed=4)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c, strict=True))


def test_masks_match_labels():
    for scene in make_scenes(8, seed=0, objects_per_image=2):
        assert scene.image.shape == (160, 160, 3) and scene.image.dtype == np.uint8
        present = {SYNTHETIC_CLASSES[v - 1] for v in np.unique(scene.mask) if v}
        assert present == set(scene.labels)


def test_unknown_class():
    with pytest.raises(ValueError, match="unknown synthetic class"):
        render_scene(np.random.default_rng(0), ("unicorn",))
