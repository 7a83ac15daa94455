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
