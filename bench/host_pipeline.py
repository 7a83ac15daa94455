"""The host side of segment-corpus against a stand-in device, on the CPU (issue 36). Prints JSON (not a test).

Will the host keep a fast accelerator busy? Without one, this runs the real ``segment-corpus``
flow and chunk engine with the device replaced by a stand-in (:class:`StandIn`, in place of
:class:`weakseg.tasks.segment.chunk.DeviceStage`) that takes a set time per image while
holding no interpreter lock (a sleep) and returns score maps and labelled masks of the right
shapes. What runs on the device on an accelerator (JPEG decoding where it decodes, the
forward pass, and the post-processing from the cells: upsampling, ILP, argmax, the
superpixel vote) is inside the stand-in's time; everything the host does there runs for
real: listing, reading, hashing, decoding, shrinking to the forward size, superpixels, the
hand-off between processes, bucketing, PNG masks, rows and Parquet files.

For each prior chain (``ilp``, ``ilp,sppxl``), on 500x375 / 375x500 JPEG photos:

- ``capacity_1``, ``capacity_2``: images/s with a zero-time stand-in and 1 and 2 host worker
  processes (``--host-workers``); ``scaling`` = capacity_2 / capacity_1;
- ``device_rate``: the stand-in's rate, set to 0.8 x capacity_2; ``achieved``: images/s of the
  flow with that stand-in and 2 host workers; ``achieved_ratio`` = achieved / device_rate.

Rates are the flow's own: images segmented over the fan-out's wall time (from the first chunk
submitted to the last one written, ``timing.fanout_seconds``); ``whole_call`` beside each is
over the whole flow call (run creation, the model pinned, the listing, the runs row and
artifacts included: a fixed second or two a run that a long run does not notice). Each figure
is the median of ``--repeats`` runs. ``flow_process_cpu_ms_per_image``: the flow process's own CPU
time an image at capacity_2 (all its threads; not the host workers'): one flow process can feed
a device at most ``1000 / flow_process_cpu_ms_per_image`` images/s. Targets on the 2-core
machine: ``achieved_ratio`` >= 0.9 and ``scaling`` >= 1.7 for both chains.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded 2-core machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weakseg.models import ModelConfig, create_model, save_checkpoint  # noqa: E402
from weakseg.tasks.segment import chunk  # noqa: E402
from weakseg.tasks.segment.forward import Pixels, Prediction  # noqa: E402
from weakseg.tasks.segment.postprocess import LABEL_VALUES, Labelled  # noqa: E402

CLASSES = ["background", *[f"class{i:02d}" for i in range(20)]]  # 21, like PASCAL VOC
CHAINS = ("ilp", "ilp,sppxl")


class StandIn(chunk.DeviceStage):
    """A device that takes :attr:`seconds_per_image` a batch image, sleeping (no interpreter lock
    held, as a thread waiting for an accelerator holds none; one batch at a time, as one device
    runs them), and gives back what the real one
    does: a :class:`Prediction` per image (score cells of the model's shape) and a
    :class:`Labelled` mask per image (a disc of one class on background, with its per-label
    statistics). Masks and cells are made once per image size and shared: the stand-in itself
    costs the host nothing."""

    seconds_per_image = 0.0
    busy = threading.Lock()  # one device: the chunks in flight take turns on it, as on a GPU's one thread

    def forward(self, images: Sequence[Pixels]) -> list[Prediction]:
        if self.seconds_per_image:
            with self.busy:
                time.sleep(self.seconds_per_image * len(images))
        stride, k = self.bundle.model.stride, len(self.bundle.classes)
        probs = np.full(k, 1.0 / k)
        probs[1] += 0.1
        return [Prediction(_cells(k, -(-im.size[0] // stride), -(-im.size[1] // stride)), probs / probs.sum(),
                           im.size, im.size, stride, 1000 * self.seconds_per_image) for im in images]

    def label(self, preds: Sequence[Prediction], inputs: Sequence[Mapping[str, np.ndarray]]) -> list[Labelled]:
        return [_mask(*p.size) for p in preds]

    def decode(self, jpegs: Sequence[bytes]) -> list[torch.Tensor]:  # not reached: the host decodes on the CPU
        raise RuntimeError("the stand-in device does not decode")


@functools.cache
def _cells(k: int, ch: int, cw: int) -> torch.Tensor:
    return torch.full((k, ch, cw), 1.0 / k)


@functools.cache
def _mask(h: int, w: int) -> Labelled:
    """A mask shaped like a real one: one object (a disc) on background, the PNG cost of a real mask."""
    yy, xx = np.mgrid[:h, :w]
    labels = (((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 < 1).astype(np.uint8) * 7
    labels[: h // 5, : w // 4] = 15
    counts = np.bincount(labels.ravel(), minlength=LABEL_VALUES).astype(np.int64)
    prob_sum = counts * 0.8
    boxes = np.zeros((LABEL_VALUES, 4), np.int64)
    for v in np.flatnonzero(counts):
        ys, xs = np.nonzero(labels == v)
        boxes[v] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return Labelled(labels, counts, prob_sum, boxes)


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEG photos (quality 90), alternately 500x375 and 375x500: crops of scikit-image's sample photos."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (375, 500) if i % 2 == 0 else (500, 375)
        photo = photos[i % len(photos)]
        zoom = min(1.0, (photo.shape[0] - 1) / h, (photo.shape[1] - 1) / w)
        ch, cw = int(h * zoom), int(w * zoom)
        y, x = int(rng.integers(0, photo.shape[0] - ch)), int(rng.integers(0, photo.shape[1] - cw))
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h)).save(sub / f"{i:06d}.jpg", quality=90)


def make_checkpoint(path: Path) -> None:
    """A small random network: the stand-in never runs it; its stride and classes shape the maps."""
    torch.manual_seed(0)
    model, config = create_model(ModelConfig(num_classes=len(CLASSES), head_widths=(32, 32, 32), output_stride=16),
                                 pretrained="none")
    save_checkpoint(path, model, config, CLASSES, input_size=96)


def run(images: str, model: str, out: str, chain: str, host_workers: int, seconds_per_image: float,
        batch_size: int, chunk_size: int, workers: int = 2) -> dict:
    """One flow run with the stand-in device: images/s over the fan-out and over the whole call."""
    from weakseg.flows.segment_corpus import segment_corpus

    StandIn.seconds_per_image = seconds_per_image
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    state = segment_corpus(images=images, model=model, out=out, priors=chain, host_workers=host_workers,
                           batch_size=batch_size, chunk_size=chunk_size, workers=workers, device="cpu", tta="1",
                           thumbnails=0,
                           return_state=True)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    s = state.result()
    ok = s["counts"]["ok"]
    return {"ok": ok, "rate": ok / s["timing"]["fanout_seconds"], "whole_call": ok / wall,
            "flow_process_cpu_ms": 1000 * cpu / ok,
            "device_busy": s["device_busy_fraction"], "mean_batch": s["timing"]["mean_batch"],
            "stage_seconds": json.loads(s["stage_seconds"])}


def _cpu_seconds() -> float:
    """CPU seconds of this process (the flow's: every thread; not its host workers, not Prefect's server)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 1)


def measure(images: str, model: str, work: Path, chain: str, repeats: int, batch_size: int, chunk_size: int,
            workers: int) -> dict:
    n = 0

    def runs(host_workers: int, spi: float) -> list[dict]:
        nonlocal n
        out = []
        for _ in range(repeats):
            n += 1
            out.append(run(images, model, str(work / f"out-{n}"), chain, host_workers, spi, batch_size, chunk_size,
                           workers))
        return out

    cap1, cap2 = runs(1, 0.0), runs(2, 0.0)
    capacity_1, capacity_2 = _median(cap1, "rate"), _median(cap2, "rate")
    device_rate = 0.8 * capacity_2
    achieved = runs(2, 1.0 / device_rate)
    rate = _median(achieved, "rate")
    return {
        "capacity_1": capacity_1, "capacity_2": capacity_2, "scaling": round(capacity_2 / capacity_1, 3),
        "device_rate": round(device_rate, 1), "achieved": rate, "achieved_ratio": round(rate / device_rate, 3),
        "device_busy": statistics.median(r["device_busy"] for r in achieved),
        "whole_call": {"capacity_1": _median(cap1, "whole_call"), "capacity_2": _median(cap2, "whole_call"),
                       "achieved": _median(achieved, "whole_call")},
        "flow_process_cpu_ms_per_image": round(statistics.median(r["flow_process_cpu_ms"] for r in cap2), 3),
        "images": achieved[0]["ok"], "mean_batch": achieved[0]["mean_batch"],
        "host_stage_seconds_capacity_2": cap2[len(cap2) // 2]["stage_seconds"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2048, help="photos per run (ilp,sppxl runs a quarter of them)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="chunks in flight (segment-corpus's --workers)")
    p.add_argument("--chains", default=",".join(CHAINS).replace(",sppxl", "+sppxl"),
                   help="'+'-joined chains, comma-separated (ilp,ilp+sppxl)")
    args = p.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    chunk.DeviceStage = StandIn  # the device stage the engine builds for each chunk
    report: dict = {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "photos": "500x375 / 375x500 JPEG (quality 90)", "batch_size": args.batch_size,
                    "chunk_size": args.chunk_size, "workers": args.workers, "repeats": args.repeats, "chains": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_checkpoint(work / "model.pt")
        make_photos(work / "photos", args.images)
        small = work / "photos-small"
        small.mkdir()
        for path in sorted((work / "photos").rglob("*.jpg"))[: max(64, args.images // 4)]:
            (small / path.name).symlink_to(path)
        # warm-up: the temporary Prefect server, the host pools' processes, the model cache
        for workers in (1, 2):
            run(str(small), str(work / "model.pt"), str(work / f"warm-{workers}"), "ilp,sppxl", workers, 0.0,
                args.batch_size, args.chunk_size)
        for chain in args.chains.split(","):
            chain = chain.replace("+", ",")
            images = work / ("photos" if "sppxl" not in chain else "photos-small")
            report["chains"][chain] = measure(str(images), str(work / "model.pt"), work / chain.replace(",", "-"),
                                              chain, args.repeats, args.batch_size, args.chunk_size, args.workers)
    report["targets_met"] = all(r["achieved_ratio"] >= 0.9 and r["scaling"] >= 1.7 for r in report["chains"].values())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
