import pytest
import torch

from weakseg.models import MILHead, ModelConfig, create_backbone, create_model

SMALL = {"head_widths": (16, 16, 16), "dropout": 0.5}


def test_head_follows_table_1():
    head = MILHead(320, 21)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [1024, 768, 512, 21]
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs)
    relus = [m for m in head.modules() if isinstance(m, torch.nn.ReLU)]
    drops = [m for m in head.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(relus) == 3 and len(drops) == 3 and all(d.p == 0.5 for d in drops)
    assert head.margin == 4 and head.min_cells == 9


def test_head_shrinks_by_margin_and_refuses_too_small_maps():
    head = MILHead(8, 3, widths=(4, 4, 4))
    assert head(torch.randn(2, 8, 9, 12)).shape == (2, 3, 1, 4)
    with pytest.raises(ValueError, match="9x9 cells"):
        head(torch.randn(1, 8, 8, 20))


@pytest.mark.parametrize("output_stride", [8, 16])
def test_network_shapes_and_geometry(output_stride):
    model, _ = create_model(ModelConfig(num_classes=5, output_stride=output_stride, **SMALL), pretrained="none")
    assert model.stride == output_stride
    x = torch.randn(2, 3, 160, 192)
    maps = model.eval()(x)
    assert maps.shape == (2, 5, 160 // output_stride - 8, 192 // output_stride - 8)
    dense = model.dense_maps(x)
    assert dense.shape == (2, 5, 160 // output_stride, 192 // output_stride)
    assert model.image_scores(maps).shape == (2, 5)
    # the smallest accepted input gives a 1x1 map; one pixel less is refused
    side = model.min_input_size
    assert model(torch.randn(1, 3, side, side)).shape[-2:] == (1, 1)
    with pytest.raises(ValueError, match="unpadded head"):
        model(torch.randn(1, 3, side - output_stride, side))
    # tiny inputs still give a dense map covering them
    assert model.dense_maps(torch.randn(1, 3, 5, 7)).shape[-2:] == (1, 1)
    # dense maps pad the features, not the image: the interior equals the plain maps
    assert torch.equal(model(x, dense=True), dense)
    assert torch.allclose(dense[..., 4:-4, 4:-4], maps, atol=1e-5)


def test_validity_mask_follows_cell_centres():
    model, _ = create_model(ModelConfig(num_classes=2, output_stride=16, **SMALL), pretrained="none")
    valid = torch.zeros(1, 256, 256, dtype=torch.bool)
    valid[:, :, :160] = True  # right part of the batch tensor is padding
    mask = model.map_mask(valid, (8, 8))
    centres = model.cell_centers(8, axis=1)
    assert torch.equal(mask[0, 0], centres < 160)
    maps = torch.randn(1, 2, 8, 8)
    assert torch.allclose(model.image_scores(maps, valid), model.pool(maps[..., : int((centres < 160).sum())]))
    # dense maps (what training and inference use): cell i sits over pixel i * stride + 15
    # (tf_ padding, see test_alignment.py), so the first 10 of 16 columns lie on the 160 valid pixels
    assert model.cell_offset == (15.0, 15.0)
    dense = torch.randn(1, 2, 16, 16)
    assert torch.equal(model.map_mask(valid, (16, 16), dense=True)[0, 0], torch.arange(16) * 16 + 15 < 160)
    assert torch.allclose(model.image_scores(dense, valid, dense=True), model.pool(dense[..., :10]))


def test_frozen_backbone_has_no_grad_and_stays_in_eval():
    model, _ = create_model(ModelConfig(num_classes=3, **SMALL), pretrained="none")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert not model.backbone.body.training
    assert model.head.training
    maps = model(torch.randn(1, 3, 160, 160))
    maps.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())


def test_a_fresh_models_frozen_backbone_keeps_its_statistics():
    """Straight from create_model, before any train()/eval(): a forward pass must not use batch
    statistics in the frozen backbone, nor overwrite its pretrained running ones."""
    model, _ = create_model(ModelConfig(num_classes=3, **SMALL), pretrained="none")
    assert not model.backbone.body.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    with torch.no_grad():
        model(torch.randn(2, 3, 160, 160))
    after = model.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_finetune_from_a_stage(name):
    backbone = create_backbone(name, pretrained="none", finetune_from=3)
    trainable = {n for n, p in backbone.body.named_parameters() if p.requires_grad}
    frozen = {n for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    stem = next(iter(dict(backbone.body.named_parameters())))
    assert stem in frozen  # the stem is before stage 3
    last_stage = backbone.body.feature_info.module_name()[-1].replace(".", "_")
    assert any(n.startswith((last_stage, last_stage.replace("_", "."))) for n in trainable)
    backbone.train()
    bns = [m for m in backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not bns[0].training and bns[-1].training
    everything = create_backbone(name, pretrained="none", finetune_from=0)
    assert all(p.requires_grad for p in everything.body.parameters())
    with pytest.raises(ValueError, match="finetune_from"):
        create_backbone(name, pretrained="none", finetune_from=99)


def test_moving_the_finetune_boundary_of_a_built_backbone():
    """A frozen backbone moved to stage 3 trains what one built with stage 3 trains, and moves back."""
    built = create_backbone("tf_efficientnet_lite0", pretrained="none", finetune_from=3)
    moved = create_backbone("tf_efficientnet_lite0", pretrained="none")
    moved.set_finetune_from(3)
    assert [p.requires_grad for p in moved.body.parameters()] == [p.requires_grad for p in built.body.parameters()]
    moved.train(), built.train()
    assert [m.training for m in moved.body.modules()] == [m.training for m in built.body.modules()]
    moved.set_finetune_from(-2)  # negative: from the last stage back
    assert moved.finetune_from == 3
    assert [p.requires_grad for p in moved.body.parameters()] == [p.requires_grad for p in built.body.parameters()]
    moved.set_finetune_from(None)
    assert moved.fully_frozen and not any(m.training for m in moved.body.modules())
    moved.set_finetune_from(3, freeze_norms=True)
    moved.train()
    norms = [m for m in moved.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(m.training or any(p.requires_grad for p in m.parameters()) for m in norms)
    assert any(p.requires_grad for p in moved.body.parameters())  # the convolutions of stage 3 on still train


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet1888'.*resnet18"):
        create_backbone("resnet1888", pretrained="none")


def test_any_timm_backbone_builds():
    model, cfg = create_model(ModelConfig(num_classes=4, backbone="resnet18", **SMALL), pretrained="none")
    assert cfg.mean and cfg.std
    assert model.eval()(torch.randn(1, 3, 224, 224)).shape[1] == 4


def test_backbone_without_dilation_falls_back_to_native_stride(caplog):
    backbone = create_backbone("efficientvit_b0", pretrained="none", output_stride=16)
    assert backbone.reduction == 32
    assert "native stride" in caplog.text


def test_param_groups_skip_decay_on_biases():
    model, _ = create_model(ModelConfig(num_classes=2, **SMALL), pretrained="none")
    decay, no_decay = model.param_groups()
    assert all(p.dim() > 1 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable
