import io

import pytest
import torch

from weakseg.models import CheckpointError, ModelConfig, create_model, load_checkpoint, save_checkpoint
from weakseg.models.checkpoint import checkpoint_bytes

CLASSES = ["background", "cat", "dog"]


class Foreign:  # a pickled object: weights_only refuses to run its code
    pass


@pytest.fixture
def trained(tmp_path):
    config = ModelConfig(num_classes=3, head_widths=(16, 16, 16), output_stride=16)
    model, config = create_model(config, pretrained="auto")
    with torch.no_grad():  # make the head differ from a fresh initialisation
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, config, CLASSES, input_size=224,
                    manifest={"url": "memory://shards/manifest.json", "sha256": "ab" * 32},
                    metrics={"val_accuracy": 0.75, "history": [{"epoch": 0, "loss": 1.5}]})
    return model.eval(), config, path


def test_round_trip_gives_same_outputs(trained):
    model, config, path = trained
    ckpt = load_checkpoint(path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), ckpt.model(x))
    assert ckpt.classes == CLASSES
    assert ckpt.config == config
    assert ckpt.config.mean == (0.5, 0.5, 0.5)
    assert ckpt.input_size == 224
    assert ckpt.manifest["url"] == "memory://shards/manifest.json"
    assert ckpt.metrics["val_accuracy"] == 0.75
    assert ckpt.weakseg_version and ckpt.created_at
    assert not ckpt.model.training


def test_file_is_plain_weights_only(trained):
    _, config, path = trained
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "weakseg.checkpoint"
    assert raw["config"]["backbone"] == config.backbone
    assert raw["config"]["head_widths"] == [16, 16, 16]
    assert raw["config"]["lse_r"] == 5.0
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file


def test_bytes_and_streams(trained):
    model, config, _ = trained
    blob = checkpoint_bytes(model, config, CLASSES, input_size=224)
    assert load_checkpoint(io.BytesIO(blob)).classes == CLASSES


def test_truncated_file_is_a_clear_error(trained, tmp_path):
    _, _, path = trained
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(cut)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "truncated, corrupt"),
        (b"this is a text file\n", "truncated, corrupt"),
    ],
)
def test_garbage_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_other_torch_files_are_refused(tmp_path, trained):
    model, _, _ = trained
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a weakseg checkpoint"):
        load_checkpoint(bare)

    evil = tmp_path / "evil.pt"
    torch.save({"format": "weakseg.checkpoint", "obj": Foreign()}, evil)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)


def test_missing_and_newer_files(tmp_path, trained):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    _, _, path = trained
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(raw, newer)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(newer)


def test_mismatched_weights_are_refused(tmp_path, trained):
    _, _, path = trained
    raw = torch.load(path, weights_only=True)
    raw["config"]["head_widths"] = [32, 16, 16]
    bad = tmp_path / "mismatch.pt"
    torch.save(raw, bad)
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(bad)


def test_class_count_must_match(trained):
    model, config, _ = trained
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(io.BytesIO(), model, config, ["only-one"], input_size=224)
