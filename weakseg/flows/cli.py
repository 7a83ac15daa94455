"""The ``weakseg`` command line: one sub-command per flow.

Options are generated from each flow's parameters (kebab-case here, snake_case in the flow)
and validated before any work starts, from the flow's parameter stub
(:mod:`weakseg.flows.params`) alone: ``--help`` and option errors (bad values, a local input
that does not exist) answer without importing torch, Prefect or the flow, and without
starting a Prefect server. Exit status: 0 when the flow run completed, 1 when it failed (its
message on stderr), 2 for bad options. A ``ValueError`` that weakseg's own code raised is a
refusal whose message says what to fix: the console shows it without the traceback Prefect
logs beside it (the run's logs on the server keep it); any other exception keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from weakseg import __version__
from weakseg.flows._params import add_flow_arguments, missing_inputs, validate_params


def _import(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Command:
    flow_name: str
    help: str
    target: str  # "module:function" of the flow, imported only to run it

    def load(self) -> Callable:
        """The flow (imports torch and Prefect)."""
        return _import(self.target)

    def parameters(self) -> Callable:
        """The flow's parameter stub: same module name under ``weakseg.flows.params`` (light)."""
        module, _, attr = self.target.partition(":")
        return _import(module.replace("weakseg.flows.", "weakseg.flows.params.", 1) + ":" + attr)


COMMANDS: dict[str, Command] = {
    "shard": Command("shard-imagenet", "shard an image collection into WebDataset tars",
                     "weakseg.flows.shard_imagenet:shard_imagenet"),
    "train": Command("train-mil", "train the weakly supervised MIL network from shards",
                     "weakseg.flows.train_mil:train_mil"),
    "refine": Command("refine-mil", "fine-tune a trained model on its own pseudo-labels (the refinement stage)",
                      "weakseg.flows.refine_mil:refine_mil"),
    "segment": Command("segment-corpus", "segment a corpus and write Parquet tables",
                       "weakseg.flows.segment_corpus:segment_corpus"),
    "evaluate": Command("evaluate-segmentation", "score predictions against VOC-layout ground truth",
                        "weakseg.flows.evaluate_segmentation:evaluate_segmentation"),
    "thresholds": Command("choose-thresholds", "choose the SP-bb/SP-seg thresholds on VOC-layout ground truth",
                          "weakseg.flows.choose_thresholds:choose_thresholds"),
    "promote": Command("promote-model", "promote a model to the registry's current release when it is not worse "
                       "(exit 0 promoted, 1 refused)", "weakseg.flows.promote_model:promote_model"),
    "export": Command("export-masks", "export a run's masks as COCO (RLE) or a VOC-layout folder, for annotation "
                      "and training tools", "weakseg.flows.export_masks:export_masks"),
    "cycle": Command("life-cycle", "the whole life cycle: shard, train, refine, thresholds, promote, segment; a rerun "
                     "resumes at the first unfinished step", "weakseg.flows.life_cycle:life_cycle"),
    "demo": Command("demo", "run the whole life cycle on synthetic data, offline", "weakseg.flows.demo:demo"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``only``, the options of that command alone are built
    (what one invocation needs: the other commands' parameter modules are not imported)."""
    parser = argparse.ArgumentParser(
        prog="weakseg",
        description="Weakly supervised semantic segmentation from image-level labels "
        "(Pinheiro & Collobert, CVPR 2015), run as Prefect flows.",
    )
    parser.add_argument("--version", action="version", version=f"weakseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        cmd = sub.add_parser(name, help=f"{command.help} ({command.flow_name})", description=command.help)
        if only is None or only == name:
            add_flow_arguments(cmd, command.parameters())
    return parser


# Prefect gives its embedded server 20 s to start; on a busy 2-core machine that is not enough.
EMBEDDED_STARTUP_SECONDS = 120


def _patient_embedded_server():
    """More time for the embedded API server to start, unless the user set their own."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EMBEDDED_STARTUP_SECONDS})


_PACKAGE = Path(__file__).resolve().parents[1]


def _raised_by_weakseg(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is weakseg's own code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


class RefusalsWithoutTraceback(logging.Filter):
    """Drop the traceback from console records of a refusal (a ValueError weakseg raised)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValueError) and _raised_by_weakseg(exc):
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def _terse_refusals():
    """The filter on the console's (root's) handlers for the flow run, taken off after it."""
    handlers, terse = list(logging.getLogger().handlers), RefusalsWithoutTraceback()
    for handler in handlers:
        handler.addFilter(terse)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(terse)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The embedded Prefect server would phone home at start-up and log an error offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    # the command is the first word that is not an option (weakseg's own options take no value)
    parser = build_parser(only=next((a for a in argv if not a.startswith("-")), ""))
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    spec = command.parameters()
    values = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        params = validate_params(spec, values)
        problems = missing_inputs(spec, params)
        if problems:
            raise ValueError("; ".join(problems))
    except ValueError as err:
        parser.error(f"{args.command}: {err}")
    flow = command.load()
    with _patient_embedded_server(), _terse_refusals():
        state = flow(**params, return_state=True)
    if state.is_failed():
        print(f"weakseg {args.command}: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
