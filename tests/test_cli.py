import subprocess
import sys

import pytest

from weakseg.flows.cli import COMMANDS, main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "weakseg.flows.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("shard", "train", "segment", "evaluate", "demo"):
        assert name in out


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.issue is not None and c.target is None])
def test_pending_commands_say_so_and_fail(name, capsys):
    assert main([name, "--whatever", "x"]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_unknown_options_of_built_commands_are_refused():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--bogus"])
    assert exc.value.code == 2
