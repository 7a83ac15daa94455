"""Memory of ``weakseg export`` as a run grows: peak RSS of an export of N images, for two N ten
times apart, COCO and VOC. Flat means it streams (one chunk file and a batch of masks at a time).

The run is written with the tables' own writer (chunks of 512 images, 96x128 masks of three
classes and background), then exported in a fresh process each time. Prints JSON.

    python bench/export.py --images 1000,10000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ["background", "cat", "dog", "tree"]
CHILD = """
import resource, sys, time
from weakseg.tasks import export
out, fmt, dest = sys.argv[1:4]
t = time.perf_counter()
plan = export.plan_export(out, "bench")
done = (export.export_coco if fmt == "coco" else export.export_voc)(out, plan, dest)
print(done["images"], time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_run(out: str, n: int, chunk: int = 512) -> None:
    from weakseg.tasks.segment import tables
    from weakseg.tasks.segment.encode import encode_mask

    rng = np.random.default_rng(0)
    for c in range(0, n, chunk):
        rows: dict[str, list] = {"images": [], "regions": [], "masks": []}
        for i in range(c, min(n, c + chunk)):
            labels = np.zeros((96, 128), np.uint8)
            for k in (1, 2, 3):
                y, x = rng.integers(0, 64, 2)
                labels[y : y + 32, x : x + 48] = k
            key = f"k{i:08d}"
            rows["images"].append({"run_id": "bench", "image_key": key, "status": "ok", "width": 128, "height": 96,
                                   "image_uri": f"/photos/{i}.jpg"})
            rows["masks"].append({"run_id": "bench", "image_key": key, "width": 128, "height": 96,
                                  "mask_png": encode_mask(labels)})
            for k in np.unique(labels).tolist():
                rows["regions"].append({"run_id": "bench", "image_key": key, "class_name": CLASSES[k], "class_index": k,
                                        "pixel_count": int((labels == k).sum()),
                                        "area_fraction": float((labels == k).mean()), "mean_prob": 0.8})
        for table in ("regions", "masks", "images"):
            tables.write_rows(tables.chunk_file(out, table, "2026-01-01", "bench", c // chunk), table, rows[table])
    tables.write_rows(tables.runs_file(out, "2026-01-01", "bench"), "runs",
                      [{"run_id": "bench", "classes": CLASSES, "state": "Completed"}])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="1000,10000", help="run sizes, comma list")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.images.split(",")):
            out = str(Path(tmp) / f"tables-{n}")
            t = time.perf_counter()
            write_run(out, n)
            written = time.perf_counter() - t
            for fmt in ("coco", "voc"):
                dest = str(Path(tmp) / f"{fmt}-{n}")
                line = subprocess.run([sys.executable, "-c", CHILD, out, fmt, dest], capture_output=True, text=True,
                                      check=True).stdout.split()
                results.append({"images": int(line[0]), "format": fmt, "seconds": round(float(line[1]), 2),
                                "peak_rss_mib": round(int(line[2]) / 1024, 1), "write_run_seconds": round(written, 1)})
    print(json.dumps({"benchmark": "export_memory", "results": results,
                      "parent_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
                     indent=2))


if __name__ == "__main__":
    main()
