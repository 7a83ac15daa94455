"""How fast the command line answers: ``weakseg --help``, ``weakseg COMMAND --help`` and an option
error, against the bare import of torch and Prefect (what answering used to cost), in fresh
processes, interleaved, median of ``--repeat`` runs. Prints JSON.

    python bench/cli_startup.py --repeat 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

WEAKSEG = str(Path(sys.executable).parent / "weakseg")
CASES = {
    "import torch, prefect": [sys.executable, "-c", "import torch, prefect"],
    "weakseg --help": [WEAKSEG, "--help"],
    "weakseg segment --help": [WEAKSEG, "segment", "--help"],
    "weakseg train --help": [WEAKSEG, "train", "--help"],
    "weakseg segment (missing --model path)": [WEAKSEG, "segment", "--images", ".", "--model", "/nonexistent/m.pt",
                                               "--out", "/tmp/weakseg-bench-out"],
    "python -c pass": [sys.executable, "-c", "pass"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    codes: dict[str, int] = {}
    for _ in range(args.repeat):
        for name, cmd in CASES.items():  # interleaved, so a change in the machine's load hits every case alike
            t = time.perf_counter()
            codes[name] = subprocess.run(cmd, capture_output=True).returncode
            seconds[name].append(time.perf_counter() - t)
    base = statistics.median(seconds["import torch, prefect"])
    print(json.dumps({
        "benchmark": "cli_startup", "repeat": args.repeat,
        "median_seconds": {n: round(statistics.median(s), 3) for n, s in seconds.items()},
        "fraction_of_import_torch_prefect": {n: round(statistics.median(s) / base, 3) for n, s in seconds.items()},
        "exit_codes": codes,
    }, indent=2))


if __name__ == "__main__":
    main()
