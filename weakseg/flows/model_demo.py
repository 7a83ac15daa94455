"""The model demo: what exists before the full pipeline lands (issue 6 replaces it).

Renders synthetic scenes, trains the MIL head on the frozen offline-pretrained backbone on
CPU from image-level labels only, saves a checkpoint, reloads it, and reports how often the
peak of the labelled class's score map falls inside the object, on the training scenes
and on unseen ones. Overlays of the score maps are written as a PNG.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..models import ModelConfig, load_checkpoint, save_checkpoint
from ..tasks.localization import _batch, fit_scenes, peak_hits
from ..tasks.synthetic import SYNTHETIC_CLASSES, Scene, make_scenes

_logger = logging.getLogger(__name__)


def _overlay(model, config: ModelConfig, scenes: list[Scene]) -> Image.Image:
    x, y = _batch(scenes, config)
    with torch.no_grad():
        maps = model.eval().dense_maps(x)
        probs = maps.softmax(dim=1)
    tiles = []
    for i, scene in enumerate(scenes):
        p = probs[i, y[i]][None, None]
        p = torch.nn.functional.interpolate(p, size=scene.image.shape[:2], mode="bilinear")[0, 0].numpy()
        heat = np.stack([p * 255, np.zeros_like(p), (1 - p) * 255], axis=-1)
        tiles.append(np.concatenate([scene.image, (0.5 * scene.image + 0.5 * heat).astype(np.uint8)], axis=0))
    return Image.fromarray(np.concatenate(tiles, axis=1))


def run_model_demo(workdir: str | Path = "demo-output", steps: int = 100, n_images: int = 12) -> dict[str, Any]:
    workdir = Path(workdir) / "model-demo"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = make_scenes(n_images, seed=1)
    held_out = make_scenes(n_images, seed=7)
    config = ModelConfig(num_classes=len(SYNTHETIC_CLASSES), head_widths=(128, 128, 128), output_stride=8)
    model, config, losses = fit_scenes(train, config, steps=steps, lr=1e-3)
    ckpt_path = workdir / "model.pt"
    save_checkpoint(ckpt_path, model, config, SYNTHETIC_CLASSES, input_size=train[0].image.shape[0],
                    metrics={"final_loss": losses[-1], "steps": steps})
    ckpt = load_checkpoint(ckpt_path)
    overlay_path = workdir / "score-maps.png"
    _overlay(ckpt.model, ckpt.config, held_out[:6]).save(overlay_path)
    report = {
        "classes": list(SYNTHETIC_CLASSES),
        "backbone": config.backbone,
        "steps": steps,
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "peak_in_object_train": f"{sum(peak_hits(ckpt.model, ckpt.config, train))}/{len(train)}",
        "peak_in_object_unseen": f"{sum(peak_hits(ckpt.model, ckpt.config, held_out))}/{len(held_out)}",
        "checkpoint": str(ckpt_path),
        "score_map_overlays": str(overlay_path),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    return report
