"""The whole accelerator check in one run (issues 15 and 36): prints one JSON document.

- ``bare_forward``: images/s of the network alone on the photos, already decoded, resized
  and batched on the device (the ceiling for segment-corpus), at each precision (fp32, bf16,
  fp16 autocast with channels_last on CUDA; fp32 on the CPU);
- ``segment``: images/s of segment-corpus (read -> decode -> forward -> priors -> PNG ->
  Parquet) for each prior set at ``--tta 1``, with its per-stage busy seconds, device-busy
  fraction (forward seconds / the fan-out's wall time) and its ratio to the bare forward at
  the same precision: ``ilp`` at every precision, the others at the default (``auto``: bf16
  on CUDA); ``ilp`` once more with the other decoder (host vs nvjpeg). Through the Prefect
  flow when Prefect is importable, else the chunk task on a thread pool of ``--workers``
  (``"engine"`` says which). Host stages run in ``--host-workers`` processes (default: the
  engine's, every core but one on an accelerator);
- ``segment_defaults``: ``ilp`` and ``ilp,sppxl`` with the command's defaults (``--tta
  auto``, ``--precision auto``): what a plain ``weakseg segment`` costs, beside the bare
  forward;
- ``host_capacity``: bench/host_pipeline.py's stand-in device at zero time on this machine,
  with the default host workers: the host side's own ceiling, in images/s, for ``ilp`` and
  ``ilp,sppxl``;
- ``ilp_steady_state``: ``ilp`` on half the photos too: the marginal rate of the other half
  (a long run's rate) and the fixed cost per run;
- ``train``: training samples/s of the trainer's own optimiser step (bf16 autocast and
  channels_last on CUDA) on batches already in memory;
- ``ilp_mixed_sizes``: ``ilp`` on as many photos of a web-like size mix (:func:`make_mixed_photos`):
  ``mean_batch`` (images a forward pass) shows how far a corpus's sizes keep batches from
  ``--batch-size``;
- ``peak_device_memory_mib`` (CUDA) or ``peak_rss_mib`` (CPU).

Photos: ``--images`` synthetic photo-like scenes (:mod:`weakseg.tasks.synthetic`), ``--side``
px on the longer side (1,024 of 500x375 / 375x500 by default), as JPEG (quality 90); nothing
is downloaded. The network is the paper's (EfficientNet-Lite0, head 1024/768/512, stride 16,
21 classes) with random weights: speed does not depend on them. ``--quick`` makes everything
small enough for a CPU test. Run it through ``bench/gpu.sh`` (or ``make bench-gpu``).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weakseg.models import ModelConfig, create_model, save_checkpoint  # noqa: E402
from weakseg.tasks.devices import resolve_device  # noqa: E402

CLASSES = ["background", *[f"class{i:02d}" for i in range(20)]]  # 21, like PASCAL VOC
PRIOR_SETS = ("none", "ilp", "ilp,sppxl", "ilp,sppxl,seg")
PRECISIONS = ("fp32", "bf16", "fp16")  # on CUDA; the CPU runs fp32


def _scenes(rng: np.random.Generator, n: int, side: int) -> list[np.ndarray]:
    """Up to 16 rendered scenes of ``side`` x ``3/4 side``: the photos vary them cheaply."""
    from weakseg.tasks.synthetic import BENCHMARK_CLASSES, render_benchmark_scene

    return [render_benchmark_scene(rng, list(rng.choice(BENCHMARK_CLASSES, 2, replace=False)),
                                   size=(side * 3 // 4, side)).image for _ in range(min(n, 16))]


def _save_jpeg(path: Path, rgb: np.ndarray) -> int:
    """``rgb`` as a JPEG (quality 90) at ``path``; its bytes."""
    import cv2

    _, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, 90])
    path.write_bytes(buf.tobytes())
    return len(buf)


def make_photos(folder: Path, n: int, side: int, seed: int = 0) -> int:
    """``n`` JPEG scenes of ``side`` x ``3/4 side`` (alternately landscape and portrait); their bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = _scenes(rng, n, side)
    total, distinct = 0, len(scenes)  # a few scenes, varied cheaply (flips, transposes) for the rest
    for i in range(n):
        img = scenes[i % distinct]
        if (i // distinct) % 2:
            img = img[:, ::-1]
        if i % 2:
            img = img.transpose(1, 0, 2)  # portrait
        total += _save_jpeg(folder / f"{i:06d}.jpg", img)
    return total


MIXED_SIDES = (0.66, 0.75, 0.8, 0.96, 1.0, 1.28, 1.6, 2.0)  # x --side: longer sides, some over the 512 px forward cap
MIXED_ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0)  # width / height of landscape photos; half are portrait


def mixed_sizes(n: int, side: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` (h, w) of a web-like size mix: :data:`MIXED_SIDES` x :data:`MIXED_ASPECTS`, both orientations."""
    sizes = []
    for i in range(n):
        longer = round(side * MIXED_SIDES[int(rng.integers(len(MIXED_SIDES)))])
        shorter = round(longer / MIXED_ASPECTS[int(rng.integers(len(MIXED_ASPECTS)))])
        sizes.append((shorter, longer) if i % 2 == 0 else (longer, shorter))
    return sizes


def make_mixed_photos(folder: Path, n: int, side: int, seed: int = 1) -> dict:
    """``n`` JPEGs of a web-like size mix (:func:`mixed_sizes`), from :func:`make_photos`'s scenes
    resized: what a corpus that is not one collection's few photo sizes looks like. Returns the
    bytes and how many sizes."""
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = _scenes(rng, n, side)
    total = 0
    sizes = mixed_sizes(n, side, rng)
    for i, (h, w) in enumerate(sizes):
        img = cv2.resize(scenes[i % len(scenes)], (w, h), interpolation=cv2.INTER_AREA)
        total += _save_jpeg(folder / f"{i:06d}.jpg", img)
    return {"jpeg_bytes": total, "photo_sizes": len(set(sizes))}


def make_checkpoint(path: Path, head_widths: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    config = ModelConfig(num_classes=len(CLASSES), backbone="tf_efficientnet_lite0", head_widths=head_widths,
                         output_stride=16)
    model, config = create_model(config, pretrained="none")
    save_checkpoint(path, model, config, CLASSES, input_size=320)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(model_path: str, arrays: list[np.ndarray], batch_size: int, device: str,
                 repeats: int, precision: str = "fp32") -> float:
    """images/s of the forward pass alone, as :func:`~weakseg.tasks.segment.forward.predict` runs
    it (same sizes, padding, normalisation, precision, memory layout), batches built and moved to
    the device first."""
    from weakseg.tasks.devices import autocast
    from weakseg.tasks.segment.inference import forward_batches, load_model

    bundle = load_model(model_path, device)
    batches = forward_batches(bundle, arrays, batch_size, 512)
    with torch.inference_mode(), autocast(bundle.device, precision):
        for x in batches:  # warm-up: every batch shape once
            bundle.model.dense_maps(x)
        _sync(bundle.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            for x in batches:
                bundle.model.dense_maps(x)
        _sync(bundle.device)
    return repeats * len(arrays) / (time.perf_counter() - t0)


def _prefect() -> bool:
    try:
        import prefect  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("WEAKSEG_BENCH_ENGINE", "") != "chunks"


def segment(images: str, model: str, out: str, priors: str, device: str, batch_size: int, chunk_size: int,
            workers: int, decode: str = "auto", precision: str = "auto", tta: str = "1",
            host_workers: int | None = None) -> dict:
    """One segment-corpus run: images/s (over the whole call and over the fan-out), stage seconds,
    device-busy fraction."""
    from weakseg.tasks.segment.chunk import SegmentOptions, segment_chunk
    from weakseg.tasks.segment.inputs import iter_chunks
    from weakseg.tasks.segment.priors import parse_priors
    from weakseg.tasks.segment.runs import mean_batch, stage_timing

    t0 = time.perf_counter()
    if _prefect():
        from weakseg.flows.segment_corpus import segment_corpus

        s = segment_corpus(images=images, model=model, out=out, priors=priors, device=device,
                           batch_size=batch_size, chunk_size=chunk_size, workers=workers, thumbnails=0, tta=tta,
                           decode=decode, precision=precision, host_workers=host_workers, return_state=True).result()
        wall = time.perf_counter() - t0
        return {"engine": "flow", "images": s["counts"]["ok"], "failed": s["counts"]["failed"],
                "seconds": round(wall, 3), "images_per_second": round(s["counts"]["ok"] / wall, 2),
                "in_run": round(s["counts"]["ok"] / s["timing"]["fanout_seconds"], 2),
                "stage_seconds": json.loads(s["stage_seconds"]), "device_busy_fraction": s["device_busy_fraction"],
                "mean_batch": s["timing"]["mean_batch"], "host_workers": s["timing"]["host_workers"],
                "precision": s["timing"]["precision"], "tta": tta}
    opts = SegmentOptions(out=out, run_id="bench", run_date="2026-01-01", model=model, device=device,
                          priors=parse_priors(priors), batch_size=batch_size, tta=tta, decode=decode,
                          precision=precision, host_workers=host_workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda spec: segment_chunk(spec, opts), iter_chunks(images, chunk_size)))
    wall = time.perf_counter() - t0
    timing = stage_timing(results, wall)
    ok = sum(r.ok for r in results)
    return {"engine": "chunks", "images": ok, "failed": sum(r.failed for r in results),
            "seconds": round(wall, 3), "images_per_second": round(ok / wall, 2), "in_run": round(ok / wall, 2),
            **timing, "mean_batch": mean_batch(results), "host_workers": max(r.host_workers for r in results),
            "precision": results[0].precision, "tta": tta}


def measured(images: str, model: str, out: str, priors: str, device: str, batch_size: int, chunk_size: int,
             workers: int, bare: float, **kw) -> dict:
    """:func:`segment` with its ratio to the bare forward; a failure is reported, so the other figures stay."""
    try:
        r = segment(images, model, out, priors, device, batch_size, chunk_size, workers, **kw)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    r["ratio_to_bare_forward"] = round(r["images_per_second"] / bare, 3) if bare else None
    r["ratio_in_run"] = round(r["in_run"] / bare, 3) if bare else None
    return r


def host_capacity(images: str, model: str, root: Path, batch_size: int, chunk_size: int, workers: int,
                  host_workers: int | None) -> dict:
    """images/s of the host side alone on this machine: bench/host_pipeline.py's stand-in device at
    zero time, the engine's host workers, for ``ilp`` and ``ilp,sppxl``."""
    from host_pipeline import StandIn  # bench/, on the path as this script's folder

    from weakseg.tasks.segment import chunk

    real, chunk.DeviceStage = chunk.DeviceStage, StandIn
    StandIn.seconds_per_image = 0.0
    try:
        return {priors: measured(images, model, str(root / f"out-capacity-{priors.replace(',', '-')}"), priors,
                                 "cpu", batch_size, chunk_size, workers, 0.0, decode="host",
                                 host_workers=host_workers)
                for priors in ("ilp", "ilp,sppxl")}
    finally:
        chunk.DeviceStage = real


def first_photos(root: Path, name: str, k: int) -> str:
    """A folder ``root/name`` holding copies of the first ``k`` photos."""
    folder = root / name
    folder.mkdir()
    for f in sorted((root / "photos").glob("*.jpg"))[:k]:
        (folder / f.name).write_bytes(f.read_bytes())
    return str(folder)


def steady_state(root: Path, model: str, device: str, batch: int, chunk_size: int, workers: int, n: int,
                 full_seconds: float, bare: float) -> dict:
    """``ilp`` on the first half of the photos too: the second half's marginal rate is the flow's
    rate in a long run, and the intercept its fixed cost per run (server calls, listing, artifacts),
    which a few seconds' corpus cannot amortise on a fast device."""
    half = first_photos(root, "half", n // 2)
    r = segment(half, model, str(root / "out-half"), "ilp", device, batch, chunk_size, workers)
    extra = full_seconds - r["seconds"]
    if extra <= 0:  # too noisy to say (tiny runs)
        return {"half_seconds": r["seconds"], "full_seconds": full_seconds, "images_per_second": None}
    rate = (n - n // 2) / extra
    return {"half_seconds": r["seconds"], "full_seconds": full_seconds, "images_per_second": round(rate, 2),
            "ratio_to_bare_forward": round(rate / bare, 3) if bare else None,
            "fixed_seconds": round(r["seconds"] - (n // 2) / rate, 2)}


def mask_agreement(out_a: str, out_b: str) -> dict:
    """Fraction of mask pixels two runs over the same photos label alike (device vs host decoding)."""
    import cv2

    from weakseg.tasks.segment import tables

    def masks(out: str) -> dict[str, bytes]:
        t = tables.read_table(out, "masks")
        return dict(zip(t.column("image_key").to_pylist(), t.column("mask_png").to_pylist(), strict=True))

    a, b = masks(out_a), masks(out_b)
    same = total = 0
    for key in a.keys() & b.keys():
        ma, mb = (cv2.imdecode(np.frombuffer(m[key], np.uint8), cv2.IMREAD_UNCHANGED) for m in (a, b))
        same += int((ma == mb).sum()) if ma.shape == mb.shape else 0
        total += ma.size
    return {"images_compared": len(a.keys() & b.keys()), "images_only_in_one": len(a.keys() ^ b.keys()),
            "pixel_agreement": round(same / total, 5) if total else None}


def train_speed(device: str, batch_size: int, input_size: int, head_widths: tuple[int, ...], steps: int) -> dict:
    """Samples/s of the trainer's optimiser step on in-memory batches (bf16 + channels_last on CUDA)."""
    try:
        from weakseg.tasks.train.optimizer import make_optimizer
        from weakseg.tasks.train.trainer import _Runtime, optimizer_step
    except ImportError as err:  # webdataset missing: carry its wheels (docs/benchmarks.md)
        return {"error": f"{type(err).__name__}: {err}"}
    dev = resolve_device(device)
    config = ModelConfig(num_classes=len(CLASSES), backbone="tf_efficientnet_lite0", head_widths=head_widths,
                         output_stride=16)
    model, config = create_model(config, pretrained="none")
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    rt = _Runtime(model, model, make_optimizer(model), dev, config.mean, config.std, multilabel=False)
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randint(0, 256, (batch_size, 3, input_size, input_size), dtype=torch.uint8, generator=g),
             "valid": torch.ones(batch_size, 1, input_size, input_size, dtype=torch.bool),
             "target": torch.nn.functional.one_hot(torch.arange(batch_size) % len(CLASSES), len(CLASSES)).float(),
             "errors": []}
    if dev.type == "cuda":
        batch["images"] = batch["images"].pin_memory()

    def batches():
        while True:
            yield batch

    it = batches()
    for _ in range(2):
        optimizer_step(rt, it)
    _sync(dev)
    t0 = time.perf_counter()
    n = sum(optimizer_step(rt, it)["samples"] for _ in range(steps))
    _sync(dev)
    return {"samples_per_second": round(n / (time.perf_counter() - t0), 2), "batch_size": batch_size,
            "input_size": input_size, "steps": steps,
            "precision": "bf16 autocast, channels_last" if dev.type == "cuda" else "fp32"}


def _write(report: dict, out: str) -> None:
    """The figures so far, so a run stopped at its time limit still leaves them."""
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run of every part")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=0, help="photos (default 1024; --quick: 8)")
    p.add_argument("--side", type=int, default=0, help="longer side of the photos (default 500; --quick: 96)")
    p.add_argument("--batch-size", type=int, default=0, help="forward batch (default 64; --quick: 4)")
    p.add_argument("--workers", type=int, default=0, help="chunks in flight (default 2, segment-corpus's default)")
    p.add_argument("--host-workers", type=int, default=None,
                   help="host worker processes (default: the engine's, every core but one on an accelerator)")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    quick = args.quick
    n = args.images or (8 if quick else 1024)
    side = args.side or (96 if quick else 500)
    batch = args.batch_size or (4 if quick else 64)
    workers = args.workers or 2
    head = (32, 32, 32) if quick else (1024, 768, 512)
    device = str(resolve_device(args.device))
    dev = torch.device(device)
    precisions = PRECISIONS if dev.type == "cuda" else ("fp32",)
    default = "bf16" if dev.type == "cuda" else "fp32"  # what --precision auto runs
    report: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "torch": torch.__version__, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "images": n, "side": side, "batch_size": batch, "workers": workers,
                    "host_workers": args.host_workers, "head_widths": list(head), "classes": len(CLASSES),
                    "quick": quick}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report["jpeg_bytes"] = make_photos(root / "photos", n, side)
        model = str(root / "model.pt")
        make_checkpoint(Path(model), head)
        import cv2

        arrays = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in sorted((root / "photos").glob("*.jpg"))]
        bare = {prec: bare_forward(model, arrays, batch, device, 1 if quick else 3, prec) for prec in precisions}
        report["bare_forward_images_per_second"] = {k: round(v, 2) for k, v in bare.items()}
        _write(report, args.out)
        chunk_size = max(batch, -(-n // (2 * workers)))  # at least two chunks per worker
        report["chunk_size"] = chunk_size
        photos = str(root / "photos")
        kw = {"host_workers": args.host_workers}

        def run(name: str, priors: str, precision: str = default, **more) -> dict:
            out = str(root / f"out-{name}".replace(",", "-").replace(" ", "_"))
            return measured(photos, model, out, priors, device, batch, chunk_size, workers, bare.get(precision, 0.0),
                            precision=precision, **kw, **more)

        # starts Prefect's temporary server, the host workers, loads the model, builds the device's kernels
        # (cuDNN's plans for the batch shapes the runs below make, at each precision: one chunk of theirs)
        warm = first_photos(root, "warm-up", chunk_size)
        for prec in precisions:
            try:
                segment(warm, model, str(root / f"out-warm-up-{prec}"), "ilp", device, batch, chunk_size, workers,
                        precision=prec, **kw)
            except Exception as err:  # a Prefect stack that cannot run here: still measure the chunk engine
                if not _prefect():
                    raise
                report["flow_error"] = f"{type(err).__name__}: {err}"
                os.environ["WEAKSEG_BENCH_ENGINE"] = "chunks"
                segment(warm, model, str(root / f"out-warm-up-{prec}"), "ilp", device, batch, chunk_size, workers,
                        precision=prec, **kw)
        report["segment"] = {}
        for prec in precisions:  # ilp at every precision, against the bare forward at the same one
            report["segment"][f"ilp ({prec})"] = run(f"ilp-{prec}", "ilp", prec)
            _write(report, args.out)
        # ilp once more with the other decoder (auto is nvjpeg on CUDA, the host's on CPU): what decoding
        # on the device buys, and that it labels like the host path
        other = "host" if dev.type == "cuda" else "device"
        report["segment"][f"ilp (decode {other})"] = run(f"ilp-{other}", "ilp", decode=other)
        for priors in PRIOR_SETS:
            if priors != "ilp":
                report["segment"][priors] = run(priors, priors)
                _write(report, args.out)
        ilp = report["segment"][f"ilp ({default})"]
        if "error" not in report["segment"][f"ilp (decode {other})"] and "error" not in ilp:
            report["device_vs_host_decode"] = mask_agreement(str(root / f"out-ilp-{default}"),
                                                             str(root / f"out-ilp-{other}"))
        report["segment_defaults"] = {priors: run(f"default-{priors}", priors, "auto", tta="auto")
                                      for priors in ("ilp", "ilp,sppxl")}
        for r in report["segment_defaults"].values():
            if "error" not in r:
                r["ratio_to_bare_forward"] = round(r["images_per_second"] / bare[default], 3)
                r["ratio_in_run"] = round(r["in_run"] / bare[default], 3)
        _write(report, args.out)
        if "error" not in ilp:
            report["ilp_steady_state"] = steady_state(root, model, device, batch, chunk_size, workers, n,
                                                      ilp["seconds"], bare[default])
        report["host_capacity"] = host_capacity(photos, model, root, batch, chunk_size, workers,
                                                args.host_workers if args.host_workers is not None
                                                else max(1, (os.cpu_count() or 2) - 1))
        _write(report, args.out)
        report["train"] = train_speed(device, 8 if quick else 32, 64 if quick else 320, head, 2 if quick else 20)
        _write(report, args.out)
        # last: new forward sizes build new device kernels (cuDNN: ~1 s a shape on an H200), so this may be
        # what a run stopped at its time limit loses
        mixed = make_mixed_photos(root / "mixed", n, side)
        report["ilp_mixed_sizes"] = {**mixed, **measured(str(root / "mixed"), model, str(root / "out-mixed"), "ilp",
                                                         device, batch, chunk_size, workers, bare[default],
                                                         precision=default, **kw)}
    if dev.type == "cuda":
        report["peak_device_memory_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    _write(report, args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
