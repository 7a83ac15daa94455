"""segment-corpus throughput, host-side cost per prior set, memory, skip-existing. Prints JSON (not a test).

1. End-to-end images/s of the flow (list, read, decode, forward, post-processing, priors,
   PNG masks, Parquet) next to the bare forward pass of the same model on the same images,
   already decoded and batched, in the same run; ratio = flow / bare (targets of issue 15 on
   the CPU: >= 0.9 with ``--priors ilp``, >= 0.8 with ``ilp,sppxl``). JPEG photo crops of
   320-500 px, the paper's head (1024/768/512), one chunk; each flow run is paired with a bare
   run just before it. The flow runs with the host pool the engine picks (``auto``: inline on
   a CPU device) and with ``--pool-threads`` threads (``WEAKSEG_HOST_WORKERS``).
   "images_per_second" is measured around the whole flow call (Prefect run creation,
   listing, runs row, artifacts included); "in_run" is the flow's own count / duration.
2. Host-side work per image and prior set (decode, the priors' inputs: superpixels, box and
   segment proposals, the PNG mask): images/s on one core (one worker process) and the
   scaling from 1 to 2 worker processes (``concurrent.futures.ProcessPoolExecutor``) and
   from 1 to 2 threads (``ThreadPoolExecutor``, as the engine's host pool runs it), so the
   cores a device needs for a given rate can be read off.
3. Peak RSS of the flow process for ``--rss-sizes`` images (1,000 and 10,000 by default),
   each in a separate subprocess (``resource.getrusage``): it must stay flat, since the
   listing is streamed in chunks and only the chunks in flight are held.
4. ``--skip-existing`` over an unchanged corpus of ``--skip-images`` images (10,000 is the
   nightly case of issue 15; 1,000 by default): wall time and image bytes read (opens of
   corpus files through fsspec, and the process's ``rchar`` from /proc), listed from the
   folder (listing metadata: nothing should be read) and from a text manifest of the same
   files (no metadata: every image read and hashed, as before). ``--only-skip`` runs just this.

Parts 3 and 4 use small images (64-96 px crops) and a 32/32/32 head to keep them to minutes.
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

import cv2
import numpy as np
import torch
from PIL import Image

from weakseg.models import ModelConfig, create_model, save_checkpoint
from weakseg.tasks.segment.encode import regions
from weakseg.tasks.segment.hostpool import HOST_WORKERS_ENV
from weakseg.tasks.segment.inference import compute_prior_inputs, forward_batches, load_model, predict
from weakseg.tasks.segment.postprocess import band_bytes, label_batch

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded 2-core machine

CLASSES = ["background", *[f"class{i:02d}" for i in range(20)]]  # 21, like PASCAL VOC
PHOTO_SIZES = [(375, 500), (500, 375), (333, 500), (500, 333), (320, 480), (480, 320), (400, 400)]
HEAD = (1024, 768, 512)  # the paper's head, for the throughput comparison


def make_images(folder: Path, n: int, seed: int = 0, sides: tuple[int, int] = (64, 96)) -> None:
    """``n`` JPEG crops of scikit-image's sample photos, ``sides`` px a side (64-96 by default):
    small sides are 2x-downscaled crops of any size in range; photo-sized ones (320-500) take the
    common photo sizes of :data:`PHOTO_SIZES`, crops resized by at most 1.6x."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        if sides[1] <= 128:
            h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        else:  # the sizes photo collections come in (VOC, MSRC: 500x375, 375x500, 500x333, ...)
            h, w = PHOTO_SIZES[int(rng.integers(len(PHOTO_SIZES)))]
        zoom = 2.0 if sides[1] <= 128 else min(1.0, (photo.shape[0] - 1) / h, (photo.shape[1] - 1) / w)
        ch, cw = int(h * zoom), int(w * zoom)
        y, x = int(rng.integers(0, photo.shape[0] - ch)), int(rng.integers(0, photo.shape[1] - cw))
        crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h))
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        crop.save(sub / f"{i:06d}.jpg", quality=90)


def make_checkpoint(path: Path, backbone: str, head_widths: tuple[int, int, int] = (32, 32, 32)) -> None:
    torch.manual_seed(0)
    config = ModelConfig(num_classes=len(CLASSES), backbone=backbone, head_widths=head_widths, output_stride=16)
    model, config = create_model(config, pretrained="none")
    save_checkpoint(path, model, config, CLASSES, input_size=96)


def run_flow(images: str, model: str, out: str, **kw) -> dict:
    from weakseg.flows.segment_corpus import segment_corpus

    state = segment_corpus(images=images, model=model, out=out, return_state=True, device="cpu", thumbnails=0, **kw)
    return state.result()


def bare_forward(model_path: str, arrays: list[np.ndarray], batch_size: int, max_side: int) -> float:
    """images/s of the forward pass alone: batches of one input shape (as the flow buckets them)
    of up to ``batch_size`` images, built (resized, padded to the stride, normalised) beforehand."""
    bundle = load_model(model_path, "cpu")
    batches = forward_batches(bundle, arrays, batch_size, max_side)
    with torch.no_grad():
        for x in batches:  # warm-up over every batch shape (oneDNN builds kernels per shape), as the flow's is
            bundle.model.dense_maps(x)
        t0 = time.perf_counter()
        for x in batches:
            bundle.model.dense_maps(x)
    return len(arrays) / (time.perf_counter() - t0)


def prior_costs(model_path: str, arrays: list[np.ndarray]) -> dict[str, float]:
    bundle = load_model(model_path, "cpu")
    preds = predict(bundle, arrays)
    totals = {"sppxl": 0.0, "bb": 0.0, "seg": 0.0, "labels_ilp": 0.0, "labels_ilp_sppxl": 0.0}
    for rgb, pred in zip(arrays, preds, strict=True):
        _, ms = compute_prior_inputs(rgb, ("sppxl", "bb", "seg"))
        for k in ("sppxl", "bb", "seg"):
            totals[k] += ms[k]
        for name, priors in (("labels_ilp", ("ilp",)), ("labels_ilp_sppxl", ("ilp", "sppxl"))):
            inputs, _ = compute_prior_inputs(rgb, priors)
            t0 = time.perf_counter()
            out = label_batch([pred], [inputs], priors, {}, len(bundle.classes), bundle.background_index,
                              bundle.device, band_bytes(bundle.device))[0]
            regions(out.labels.size, out.counts, out.prob_sum, out.boxes, pred.image_probs, bundle.classes)
            totals[name] += (time.perf_counter() - t0) * 1000
    return {k: round(v / len(arrays), 2) for k, v in totals.items()}


PRIOR_SETS = ("none", "ilp", "ilp,sppxl", "ilp,sppxl,seg", "ilp,bb")


def host_job(paths: list[str], priors: str) -> int:
    """What the host does per image for ``priors`` (decode, the priors' inputs, the PNG mask);
    runs in a worker process. The mask is a one-object class map (a PNG size like a real mask's)."""
    from weakseg.tasks.images import decode_image
    from weakseg.tasks.segment.encode import encode_mask
    from weakseg.tasks.segment.priors import parse_priors

    cv2.setNumThreads(1)
    chain = parse_priors(priors)
    for path in paths:
        rgb = np.asarray(decode_image(Path(path).read_bytes()).image)
        compute_prior_inputs(rgb, chain)
        h, w = rgb.shape[:2]
        labels = np.zeros((h, w), np.uint8)
        labels[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1 + len(path) % 20
        encode_mask(labels)
    return len(paths)


def host_throughput(paths: list[str], repeats: int) -> dict:
    """Host-side images/s per prior set with 1 and 2 worker processes and with 1 and 2 threads
    (the engine's own pool), best of ``repeats``, and the 1 -> 2 scaling of each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    out = {}
    ctx = multiprocessing.get_context("spawn")
    pools = {"process": lambda n: ProcessPoolExecutor(n, mp_context=ctx), "thread": ThreadPoolExecutor}
    for kind, make in pools.items():
        for n in (1, 2):
            with make(n) as pool:
                list(pool.map(host_job, [paths[:2]] * n, ["ilp,sppxl,seg,bb"] * n))  # imports, warm caches
                for priors in PRIOR_SETS:
                    best = 0.0
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        done = sum(pool.map(host_job, [paths[i::n] for i in range(n)], [priors] * n))
                        best = max(best, done / (time.perf_counter() - t0))
                    out.setdefault(priors, {})[f"images_per_second_{n}_{kind}"] = round(best, 1)
    for r in out.values():
        r["ms_per_image_one_core"] = round(1000 / r["images_per_second_1_process"], 1)
        for kind, plural in (("process", "processes"), ("thread", "threads")):
            one, two = r[f"images_per_second_1_{kind}"], r[f"images_per_second_2_{kind}"]
            r[f"scaling_1_to_2_{plural}"] = round(two / one, 2)
    return out


def rss_child(n: int, backbone: str, chunk_size: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "images", n)
        make_checkpoint(root / "model.pt", backbone)
        t0 = time.perf_counter()
        summary = run_flow(str(root / "images"), str(root / "model.pt"), str(root / "out"), priors="ilp",
                           chunk_size=chunk_size, batch_size=batch_size, workers=2)
        print(json.dumps({"images": n, "ok": summary["counts"]["ok"], "seconds": round(time.perf_counter() - t0, 1),
                          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def _rchar() -> int:
    """Bytes this process has read through read() calls (all files, sockets; /proc/self/io), 0 where unknown."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])
    except (OSError, StopIteration):
        return 0


def skip_existing(n: int, backbone: str, chunk_size: int, batch_size: int) -> dict:
    """A --skip-existing run over an unchanged corpus: wall time and image bytes read, from the
    folder's listing (metadata) and from a manifest (no metadata: read and hash every image)."""
    from fsspec.implementations.local import LocalFileSystem

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "images", n)
        make_checkpoint(root / "model.pt", backbone)
        corpus, model, out = str(root / "images"), str(root / "model.pt"), str(root / "out")
        paths = sorted((root / "images").rglob("*.jpg"))
        (root / "list.txt").write_text("".join(f"{p}\n" for p in paths))
        t0 = time.perf_counter()
        first = run_flow(corpus, model, out, priors="none", chunk_size=chunk_size, batch_size=batch_size, workers=2)
        report = {"images": n, "corpus_bytes": sum(p.stat().st_size for p in paths),
                  "first_run": {"ok": first["counts"]["ok"], "seconds": round(time.perf_counter() - t0, 1)}}
        opened: list[str] = []
        original = LocalFileSystem._open

        def counting(self, path, *args, **kwargs):
            if str(path).startswith(corpus):
                opened.append(str(path))
            return original(self, path, *args, **kwargs)

        LocalFileSystem._open = counting
        try:
            for name, images in (("listing", corpus), ("manifest", str(root / "list.txt"))):
                opened.clear()
                rchar, t0 = _rchar(), time.perf_counter()
                s = run_flow(images, model, out, priors="none", chunk_size=chunk_size, batch_size=batch_size,
                             workers=2, skip_existing=True)
                report[name] = {"seconds": round(time.perf_counter() - t0, 2), "skipped": s["counts"]["skipped"],
                                "ok": s["counts"]["ok"], "images_opened": len(opened),
                                "image_bytes_read": sum(os.path.getsize(p) for p in opened),
                                "process_bytes_read": _rchar() - rchar}
        finally:
            LocalFileSystem._open = original
        return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images (320-500 px) for the throughput comparison")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--model", default="", help="a trained checkpoint instead of random weights (parts 1 and 2): "
                   "on the CPU post-processing is cheaper on a trained model's smooth maps (postprocess.py)")
    p.add_argument("--prior-images", type=int, default=24)
    p.add_argument("--priors", default="ilp;ilp,sppxl", help="';'-separated prior chains of the flow runs")
    p.add_argument("--pool-threads", type=int, default=2, help="flow runs with this host pool too (0: only auto)")
    p.add_argument("--host-only", action="store_true", help="only the host-side throughput per prior set")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rss-sizes", default="1000,10000", help="comma list; empty to skip")
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--skip-images", type=int, default=1000,
                   help="corpus size of the --skip-existing run (10000: the nightly case); 0 to skip it")
    p.add_argument("--only-skip", action="store_true", help="run only the --skip-existing measurement")
    args = p.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.backbone, args.chunk_size, args.batch_size)
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.only_skip:
        print(json.dumps({"skip_existing": skip_existing(args.skip_images, args.backbone, 512, args.batch_size)},
                         indent=2))
        return
    report: dict = {"device": "cpu", "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(),
                    "backbone": args.backbone, "head_widths": list(HEAD), "classes": len(CLASSES),
                    "image_side": "320-500 px JPEG photo crops", "batch_size": args.batch_size,
                    "chunk_size": args.chunk_size}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "images", args.images, sides=(320, 500))
        model = args.model or str(root / "model.pt")
        if args.model:
            cfg = load_model(model, "cpu").checkpoint.config
            report.update(model=args.model, backbone=cfg.backbone, head_widths=list(cfg.head_widths))
        else:
            make_checkpoint(Path(model), args.backbone, HEAD)
        paths = sorted((root / "images").rglob("*.jpg"))
        arrays = [np.asarray(Image.open(f).convert("RGB")) for f in paths]
        if args.host_only:
            report["host_side"] = host_throughput([str(p) for p in paths], args.repeats)
            print(json.dumps(report, indent=2))
            return
        run_flow(str(root / "images" / "000"), model, str(root / "warm-up"), priors="ilp", chunk_size=16,
                 batch_size=args.batch_size, tta="1")  # starts the temporary Prefect server, loads the model
        bare_runs: list[float] = []
        flows: dict[str, dict] = {}
        pools = ["auto", *([str(args.pool_threads)] if args.pool_threads else [])]
        for rep in range(args.repeats):  # each flow run paired with a bare run just before: the box may be shared
            for pool in pools:
                for priors in args.priors.split(";"):
                    bare = bare_forward(model, arrays, args.batch_size, 512)
                    bare_runs.append(bare)
                    if pool == "auto":
                        os.environ.pop(HOST_WORKERS_ENV, None)
                    else:
                        os.environ[HOST_WORKERS_ENV] = pool
                    t0 = time.perf_counter()
                    s = run_flow(str(root / "images"), model, str(root / f"out-{rep}-{pool}-{priors}"),
                                 priors=priors, batch_size=args.batch_size, chunk_size=args.chunk_size, workers=1,
                                 tta="1")  # the bare forward's one plain view (the command's default is "2")
                    wall = s["counts"]["ok"] / (time.perf_counter() - t0)
                    os.environ.pop(HOST_WORKERS_ENV, None)
                    runs = flows.setdefault(f"host_pool={pool},priors={priors}", [])
                    runs.append({"images_per_second": round(wall, 2), "in_run": round(s["images_per_second"], 2),
                                 "bare_forward": round(bare, 2), "ratio": round(wall / bare, 3),
                                 "ratio_in_run": round(s["images_per_second"] / bare, 3),
                                 "stage_seconds": json.loads(s["stage_seconds"]),
                                 "device_busy_fraction": s["device_busy_fraction"],
                                 "mean_batch": s["timing"]["mean_batch"]})
        report["throughput"] = {
            "images": args.images, "repeats": args.repeats,
            "bare_forward_images_per_second_median": round(float(np.median(bare_runs)), 2),
            "flow": {k: {"ratio_median": float(np.median([r["ratio"] for r in v])),
                         "ratio_in_run_median": float(np.median([r["ratio_in_run"] for r in v])), "runs": v}
                     for k, v in flows.items()},
        }
        report["prior_ms_per_image"] = prior_costs(model, arrays[: args.prior_images])
        report["host_side"] = host_throughput([str(p) for p in paths], args.repeats)
    rss = {}
    for n in [int(v) for v in args.rss_sizes.split(",") if v.strip()]:
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--backbone", args.backbone,
                              "--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True)
        rss[str(n)] = json.loads(out.stdout.strip().splitlines()[-1])
    if rss:
        report["peak_rss"] = rss
    if args.skip_images:
        report["skip_existing"] = skip_existing(args.skip_images, args.backbone, 512, args.batch_size)
    report["gpu"] = "pending (no GPU in this session)"
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
