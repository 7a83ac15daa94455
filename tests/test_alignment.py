"""The cell offset: measured per backbone, stored in checkpoints, used wherever a cell meets a pixel."""
import io

import numpy as np
import pytest
import torch
from torch import nn

from weakseg.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
from weakseg.models.alignment import measure_cell_offset
from weakseg.tasks.segment.inference import upsample_cells

SMALL = {"head_widths": (8, 8, 8), "dropout": 0.0}


def _stack(asymmetric: bool) -> nn.Module:
    """Four 3x3 stride-2 convolutions: padded at the bottom/right only (TF "same"), or on both sides."""
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.ZeroPad2d((0, 1, 0, 1)) if asymmetric else nn.ZeroPad2d(1), nn.Conv2d(3, 3, 3, 2), nn.ReLU()]
    return nn.Sequential(*layers)


def test_probe_finds_the_padding_offset_of_a_known_stack():
    # bottom/right padding: output j covers input 2j..2j+2, centre 2j+1, one input cell per layer: 1+2+4+8
    assert measure_cell_offset(_stack(True), 16) == (15.0, 15.0)
    assert measure_cell_offset(_stack(False), 16) == (0.0, 0.0)
    # the impulse it stands for: a pixel at 16·i + 15 reaches the stack's feature cell i first
    net = _stack(True).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
        x = torch.zeros(1, 3, 128, 128)
        x[..., 16 * 3 + 15, 16 * 5 + 15] = 1.0
        f = net(x)[0, 0]
    assert divmod(int(f.argmax()), f.shape[-1]) == (3, 5)


@pytest.mark.parametrize(("backbone", "stride", "expected"), [
    ("tf_efficientnet_lite0", 16, 15.0), ("tf_efficientnet_lite0", 8, 7.0),
    ("efficientnet_lite0", 16, 0.0), ("resnet18", 16, 0.0),
])
def test_two_backbones_differ_and_the_model_maps_cells_with_its_own(backbone, stride, expected):
    model, config = create_model(ModelConfig(num_classes=2, backbone=backbone, output_stride=stride, **SMALL),
                                 pretrained="none")
    assert config.cell_offset == model.cell_offset == (expected, expected)
    assert torch.equal(model.cell_centers(3, axis=0, dense=True), torch.tensor([0.0, 1, 2]) * stride + expected)
    valid = torch.zeros(1, 8 * stride, 8 * stride, dtype=torch.bool)
    valid[..., : 4 * stride + 1] = True  # columns 0 .. 4·stride
    assert int(model.map_mask(valid, (8, 8), dense=True)[0, 0].sum()) == (4 if expected else 5)


def test_checkpoint_keeps_the_offset_and_an_old_one_is_measured_again():
    model, config = create_model(ModelConfig(num_classes=2, **SMALL), pretrained="none")
    buf = io.BytesIO()
    save_checkpoint(buf, model, config, ["a", "b"], input_size=64)
    assert load_checkpoint(io.BytesIO(buf.getvalue())).model.cell_offset == (15.0, 15.0)
    stored = ModelConfig.from_dict(config.to_dict())
    assert stored == config
    old = {k: v for k, v in config.to_dict().items() if k != "cell_offset"}  # a checkpoint from before the field
    assert ModelConfig.from_dict(old).cell_offset is None
    rebuilt, resolved = create_model(ModelConfig.from_dict(old), pretrained="none")
    assert resolved.cell_offset == rebuilt.cell_offset == (15.0, 15.0)


def test_upsampling_puts_each_cell_value_on_its_centre_pixel():
    cells = torch.zeros(1, 6, 6)
    cells[0, 2, 4] = 1.0  # centred on forward pixel (2·16 + 15, 4·16 + 15) = (47, 79)
    up = upsample_cells(cells, (96, 96), (96, 96), 16, (15.0, 15.0))[0].numpy()
    assert np.unravel_index(up.argmax(), up.shape) == (47, 79)
    assert up[47 - 16, 79] == up[47, 79 - 16] == 0.0
    # the same cells without the offset land 15 px up and left
    plain = upsample_cells(cells, (96, 96), (96, 96), 16)[0].numpy()
    assert np.unravel_index(plain.argmax(), plain.shape) == (32, 64)
