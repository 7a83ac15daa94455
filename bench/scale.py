"""segment-corpus scale-out: images/s with 1, 2, 4 Dask worker processes, and Prefect's cost per chunk.

Prints JSON (a benchmark, not a test). The same corpus (small photo crops, 64-96 px, the
generator of ``bench/segment.py``) and the same model (a small 32/32/32 head) are segmented:

- with ``--task-runner threads --workers 1`` (the baseline: one process), then
- with ``--task-runner dask --workers N`` for each N of ``--workers`` (a LocalCluster of N
  single-threaded worker processes on 127.0.0.1; each reads the model once).

Per setting: ``images_per_second`` around the whole flow call (Prefect runs, cluster start,
listing, runs row, artifacts), ``in_fanout`` = images / the chunk fan-out's wall time (the
cluster is up by then; its start is ``cluster_start_seconds``), the chunks' own summed
work, and the Prefect overhead per chunk:
``(fanout wall x slots - sum of chunk work) / chunks``, the slot-seconds a chunk costs
beyond its own work (task run creation and state changes, Dask scheduling, result return,
the listing between submissions, idle slots at the tail). With one slot it is plainly
``(fanout wall - chunk work) / chunks``. A chunk's work is timed inside the task
(``ChunkResult.seconds``: read, decode, forward, priors, Parquet), including the model read
the first chunk of each worker process does.

Dask workers run torch on one thread each (distributed sets ``OMP_NUM_THREADS=1`` in
them); on a machine with C cores the curve flattens once N reaches C. Report the
machine's core count beside the figures (``cpu_count`` below).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment import make_checkpoint, make_images  # bench/segment.py: the same corpus and model

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded 2-core machine


def run_flow(images: str, model: str, out: str, **kw) -> tuple[dict, float]:
    from weakseg.flows.segment_corpus import segment_corpus

    t0 = time.perf_counter()
    state = segment_corpus(images=images, model=model, out=out, return_state=True, device="cpu", thumbnails=0, **kw)
    wall = time.perf_counter() - t0
    if not state.is_completed():
        raise RuntimeError(f"segment-corpus failed: {state.message}")
    return state.result(), wall


def figures(summary: dict, wall: float, slots: int) -> dict:
    t = summary["timing"]
    ok, chunks = summary["counts"]["ok"], summary["counts"]["chunks"]
    return {
        "images": ok, "chunks": chunks, "slots": slots,
        "wall_seconds": round(wall, 2),
        "images_per_second": round(ok / wall, 2),
        "fanout_seconds": round(t["fanout_seconds"], 2),
        "in_fanout_images_per_second": round(ok / t["fanout_seconds"], 2),
        "chunk_work_seconds": round(t["chunk_seconds"], 2),
        "prefect_overhead_ms_per_chunk": round(1000 * (t["fanout_seconds"] * slots - t["chunk_seconds"]) / chunks, 1),
        "cluster_start_seconds": round(t["runner_start_seconds"], 2),
        "other_seconds": round(wall - t["fanout_seconds"] - t["runner_start_seconds"], 2),  # prepare, runs row...
        "worker_processes": len(t["workers"]), "model_loads": t["model_loads"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=240)
    p.add_argument("--chunk-size", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--workers", default="1,2,4", help="Dask worker process counts")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--priors", default="ilp")
    args = p.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "corpus", args.images)
        make_checkpoint(root / "model.pt", args.backbone)
        common = {"chunk_size": args.chunk_size, "batch_size": args.batch_size, "priors": args.priors,
                  "max_side": 96}
        images, model = str(root / "corpus"), str(root / "model.pt")
        run_flow(images, model, str(root / "warm"), workers=1, **common)  # imports, Prefect server, caches
        results = {}
        summary, wall = run_flow(images, model, str(root / "threads-1"), workers=1, **common)
        results["threads-1"] = figures(summary, wall, 1)
        for n in (int(x) for x in args.workers.split(",") if x.strip()):
            summary, wall = run_flow(images, model, str(root / f"dask-{n}"), task_runner="dask", workers=n, **common)
            results[f"dask-{n}"] = figures(summary, wall, n)
    base = results.get("dask-1", {}).get("in_fanout_images_per_second")
    speedup = {k: round(v["in_fanout_images_per_second"] / base, 2) for k, v in results.items()
               if base and k.startswith("dask-")}
    print(json.dumps({"bench": "scale", "cpu_count": os.cpu_count(), "backbone": args.backbone,
                      "priors": args.priors, "images": args.images, "chunk_size": args.chunk_size,
                      "batch_size": args.batch_size, "settings": results, "dask_speedup_vs_1_worker": speedup},
                     indent=2))


if __name__ == "__main__":
    main()
