"""What the default views cost, in bench/segment.py's terms: the forward pass of segment's views against one plain
forward pass of the same model on the same images, in the same run (issue 38: the default at most 1.5x).

``predict`` (the segment engine's forward and probability read-out, no priors: they cost the same for every view
set) over ``--images`` photos of a VOC layout's split, at ``--max-side``, once per TTA spec, the specs interleaved
over ``--rounds`` rounds so a shared machine's load falls on all alike; the median seconds of each spec over the
rounds, and its ratio to the plain view ``1``. With ``--reference MODEL`` that model's plain pass is timed in the
same rounds too, so a new default can be compared with today's model in absolute terms (a bigger backbone or a
denser output stride makes the plain pass itself dearer). ``--clock cpu`` times this process's CPU seconds instead
of wall seconds (run it with ``OMP_NUM_THREADS=1``): on a machine loaded ten deep by other jobs, wall time measures
the neighbours more than the views. Prints JSON.

    .venv/bin/python bench/views_cost.py --model refined/model.pt --views "auto;1;2;1,2" \\
        --data quality-output/msrc21-objects/data --split dev --reference model-seed0/model.pt
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from weakseg.tasks.evaluate.scoring import read_split_ids
from weakseg.tasks.evaluate.variants import read_voc
from weakseg.tasks.segment.inference import load_model, predict
from weakseg.tasks.segment.tta import resolve_tta


def timed(bundle, images: list[np.ndarray], max_side: int, spec: str, clock=time.perf_counter) -> float:
    start = clock()
    for pred in predict(bundle, images, max_side, tta=spec):
        pred.probs()  # the per-pixel probabilities at full size, as the priors read them
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--views", default="auto;1;2", help="';'-separated TTA specs ('auto': the model's own)")
    parser.add_argument("--reference", default=None, help="a second model whose plain pass is timed alongside")
    parser.add_argument("--data", required=True, help="a VOC layout")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU seconds (time.process_time), for a loaded machine")
    args = parser.parse_args()
    bundle = load_model(args.model, "cpu")
    images = [read_voc(args.data, i)[0] for i in read_split_ids(args.data, args.split)[: args.images]]
    specs = {spec: resolve_tta(spec, bundle.default_tta) for spec in args.views.split(";")}
    runs: dict[str, list[float]] = {spec: [] for spec in specs}
    runs.setdefault("1", [])
    reference = load_model(args.reference, "cpu") if args.reference else None
    if reference is not None:
        runs["reference 1"] = []
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    timed(bundle, images[:2], args.max_side, "1")  # warm-up: first-call allocations out of the rounds
    for _ in range(args.rounds):
        for spec in runs:
            if spec == "reference 1":
                runs[spec].append(timed(reference, images, args.max_side, "1", clock))
            else:
                runs[spec].append(timed(bundle, images, args.max_side, str(specs.get(spec, spec)), clock))
    median = {spec: statistics.median(t) for spec, t in runs.items()}
    print(json.dumps({
        "benchmark": "views_cost", "model": args.model, "reference": args.reference, "images": len(images),
        "max_side": args.max_side, "rounds": args.rounds, "clock": args.clock,
        "views": {spec: str(specs.get(spec, spec)) for spec in runs if spec != "reference 1"},
        "ms_per_image": {spec: round(1000 * m / len(images), 1) for spec, m in median.items()},
        "over_plain": {spec: round(m / median["1"], 3) for spec, m in median.items()},
        **({"over_reference_plain": {spec: round(m / median["reference 1"], 3) for spec, m in median.items()}}
           if reference is not None else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
