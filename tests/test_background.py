"""Background learned from image tags alone: a tag of every image, so the maps learn where it is."""
from __future__ import annotations

import pytest
import torch

from weakseg.models.losses import background_index, with_background


def test_background_index_modes() -> None:
    classes = ["background", "cat", "dog"]
    assert background_index(classes, "auto") == 0
    assert background_index(classes, "every-image") == 0
    assert background_index(classes, "as-tagged") is None
    assert background_index(["cat", "dog"], "auto") is None
    with pytest.raises(ValueError, match="needs a class named 'background'"):
        background_index(["cat", "dog"], "every-image")
    with pytest.raises(ValueError, match="background must be one of"):
        background_index(classes, "sometimes")


def test_with_background_sets_the_class_in_every_row() -> None:
    target = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    out = with_background(target, 0)
    assert out[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert out[:, 1:].tolist() == target[:, 1:].tolist()
    assert target[0, 0] == 0.0  # the batch's own tensor is untouched
    assert with_background(target, None) is target


@pytest.mark.slow
def test_background_is_learned_on_synthetic_data(background_run) -> None:
    """Objects on photo backgrounds, tagged with their objects only (like VOC): the trained model labels
    background pixels background — the all-object labelling scores background IoU 0."""
    from weakseg.tasks.evaluate.variants import score_variants
    from weakseg.tasks.segment.inference import load_model

    data, _, model = background_run
    bundle = load_model(model, "cpu")
    assert bundle.checkpoint.config.image_prior == "sigmoid"
    metrics = score_variants(bundle, data, "val", variants=("base",))["base"]
    # Labelling every pixel an object (what the paper's literal labels teach) scores 0 here; a run
    # of this size measured 0.36 in one full-suite run and above 0.5 alone, so the bar is "clearly above 0".
    assert metrics["per_class"]["background"]["iou"] > 0.25, metrics["per_class"]
