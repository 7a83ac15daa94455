"""Peak memory of segment-corpus by photo size: is every queue bounded in pixels? Prints JSON (not a test).

The engine's queues (inputs decoded ahead, images waiting in buckets for a full batch, masks
being encoded) weigh each image by its pixels (``batching.hold_weight``: a 500x375 photo is 1,
a 12-megapixel one 64), so a chunk of large photos holds a few where it would hold dozens of
small ones. This runs the real flow in a child process per case, over ``--images`` photos of
500x375 and of 4000x3000 (12 MP) at the same chunk and batch size, with the chain
``ilp,sppxl`` (superpixel maps are 4 bytes a pixel at full size), inline and with 2 host worker
processes, and reports the flow process's peak RSS (``ru_maxrss``) and its host workers' (the
largest worker's ``VmHWM``). Target (issue 37): peak RSS for 12-megapixel photos within 2x that for
500x375 photos.
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

import numpy as np

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded 2-core machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"500x375": (375, 500), "12MP": (3000, 4000)}


def make_photos(folder: Path, n: int, size: tuple[int, int]) -> None:
    """``n`` JPEGs of ``size`` (h, w): scikit-image's photos resized, varied by a shift of colour."""
    import cv2
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    h, w = size
    for i in range(n):
        img = cv2.resize(photos[i % len(photos)], (w, h), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img.astype(np.int16) + (i * 7) % 40 - 20, 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


def child(images: str, host_workers: int, batch_size: int, chunk_size: int) -> None:
    """One flow run in this process; prints its peak RSS and its children's."""
    import torch

    from weakseg.flows.segment_corpus import segment_corpus
    from weakseg.models import ModelConfig, create_model, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model, config = create_model(ModelConfig(num_classes=21, head_widths=(32, 32, 32), output_stride=16),
                                     pretrained="none")
        save_checkpoint(Path(tmp) / "model.pt", model, config, [f"c{i}" for i in range(21)], input_size=96)
        t0 = time.perf_counter()
        s = segment_corpus(images=images, model=str(Path(tmp) / "model.pt"), out=str(Path(tmp) / "out"),
                           priors="ilp,sppxl", host_workers=host_workers, batch_size=batch_size,
                           chunk_size=chunk_size, device="cpu", tta="1", thumbnails=0, return_state=True).result()
        print(json.dumps({"ok": s["counts"]["ok"], "seconds": round(time.perf_counter() - t0, 1),
                          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          "peak_rss_host_worker_mib": _host_worker_peak_mib()}))


def _host_worker_peak_mib() -> float:
    """The largest peak RSS (VmHWM) among this process's host worker processes, still alive after the run."""
    from weakseg.tasks.segment import hostpool

    peaks = [0.0]
    for pool in hostpool._POOLS.values():
        for pid in getattr(pool._executor, "_processes", None) or {}:
            try:
                with open(f"/proc/{pid}/status") as f:
                    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
                peaks.append(kib / 1024)
            except (OSError, StopIteration):
                continue
    return round(max(peaks), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--child", nargs=2, metavar=("IMAGES", "HOST_WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.batch_size, args.chunk_size)
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    report: dict = {"images": args.images, "batch_size": args.batch_size, "chunk_size": args.chunk_size,
                    "priors": "ilp,sppxl", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in SIZES.items():
            make_photos(Path(tmp) / name, args.images, size)
        for workers in (0, 2):
            for name in SIZES:
                out = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / name), str(workers),
                                      "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)],
                                     capture_output=True, text=True, check=True)
                report["runs"][f"{name}, host_workers={workers}"] = json.loads(out.stdout.strip().splitlines()[-1])
    for workers in (0, 2):
        small, large = (report["runs"][f"{n}, host_workers={workers}"] for n in SIZES)
        report[f"ratio_12MP_to_500x375_host_workers={workers}"] = {
            "flow_process": round(large["peak_rss_mib"] / small["peak_rss_mib"], 2),
            "flow_process_plus_largest_worker": round(
                (large["peak_rss_mib"] + large["peak_rss_host_worker_mib"])
                / (small["peak_rss_mib"] + small["peak_rss_host_worker_mib"]), 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
