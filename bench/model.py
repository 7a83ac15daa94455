"""Forward cost of the MIL network next to its bare backbone, measured in the same run.

Prints JSON: images/s of the frozen backbone alone, of backbone + head (+ LSE) as trained,
and of the same network as inference serves it (BatchNorms folded, weakseg.models.fusion),
with their ratios, for the paper's head widths and a small head, at the paper's input size.
Absolute numbers depend on the machine; the ratio is what to compare.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from weakseg.models import ModelConfig, create_model
from weakseg.models.fusion import folded_for_inference


def _best_rates(fns: list, x: torch.Tensor, repeats: int) -> list[float]:
    """Best images/s of each function, measured interleaved so drift hits all alike."""
    best = [0.0] * len(fns)
    with torch.inference_mode():
        for fn in fns:
            fn(x)  # warm-up
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn(x)
                best[i] = max(best[i], x.shape[0] / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    args = parser.parse_args()
    x = torch.randn(args.batch, 3, args.size, args.size)
    results = []
    for widths in [(1024, 768, 512), (256, 256, 256)]:
        for stride in (16, 8):
            model, _ = create_model(
                ModelConfig(num_classes=21, backbone=args.backbone, head_widths=widths, output_stride=stride)
            )
            model.eval()
            folded = folded_for_inference(model)

            def network(t, m=model):  # what training runs: dense maps, then LSE
                return m.image_scores(m(t, dense=True), dense=True)

            def served(t, m=folded):  # what inference runs (weakseg.tasks.segment.inference.load_model)
                return m.image_scores(m(t, dense=True), dense=True)

            backbone, full, fast = _best_rates([model.backbone, network, served], x, args.repeats)
            with torch.inference_mode():
                maps = model(x, dense=True)
            results.append({
                "head_widths": list(widths),
                "output_stride": stride,
                "score_map": list(maps.shape[-2:]),
                "backbone_images_per_s": round(backbone, 2),
                "network_images_per_s": round(full, 2),
                "ratio": round(full / backbone, 3),
                "folded_images_per_s": round(fast, 2),
                "folded_ratio": round(fast / full, 3),
            })
    print(json.dumps({
        "benchmark": "model_forward",
        "backbone": args.backbone,
        "input": [args.batch, 3, args.size, args.size],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
