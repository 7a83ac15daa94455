"""A tiny overfit run: image-level labels alone teach the maps where the objects are."""
import pytest
from localization import fit_scenes, peak_hits

from weakseg.models import ModelConfig
from weakseg.tasks.synthetic import SYNTHETIC_CLASSES, make_scenes


@pytest.mark.slow
def test_score_maps_peak_inside_the_objects():
    scenes = make_scenes(12, seed=1)
    config = ModelConfig(num_classes=len(SYNTHETIC_CLASSES), head_widths=(128, 128, 128), output_stride=8)
    model, config, losses = fit_scenes(scenes, config, steps=100, lr=1e-3)
    assert losses[-1] < 0.1 * losses[0]
    hits = peak_hits(model, config, scenes)
    assert sum(hits) >= 9, f"peaks inside the object for only {sum(hits)}/{len(hits)} images"
