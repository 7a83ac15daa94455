import logging

import torch
from torch import nn

from weakseg.models import ModelConfig, create_model, load_checkpoint
from weakseg.models.fusion import fold_batchnorm, folded_for_inference
from weakseg.tasks.segment.inference import load_model


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _trained_looking(seed: int = 0) -> nn.Module:
    """lite0 with a small head, its BatchNorms given statistics and affines far from the identity."""
    torch.manual_seed(seed)
    model, _ = create_model(ModelConfig(num_classes=4, head_widths=(16, 16, 16), output_stride=16), pretrained="none")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_folding_keeps_the_dense_maps_and_removes_every_batchnorm():
    model = _trained_looking()
    before = _norms(model)
    folded = folded_for_inference(model)
    assert folded is not model and before > 40 and _norms(folded) == 0
    assert _norms(model) == before  # the checkpoint's model is left as it was
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        want, got = model.dense_maps(x), folded.dense_maps(x)
    assert torch.allclose(want, got, atol=1e-5, rtol=1e-4)


def test_a_norm_that_does_not_follow_its_convolution_in_the_forward_is_served_unfolded(caplog):
    class PreNorm(nn.Module):  # registered conv-then-norm, but the norm runs first
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.norm = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.norm(x))

    torch.manual_seed(0)
    model = PreNorm().eval()
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.2, 3.0)
    assert fold_batchnorm(PreNorm().eval()) == 1  # the pairing alone would fold it
    with caplog.at_level(logging.WARNING, logger="weakseg.models.fusion"):
        assert folded_for_inference(model) is model
    assert "serving the model unfolded" in caplog.text


def test_load_model_serves_a_folded_model_with_the_same_predictions(tmp_path, tiny_checkpoint):
    path = tmp_path / "model.pt"
    path.write_bytes(tiny_checkpoint(["a", "b", "c"]))
    bundle = load_model(str(path), "cpu")
    assert _norms(bundle.model) == 0
    unfolded = load_checkpoint(str(path)).model
    assert _norms(unfolded) > 40
    x = torch.randn(1, 3, 80, 112)
    with torch.no_grad():
        assert torch.allclose(unfolded.eval().dense_maps(x), bundle.model.dense_maps(x), atol=1e-5, rtol=1e-4)
