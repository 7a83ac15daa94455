"""How long a fresh ``weakseg demo`` takes, and what it delivers: wall seconds, and the CPU seconds
(user + sys) of the demo's process and all its children, which a loaded machine does not inflate
as it does wall time. On N idle cores the demo cannot take less than CPU seconds / N, so that is
the figure that grounds a claim for an idle machine measured on a busy one. Prints JSON with the
delivered model's mean IoU and background IoU on the demo's val images (its ``report.json``).

    python bench/demo.py                       # the demo's defaults, in a fresh temporary folder
    python bench/demo.py --cores 2 -- --seed 1 # demo options after --
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WEAKSEG = str(Path(sys.executable).parent / "weakseg")
DELIVERED = "refined ilp+sppxl"  # weakseg.flows.demo.REFINED, without importing torch here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2, help="idle cores the lower bound is computed for")
    parser.add_argument("--workdir", help="default: a fresh temporary folder, removed afterwards")
    parser.add_argument("demo_args", nargs="*", help="options passed to weakseg demo (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="weakseg-demo-") as tmp:
        workdir = args.workdir or os.path.join(tmp, "demo")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([WEAKSEG, "demo", "--workdir", workdir, *args.demo_args], check=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = json.loads(Path(workdir, "report.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = DELIVERED if DELIVERED in report["mean_iou"] else next(reversed(report["mean_iou"]))
    print(json.dumps({
        "benchmark": "demo", "demo_args": args.demo_args,
        "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        f"idle_{args.cores}_core_lower_bound_seconds": round(cpu / args.cores, 1),
        "delivered": row, "mean_iou": report["mean_iou"][row], "background_iou": report["background_iou"][row],
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
