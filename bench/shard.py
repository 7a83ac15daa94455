"""shard-imagenet throughput next to a bare decode -> resize -> encode loop, same files, same run.

Prints JSON: images/s of the flow with 1, 2 (and more) thread workers, images/s of the bare
loop over the same photo-sized JPEGs, and their ratio (the flow's overhead: listing, label
mapping, tar writing, Prefect task orchestration). Target: ratio >= 0.8 on one worker.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from weakseg.tasks.images import decode_image, encode_jpeg, resize_shorter_side
from weakseg.tasks.synthetic import backgrounds


def make_corpus(root: Path, n: int, classes: int = 10, size=(1024, 768)) -> None:
    rng = np.random.default_rng(0)
    photos = backgrounds()
    for i in range(n):
        photo = photos[i % len(photos)]
        img = Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 8, (size[1], size[0], 3))
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        (folder / f"img{i:05d}.jpg").write_bytes(buf.getvalue())


def bare_loop(files: list[Path], max_side: int) -> float:
    start = time.perf_counter()
    for f in files:
        encode_jpeg(resize_shorter_side(decode_image(f.read_bytes()).image, max_side))
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    logging.getLogger("prefect").setLevel(logging.WARNING)
    from weakseg.flows.shard_imagenet import shard_imagenet

    work = Path(tempfile.mkdtemp(prefix="weakseg-bench-shard-"))
    try:
        make_corpus(work / "src", args.images)
        files = sorted((work / "src").rglob("*.jpg"))
        bare = bare_loop(files, args.max_side)
        flows = {}
        with prefect_test_harness(server_startup_timeout=120):
            for workers in [int(w) for w in args.workers.split(",")]:
                dest = work / f"dest-{workers}"
                start = time.perf_counter()
                shard_imagenet(source=str(work / "src"), dest=str(dest), max_side=args.max_side, shard_size=50,
                               workers=workers)
                flows[workers] = args.images / (time.perf_counter() - start)
        print(json.dumps({
            "benchmark": "shard_imagenet",
            "images": args.images,
            "image_size": [1024, 768],
            "max_side": args.max_side,
            "cpus": os.cpu_count(),
            "bare_loop_images_per_s": round(bare, 2),
            "flow_images_per_s": {str(k): round(v, 2) for k, v in flows.items()},
            "ratio_vs_bare": {str(k): round(v / bare, 3) for k, v in flows.items()},
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
