"""The ``weakseg`` command line: one sub-command per flow.

Options are generated from each flow's signature (kebab-case here, snake_case in the flow)
and validated before any work starts. Sub-commands whose flow has not landed yet say so
and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import __version__
from ._params import add_flow_arguments, validate_params


@dataclass(frozen=True)
class Command:
    flow_name: str
    help: str
    target: str | None  # "module:function" of the flow, None while pending
    issue: int | None = None  # the issue that brings a pending flow

    def load(self) -> Callable | None:
        if self.target is None:
            return None
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


COMMANDS: dict[str, Command] = {
    "shard": Command("shard-imagenet", "shard an image collection into WebDataset tars",
                     "weakseg.flows.shard_imagenet:shard_imagenet", 3),
    "train": Command("train-mil", "train the weakly supervised MIL network from shards", "weakseg.flows.train_mil:train_mil", 4),  # noqa: E501
    "segment": Command("segment-corpus", "segment a corpus and write Parquet tables",
                       "weakseg.flows.segment_corpus:segment_corpus", 5),
    "evaluate": Command("evaluate-segmentation", "score predictions against VOC-layout ground truth",
                        "weakseg.flows.evaluate_segmentation:evaluate_segmentation", 6),
    "demo": Command("demo", "run the main job end to end on embedded defaults", None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weakseg",
        description="Weakly supervised semantic segmentation from image-level labels "
        "(Pinheiro & Collobert, CVPR 2015), run as Prefect flows.",
    )
    parser.add_argument("--version", action="version", version=f"weakseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        cmd = sub.add_parser(name, help=f"{command.help} ({command.flow_name})", description=command.help)
        flow = command.load()
        if flow is not None:
            add_flow_arguments(cmd, flow)
        elif name == "demo":
            cmd.add_argument("--workdir", default="demo-output", help="where everything is written")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The embedded Prefect server would phone home at start-up and log an error offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    flow = command.load()
    if command.issue is not None and flow is None:
        print(f"weakseg {args.command}: the {command.flow_name} flow is not built yet "
              f"(it lands with issue #{command.issue}).", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    values = {k: v for k, v in vars(args).items() if k != "command"}
    if flow is None:  # the model demo, until the pipeline demo lands
        from .model_demo import run_model_demo

        print("weakseg demo: the full pipeline demo lands with issue #6; running the model demo "
              "(train the MIL head on synthetic scenes, check where the score maps peak).", file=sys.stderr)
        run_model_demo(values["workdir"])
        return 0
    try:
        params = validate_params(flow, values)
    except ValueError as err:
        parser.error(f"{args.command}: {err}")
    state = flow(**params, return_state=True)
    if state.is_failed():
        print(f"weakseg {args.command}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
