"""choose-thresholds end to end through the CLI: a real model on a synthetic VOC set, a bad image, bad chains."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from samples import latest_artifact

from weakseg.flows._params import flow_parameters
from weakseg.flows.choose_thresholds import choose_thresholds, split_warning
from weakseg.flows.cli import main
from weakseg.models import ModelConfig, create_model, save_checkpoint
from weakseg.tasks import storage
from weakseg.tasks.segment.inference import load_thresholds
from weakseg.tasks.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def voc_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("thresholds")
    gt = str(root / "voc")
    desc = write_synthetic_dataset(gt, n_train=2, n_val=5, seed=4, size=64)
    config = ModelConfig(num_classes=len(desc["classes"]), head_widths=(16, 16, 16), output_stride=8)
    model, config = create_model(config, pretrained="none")
    save_checkpoint(root / "model.pt", model, config, desc["classes"], input_size=64)
    return gt, str(root / "model.pt"), desc["classes"], root


@pytest.mark.slow
def test_choose_thresholds_writes_a_file_segment_reads(prefect_harness, voc_and_model, capsys):
    gt, model, classes, root = voc_and_model
    storage.write_bytes(f"{gt}/JPEGImages/val_000002.jpg", b"not a jpeg")  # skipped, counted, not fatal
    bad_mask = io.BytesIO()
    Image.fromarray(np.full((64, 64), 200, np.uint8), "L").save(bad_mask, format="PNG")  # class 200: unknown
    storage.write_bytes(f"{gt}/SegmentationClass/val_000003.png", bad_mask.getvalue())
    out = str(root / "t-seg.json")
    assert main(["thresholds", "--model", model, "--ground-truth", gt, "--out", out, "--split", "val",
                 "--device", "cpu"]) == 0
    doc = json.loads(storage.read_bytes(out))
    assert doc["search"]["split"] == "val" and "flattered" in doc["search"]["split_warning"]  # the split guard
    assert doc["prior"] == "seg" and doc["priors"] == ["ilp", "sppxl", "seg"] and doc["classes"] == classes
    assert set(doc["thresholds"]) == set(classes) - {"background"}
    assert doc["search"]["images"] == 3 and doc["search"]["skipped"] == 2
    assert set(doc["search"]["skipped_images"]) == {"val_000002", "val_000003"}
    assert "class values up to 200" in doc["search"]["skipped_images"]["val_000003"]
    progress = latest_artifact("choose-thresholds-progress")  # every image of the split passed, skipped ones too
    assert progress.data == 100.0 and "5/5 img done" in progress.description
    assert doc["search"]["mean_iou"] >= doc["search"]["shared_mean_iou"]
    assert doc["search"]["tta"] == "1.25"  # the views of --tta auto for this MIL model, as segment will run them
    prior, vec, chain, views = load_thresholds(out, classes)
    assert prior == "seg" and chain == ("ilp", "sppxl", "seg") and len(vec) == len(classes)
    assert views == "1.25"

    out_bb = str(root / "t-bb.json")
    assert main(["thresholds", "--model", model, "--ground-truth", gt, "--out", out_bb, "--priors", "bb,ilp",
                 "--device", "cpu"]) == 0
    doc_bb = json.loads(storage.read_bytes(out_bb))
    assert doc_bb["priors"] == ["ilp", "bb"]
    assert doc_bb["search"]["split"] == "train" and "split_warning" not in doc_bb["search"]  # train by default

    capsys.readouterr()
    assert main(["thresholds", "--model", model, "--ground-truth", gt, "--out", str(root / "x.json"),
                 "--priors", "ilp,sppxl", "--device", "cpu"]) == 1
    assert "no objectness prior" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a bad option: refused before any flow run
        main(["thresholds", "--model", str(root / "none.pt"), "--ground-truth", gt, "--out", str(root / "x.json"),
              "--device", "cpu"])
    assert exit_info.value.code == 2
    assert f"--model: {root / 'none.pt'} does not exist" in capsys.readouterr().err
    assert not (root / "x.json").exists()


def test_split_guard_warns_only_on_the_evaluated_split():
    assert split_warning("train") is None
    assert "'val'" in split_warning("val")
    assert split_warning("val", eval_split="test") is None
    assert "'dev'" in split_warning("dev", eval_split="dev")
    defaults = {p.name: p.default for p in flow_parameters(choose_thresholds)}
    assert defaults["split"] == "train" and defaults["eval_split"] == "val"
