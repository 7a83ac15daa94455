"""The offline ImageNet weights are real, and foreign weights load through one mapping."""
import io

import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data

from weakseg.models import create_backbone
from weakseg.models._pretrained import OFFLINE_WEIGHTS, efficientnet_lite_filter_fn, load_offline_weights

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _chelsea(mean, std) -> torch.Tensor:
    x = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@pytest.mark.parametrize("name", sorted(OFFLINE_WEIGHTS))
def test_offline_classifier_ranks_a_cat_first_on_chelsea(name):
    model = timm.create_model(name, pretrained=False).eval()
    load_offline_weights(model)
    cfg = OFFLINE_WEIGHTS[name]
    with torch.no_grad():
        probs = model(_chelsea(cfg["mean"], cfg["std"])).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in CATS, f"top-1 class {top} is not a cat"
    assert probs[list(CATS)].sum() > 0.5


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_pretrained_auto_uses_the_offline_weights_in_the_dense_backbone(name):
    backbone = create_backbone(name, pretrained="auto")
    full = timm.create_model(name, pretrained=False)
    load_offline_weights(full)
    assert torch.equal(backbone.body.conv_stem.weight, full.conv_stem.weight)
    assert torch.equal(backbone.body.blocks[-1][-1].conv_pwl.weight, full.blocks[-1][-1].conv_pwl.weight)
    assert backbone.mean == (0.5, 0.5, 0.5)
    untrained = create_backbone(name, pretrained="none")
    assert not torch.equal(untrained.body.conv_stem.weight, full.conv_stem.weight)


def test_filter_fn_checks_shapes():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    wrong = {f"k{i}": torch.zeros(1) for i in range(400)}
    with pytest.raises(ValueError, match="do not fit"):
        efficientnet_lite_filter_fn(wrong, model)
    with pytest.raises(ValueError, match="needs"):
        efficientnet_lite_filter_fn({"a": torch.zeros(1)}, model)


def test_pretrained_from_a_state_dict_file(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # a full classifier, wrapped
    backbone = create_backbone("resnet18", pretrained=str(path))
    assert torch.equal(backbone.body.conv1.weight, source.conv1.weight)
    with pytest.raises(FileNotFoundError, match="not found"):
        create_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="none of the tensors"):
        create_backbone("resnet18", pretrained=str(tmp_path / "other.pth"))


def test_timm_pretrained_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when it is imported: without this the test waits on network timeouts
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="pretrained='none' or a path"):
        create_backbone("resnet18", pretrained="auto")


def test_pretrained_weights_from_a_url_are_opened_by_storage(tmp_path):
    from weakseg.tasks import storage

    source = timm.create_model("resnet18", pretrained=False)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    storage.write_bytes("memory://pretrained-test/resnet18.pth", buf.getvalue())
    assert storage.open_weights("none") == "none" and storage.open_weights(str(tmp_path)) == str(tmp_path)
    backbone = create_backbone("resnet18", pretrained=storage.open_weights("memory://pretrained-test/resnet18.pth"))
    assert torch.equal(backbone.body.conv1.weight, source.conv1.weight)
    with pytest.raises(FileNotFoundError, match="not found"):
        storage.open_weights("memory://pretrained-test/missing.pth")
