"""bench/batching.py: the engine's bucketing by input shape against the forward-size key, and the deeper
accelerator hold, on size mixes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_batching_bench_reports_both_keys():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "batching.py"), "--images", "1024"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert {"web", "box500"} <= set(report["mixes"])
    for mix in report["mixes"].values():
        for views in ("tta 1", "tta 2"):
            run = mix[views]
            assert run["input_shapes"] <= run["forward_sizes"] <= mix["photo_sizes"]
            assert 1 <= run["mean_batch_by_forward_size"] <= report["batch_size"]
            assert 1 <= run["mean_batch_by_input_shape"] <= report["batch_size"]
            assert run["mean_batch_by_input_shape"] <= run["mean_batch_by_input_shape_accelerator_hold"] <= 64
    box = report["mixes"]["box500"]["tta 1"]  # shorter sides 1 px apart: 16 of them pad to one shape
    assert box["input_shapes"] < box["forward_sizes"] / 8
    assert box["mean_batch_by_input_shape"] > 2 * box["mean_batch_by_forward_size"]
