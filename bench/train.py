"""Training throughput reading real shards vs. the same step on batches already in memory.

Writes synthetic JPEG shards (shard-imagenet format) to a temporary folder, then times
``--steps`` optimiser steps fed by the streaming pipeline (webdataset, decode, augment,
DataLoader workers) and the same number of steps on batches collected beforehand. The
ratio says how much of the step time the data path costs (target >= 0.9). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from weakseg.models import ModelConfig, create_model
from weakseg.tasks.devices import TRAIN_PRECISIONS, resolve_device
from weakseg.tasks.ingest.manifest import load_manifest, shard_urls
from weakseg.tasks.train.augment import AugmentConfig, TrainTransform
from weakseg.tasks.train.optimizer import make_optimizer
from weakseg.tasks.train.shard_reader import make_loader, train_pipeline, write_synthetic_shards
from weakseg.tasks.train.trainer import _Runtime, optimizer_step


def _time(rt: _Runtime, batches, steps: int) -> float:
    for _ in range(2):  # warm-up
        optimizer_step(rt, batches)
    if rt.cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        n += optimizer_step(rt, batches)["samples"]
    if rt.cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=320, help="side of the stored JPEGs")
    p.add_argument("--head-widths", default="256,256,256")
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=TRAIN_PRECISIONS,
                   help="the layers' number format (weakseg train --precision)")
    args = p.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_shards(tmp, n_train=128, n_val=0, size=args.image_size, per_shard=32)
        manifest = load_manifest(tmp)
        urls = shard_urls(tmp, manifest, "train")
        k = len(manifest["classes"])
        config = ModelConfig(num_classes=k, head_widths=tuple(int(w) for w in args.head_widths.split(",")),
                             output_stride=args.output_stride)
        model, config = create_model(config)
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        rt = _Runtime(model, model, make_optimizer(model), device, config.mean, config.std, multilabel=False,
                      precision=args.precision)
        aug = AugmentConfig(input_size=args.input_size)
        loader = make_loader(train_pipeline(urls, k, TrainTransform(aug), shuffle_buffer=64), k, args.batch_size,
                             num_workers=args.num_workers, pin_memory=device.type == "cuda")
        stream = iter(loader)
        streamed = _time(rt, stream, args.steps)
        cached = [next(stream) for _ in range(args.steps + 2)]
        del stream
        in_memory = _time(rt, iter(cached), args.steps)
    print(json.dumps({
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "input_size": args.input_size, "head_widths": args.head_widths,
        "output_stride": args.output_stride, "num_workers": args.num_workers, "steps": args.steps,
        "precision": rt.precision,
        "shards_samples_per_s": round(streamed, 2),
        "in_memory_samples_per_s": round(in_memory, 2),
        "ratio": round(streamed / in_memory, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
