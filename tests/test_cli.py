import subprocess
import sys

import pytest

from weakseg.flows.cli import COMMANDS, main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "weakseg.flows.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("shard", "train", "refine", "segment", "evaluate", "thresholds", "promote", "demo"):
        assert name in out


# The options DESIGN.md fixes for each sub-command.
DESIGN_OPTIONS = {
    "shard": ["--source", "--dest", "--label-map", "--max-side", "--val-fraction", "--seed"],
    "train": ["--shards", "--out", "--backbone", "--pretrained", "--epochs", "--batch-size", "--lr", "--lse-r",
              "--input-size", "--head-widths", "--device", "--resume", "--registry"],
    "segment": ["--images", "--model", "--out", "--priors", "--batch-size", "--run-id", "--skip-existing",
                "--task-runner"],
    "evaluate": ["--predictions", "--ground-truth", "--split", "--out"],
    "refine": ["--shards", "--model", "--out", "--priors", "--epochs", "--device", "--registry"],
    "promote": ["--model", "--registry", "--ground-truth", "--split", "--tolerance", "--force"],
    "demo": ["--workdir"],
}


@pytest.mark.parametrize("name", sorted(DESIGN_OPTIONS))
def test_every_command_has_the_design_options(name, capsys):
    assert COMMANDS[name].load().name == COMMANDS[name].flow_name
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in DESIGN_OPTIONS[name]:
        assert option in out, f"weakseg {name} lacks {option}"


def test_unknown_options_of_built_commands_are_refused():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--bogus"])
    assert exc.value.code == 2


@pytest.mark.parametrize("name", ["segment", "thresholds", "refine"])
def test_a_bad_tta_spec_is_refused_before_any_flow_run(name, tmp_path, capsys):
    required = {"segment": ["--images", str(tmp_path), "--model", "m.pt", "--out", str(tmp_path)],
                "thresholds": ["--model", "m.pt", "--ground-truth", str(tmp_path), "--out", "t.json"],
                "refine": ["--shards", str(tmp_path), "--model", "m.pt", "--out", str(tmp_path)]}[name]
    with pytest.raises(SystemExit) as exc:
        main([name, *required, "--tta", "1,9+flip"])
    assert exc.value.code == 2
    assert "--tta" in capsys.readouterr().err


# What runs in a fresh interpreter: the exit status, stderr's last line, and whether torch or Prefect got imported.
_PROBE = """
import sys
from weakseg.flows.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    print(exit.code, "torch" in sys.modules, "prefect" in sys.modules)
"""


@pytest.mark.parametrize("args", [["--help"], ["segment", "--help"], ["cycle", "--help"], ["export", "--help"],
                                  ["train", "--shards", ".", "--out", "o", "--epochs", "0"],
                                  ["cycle", "--source", ".", "--registry", "r", "--images", ".", "--out", "o",
                                   "--train-options", '{"epoch": 1}']])
def test_help_and_option_errors_import_neither_torch_nor_prefect(args):
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ["0" if "--help" in args else "2", "False", "False"], out.stderr[-2000:]


def test_a_local_input_that_does_not_exist_is_refused_before_any_server_starts(tmp_path):
    missing = tmp_path / "nowhere"
    out = subprocess.run([sys.executable, "-c", _PROBE, "segment", "--images", str(tmp_path), "--model",
                          str(missing / "model.pt"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ["2", "False", "False"]
    assert f"--model: {missing}/model.pt does not exist" in out.stderr
    assert not (tmp_path / "out").exists()


def test_the_console_shows_a_refusal_without_its_traceback_and_a_bug_with_it(tmp_path):
    """A ValueError weakseg raises (a run that is not there) is its message; numpy's ValueError keeps its traceback."""
    import logging

    import numpy as np

    from weakseg.flows.cli import RefusalsWithoutTraceback
    from weakseg.tasks import export

    def console(fail) -> str:
        try:
            fail()
        except ValueError:
            record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
        assert RefusalsWithoutTraceback().filter(record)
        return logging.Formatter().format(record)

    assert console(lambda: export.plan_export(str(tmp_path), "nope")) == "failed"
    bug = console(lambda: np.zeros(2) + np.zeros(3))
    assert bug.startswith("failed\nTraceback") and "operands could not be broadcast" in bug
