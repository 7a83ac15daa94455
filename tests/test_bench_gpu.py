"""bench/gpu.sh end to end at --quick size on the CPU, with the engine a device machine without
Prefect uses (the chunk task on a thread pool): one JSON document with every figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_quick_on_cpu(tmp_path):
    env = {**os.environ, "WEAKSEG_BENCH_ENGINE": "chunks", "PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--quick", "--device", "cpu", "--out",
                           str(tmp_path / "gpu.json")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report == json.loads((tmp_path / "gpu.json").read_text())
    assert report["device"] == "cpu" and report["quick"]
    assert set(report["bare_forward_images_per_second"]) == {"fp32"}
    assert report["bare_forward_images_per_second"]["fp32"] > 0
    assert set(report["segment"]) == {"none", "ilp (fp32)", "ilp (decode device)", "ilp,sppxl", "ilp,sppxl,seg"}
    runs = [*report["segment"].values(), *report["segment_defaults"].values(), *report["host_capacity"].values()]
    for run in runs:
        assert run["engine"] == "chunks" and run["images"] == report["images"] and run["failed"] == 0
        assert run["images_per_second"] > 0 and 0 <= run["device_busy_fraction"] <= 1
        assert {"read", "decode", "forward", "priors", "encode", "write"} <= set(run["stage_seconds"])
        assert 1 <= run["mean_batch"] <= report["batch_size"]
    assert all(r["precision"] == "fp32" for r in report["segment"].values())
    assert {r["tta"] for r in report["segment_defaults"].values()} == {"auto"}
    assert all(r["host_workers"] >= 1 for r in report["host_capacity"].values())
    mixed = report["ilp_mixed_sizes"]
    assert mixed["images"] == report["images"] and mixed["failed"] == 0 and mixed["photo_sizes"] > 2
    assert 1 <= mixed["mean_batch"] <= report["batch_size"]
    agreement = report["device_vs_host_decode"]  # libjpeg-turbo's pixels; resized by torch, not OpenCV
    assert agreement["images_compared"] == report["images"] and agreement["images_only_in_one"] == 0
    assert agreement["pixel_agreement"] > 0.8
    steady = report["ilp_steady_state"]
    assert steady["half_seconds"] > 0 and steady["full_seconds"] == report["segment"]["ilp (fp32)"]["seconds"]
    assert steady["images_per_second"] is None or steady["images_per_second"] > 0
    assert report["train"]["samples_per_second"] > 0
    assert report["peak_rss_mib"] > 0
