"""Images a forward pass holds: batches keyed by input shape against the forward-size key they replaced,
and an accelerator's deeper buckets.

A batch holds images that run at one input shape, so a corpus of many photo sizes fills
fewer than ``--batch-size`` a pass, and an accelerator runs part-empty passes. Since the
engine keys its buckets by input shape (each forward size edge-padded up to a multiple of
the stride, ``weakseg.tasks.segment.batching.batch_key``), photos a few pixels apart share
a pass, each still the input it is alone. At most ``batching.bucket_hold`` images wait for a
full batch: two batches' worth on the CPU, eight on an accelerator. This runs the engine's
own bucketing (``batching.buckets``: chunks of ``--chunk-size``, batch ``--batch-size``) over
size mixes with both keys and both holds, in the same run, and prints JSON: photo sizes,
forward sizes, input shapes and mean images a pass, for the plain view (``1``) and a MIL
model's default (``2``).

Mixes: ``web`` (bench/gpu.py's ``ilp_mixed_sizes`` photos: 8 longer sides x 4 aspects),
``box500`` (photos fitted into a 500 px box, shorter side any of 281-500 px: a collection
resized to a fixed box), and ``msrc21`` (the 591 MSRC-21 photos' own sizes, when
``../shared/data`` has them). No model, no images decoded: sizes only.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import mixed_sizes

from weakseg.tasks.segment.batching import (
    DEFAULT_MAX_SIDE,
    MIN_CELLS,
    batch_key,
    bucket_hold,
    buckets,
    forward_size,
    hold_weight,
)
from weakseg.tasks.segment.tta import view_size

MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21" / "JPEGImages"


def box_sizes(n: int, box: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` (h, w) fitted into a ``box`` px square: longer side ``box``, shorter any of 0.56-1 of it."""
    shorter = rng.integers(round(box * 9 / 16), box + 1, size=n)
    return [(int(s), box) if i % 2 == 0 else (box, int(s)) for i, s in enumerate(shorter)]


def msrc_sizes() -> list[tuple[int, int]]:
    from PIL import Image

    return [Image.open(p).size[::-1] for p in sorted(MSRC.glob("*.jpg"))]


def mean_batch(sizes: list[tuple[int, int]], key: Callable[[tuple[int, int]], Hashable], chunk: int,
               batch: int, hold: int) -> float:
    """Mean images a pass when the engine buckets each chunk of ``sizes`` by ``key``."""
    passes = 0
    for start in range(0, len(sizes), chunk):
        passes += sum(1 for _ in buckets(iter(sizes[start:start + chunk]), key, batch, hold,
                                          lambda hw: hold_weight(*hw)))
    return round(len(sizes) / passes, 2)


def compare(sizes: list[tuple[int, int]], stride: int, scales: tuple[float, ...], chunk: int, batch: int) -> dict:
    def by_forward_size(hw: tuple[int, int]) -> Hashable:  # the key before input shapes
        plain = forward_size(*hw, stride, DEFAULT_MAX_SIDE)
        return tuple(view_size(plain, s, stride, MIN_CELLS) for s in scales)

    def by_input_shape(hw: tuple[int, int]) -> Hashable:
        return batch_key(*hw, stride, DEFAULT_MAX_SIDE, 0, scales)

    cpu, accelerator = bucket_hold(batch, torch.device("cpu")), bucket_hold(batch, torch.device("cuda"))
    old = mean_batch(sizes, by_forward_size, chunk, batch, cpu)
    new = mean_batch(sizes, by_input_shape, chunk, batch, cpu)
    deep = mean_batch(sizes, by_input_shape, chunk, batch, accelerator)
    return {"forward_sizes": len({by_forward_size(s) for s in sizes}),
            "input_shapes": len({by_input_shape(s) for s in sizes}),
            "mean_batch_by_forward_size": old, "mean_batch_by_input_shape": new, "ratio": round(new / old, 2),
            "mean_batch_by_input_shape_accelerator_hold": deep, "accelerator_ratio": round(deep / old, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--chunk-size", type=int, default=512, help="segment-corpus's default")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stride", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    mixes = {"web": mixed_sizes(args.images, 500, rng), "box500": box_sizes(args.images, 500, rng)}
    if MSRC.is_dir():
        mixes["msrc21"] = msrc_sizes()
    report = {"benchmark": "batching", "chunk_size": args.chunk_size, "batch_size": args.batch_size,
              "stride": args.stride, "hold": {"cpu": bucket_hold(args.batch_size, torch.device("cpu")),
                                              "accelerator": bucket_hold(args.batch_size, torch.device("cuda"))},
              "mixes": {}}
    for name, sizes in mixes.items():
        report["mixes"][name] = {"images": len(sizes), "photo_sizes": len(set(sizes)),
                                 **{f"tta {'2' if scales == (2.0,) else '1'}": compare(
                                     sizes, args.stride, scales, args.chunk_size, args.batch_size)
                                    for scales in ((1.0,), (2.0,))}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
