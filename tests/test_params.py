import argparse
from typing import Annotated, Literal

import pytest
from pydantic import Field

from weakseg.flows._params import add_flow_arguments, validate_params


def example(
    source: Annotated[str, Field(description="where images are")],
    max_side: Annotated[int, Field(ge=16, description="longest side")] = 512,
    label_map: Literal["identity", "voc"] = "identity",
    head_widths: list[int] = [1024, 768, 512],  # noqa: B006
    resume: bool = False,
    seed: int | None = None,
    stage: int | None = -1,
) -> None: ...


def test_options_mirror_parameters():
    parser = argparse.ArgumentParser()
    add_flow_arguments(parser, example)
    args = parser.parse_args(["--source", "s3://b/x", "--max-side", "64", "--label-map", "voc",
                              "--head-widths", "8,4", "--resume"])
    assert vars(args) == {"source": "s3://b/x", "max_side": 64, "label_map": "voc", "head_widths": [8, 4],
                          "resume": True, "seed": None, "stage": -1}
    assert parser.parse_args(["--source", "x", "--stage", "none"]).stage is None  # an optional number switched off
    assert parser.parse_args(["--source", "x", "--stage", "2", "--seed", "7"]).stage == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--source", "x", "--label-map", "bogus"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --source is required
    with pytest.raises(SystemExit):
        parser.parse_args(["--source", "x", "--stage", "last"])


def test_validation_names_the_option():
    assert validate_params(example, {"source": "x"})["max_side"] == 512
    with pytest.raises(ValueError, match="--max-side: Input should be greater than or equal to 16"):
        validate_params(example, {"source": "x", "max_side": 3})


def test_checks_that_compare_two_parameters_run_in_validation():
    from weakseg.flows.segment_corpus import segment_corpus
    from weakseg.flows.train_mil import train_mil

    with pytest.raises(ValueError, match="min_side 600 is over max_side 512"):
        validate_params(segment_corpus, {"images": "x", "model": "m", "out": "o", "min_side": 600, "max_side": 512})
    with pytest.raises(ValueError, match="--mean and --std"):
        validate_params(train_mil, {"shards": "s", "out": "o", "mean": [0.5, 0.5, 0.5]})


def test_a_flow_takes_its_parameters_from_its_stub():
    """The flow's signature (what Prefect and deployments see) is the stub's, whatever module loads it."""
    import inspect

    from weakseg.flows._params import flow_parameters
    from weakseg.flows.cli import COMMANDS

    for name, command in COMMANDS.items():
        flow, spec = command.load(), command.parameters()
        theirs = [(p.name, repr(p.annotation), p.default) for p in flow_parameters(flow)]
        assert theirs == [(p.name, repr(p.annotation), p.default) for p in flow_parameters(spec)], name
        assert inspect.signature(flow.fn).parameters.keys() == inspect.signature(spec).parameters.keys()


def test_a_flow_that_names_other_parameters_than_its_stub_is_refused_at_import():
    from weakseg.flows._params import with_parameters

    with pytest.raises(TypeError, match=r"names parameters \['source', 'seed'\].*defines \['source', 'max_side'"):
        @with_parameters(example)
        def wrong(source, seed): ...

    @with_parameters(example)
    def right(source, max_side, label_map, head_widths, resume, seed, stage) -> int: ...

    assert right.__defaults__ == (512, "identity", [1024, 768, 512], False, None, -1)
    assert validate_params(right, {"source": "x"})["max_side"] == 512


def test_mirrored_defaults_equal_their_originals():
    """The stubs cannot import the torch modules that define these; each copy must stay equal."""
    from typing import get_args

    from weakseg.flows.params import _shared
    from weakseg.models import losses
    from weakseg.tasks.segment.inference import DEFAULT_MAX_SIDE
    from weakseg.tasks.train.pseudo_labels import PSEUDO_LABEL_TTA
    from weakseg.tasks.train.refine import RefineConfig
    from weakseg.tasks.train.trainer import TrainConfig

    assert _shared.DEFAULT_MAX_SIDE == DEFAULT_MAX_SIDE
    assert _shared.PSEUDO_LABEL_TTA == PSEUDO_LABEL_TTA
    assert get_args(_shared.MultiLabelLoss) == get_args(losses.MultiLabelLoss)
    assert get_args(_shared.BackgroundMode) == get_args(losses.BackgroundMode)
    assert TrainConfig.average_epochs == _shared.TRAIN_AVERAGE_EPOCHS
    assert (_shared.REFINE_LR, tuple(_shared.REFINE_SCALE), _shared.REFINE_SOUP) == (
        RefineConfig.lr, tuple(RefineConfig.scale), RefineConfig.soup)
    assert RefineConfig.backbone_lr_scale == _shared.REFINE_BACKBONE_LR_SCALE
    assert RefineConfig.output_stride == _shared.REFINE_OUTPUT_STRIDE
    assert RefineConfig.checkpoint_every == _shared.REFINE_CHECKPOINT_EVERY


def test_local_inputs_that_do_not_exist_are_found(tmp_path):
    from weakseg.flows._params import missing_inputs
    from weakseg.flows.params.segment_corpus import segment_corpus
    from weakseg.flows.params.train_mil import train_mil

    (tmp_path / "a.jpg").write_bytes(b"x")
    there = {"images": str(tmp_path), "model": str(tmp_path / "a.jpg"), "out": "o"}
    assert missing_inputs(segment_corpus, there) == []
    assert missing_inputs(segment_corpus, {**there, "images": f"{tmp_path}/*.jpg"}) == []
    assert missing_inputs(segment_corpus, {**there, "model": "s3://bucket/m.pt"}) == []  # left to the run
    assert missing_inputs(segment_corpus, {**there, "thresholds": f"file://{tmp_path}/t.json"}) == [
        f"--thresholds: file://{tmp_path}/t.json does not exist"]
    assert missing_inputs(segment_corpus, {**there, "images": f"{tmp_path}/*.png"}) == [
        f"--images: {tmp_path}/*.png matches no file"]
    assert missing_inputs(train_mil, {"shards": str(tmp_path), "pretrained": "auto"}) == []  # a keyword, not a path
    assert missing_inputs(train_mil, {"shards": str(tmp_path), "pretrained": "w.pth"}) == [
        "--pretrained: w.pth does not exist"]
