"""Where segment-corpus's forward stage spends its time on an accelerator (a diagnostic; JSON + op tables).

predict() alone on host arrays and on device-decoded tensors, one chunk inline and with the host
pool, eight chunks side by side (as the flow runs them), and torch.profiler's op table of one chunk.
Then the same photos through segment-corpus's flow and through its chunk task without Prefect
(bench/gpu.py's two engines, 2 chunks in flight). The multi-threaded parts run under
:class:`sampler.StackSampler` (``*_samples``): where each kind of thread (the device's, the host
pool's, the chunks') spends its wall-clock time, waits included. Photos and model as
bench/gpu.py. Writes ``--out`` (JSON) and ``--ops`` (text) as it goes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu import first_photos, make_checkpoint, make_photos, segment  # noqa: E402
from sampler import StackSampler  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--side", type=int, default=500)
    p.add_argument("--head", default="1024,768,512")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--ops", default="ops.txt")
    args = p.parse_args()
    import cv2

    from weakseg.tasks.segment.chunk import STAGES, SegmentOptions, segment_chunk
    from weakseg.tasks.segment.device_decode import decode_jpeg_on
    from weakseg.tasks.segment.inference import load_model, predict
    from weakseg.tasks.segment.inputs import iter_chunks

    dev = torch.device(args.device)
    report: dict = {"torch_threads": torch.get_num_threads()}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def save():
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    def timed(name, fn, repeats=3):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            r = fn()
        sync()
        report[name] = round((time.perf_counter() - t0) / repeats, 4)
        save()
        print(name, report[name], flush=True)
        return r

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photos(root / "photos", args.images, args.side)
        model = str(root / "model.pt")
        make_checkpoint(Path(model), tuple(int(w) for w in args.head.split(",")))
        bundle = load_model(model, str(dev))
        files = sorted((root / "photos").glob("*.jpg"))[:64]
        arrays = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
        tensors = [decode_jpeg_on(f.read_bytes(), dev) for f in files]
        timed("predict_64_host_arrays_s", lambda: predict(bundle, arrays))
        timed("predict_64_device_tensors_s", lambda: predict(bundle, tensors))
        timed("predict_64_host_arrays_probs_s", lambda: [pr.probs() for pr in predict(bundle, arrays)], 1)
        with torch.no_grad():
            timed("model_dense_maps_32x384x512_s", lambda: bundle.model.dense_maps(
                torch.zeros(32, 3, 384, 512, device=dev)))
        specs = list(iter_chunks(str(root / "photos"), 64))

        def opts(name, workers, decode="auto", priors=("ilp",)):
            return SegmentOptions(out=str(root / name), run_id="p", run_date="2026-01-01", model=model,
                                  device=str(dev), priors=priors, batch_size=64, tta="1", decode=decode,
                                  host_workers=workers)

        for workers in (0, 16):
            for decode in ("auto", "host"):
                name = f"chunk_64_workers{workers}_{decode}"
                o = opts(name, workers, decode)
                r = timed(name + "_s", lambda o=o: segment_chunk(specs[0], o, bundle), 1)
                report[name + "_stages"] = {k: round(v, 3) for k, v in r.stage_seconds.items()}
        # chunks side by side, each on a new thread (as the task runner runs them)
        for threads in (1, 2, 8):
            name = f"chunks_8x64_threads{threads}"
            o = opts(name, 16)
            t0 = time.perf_counter()
            with StackSampler() as sampler, concurrent.futures.ThreadPoolExecutor(threads) as pool:
                rs = list(pool.map(lambda s, o=o: segment_chunk(s, o, bundle), specs[:8]))
                sync()
            wall = time.perf_counter() - t0
            report[name] = {"wall_s": round(wall, 3), "images_per_second": round(sum(r.ok for r in rs) / wall, 1),
                            "stages": {k: round(sum(r.stage_seconds[k] for r in rs), 3) for k in STAGES}}
            report[f"threads{threads}_samples"] = sampler.report()
            save()
            print(name, report[name], flush=True)
        # the same photos through segment-corpus's flow and through its chunk task without Prefect
        # (bench/gpu.py's two engines), 2 chunks in flight, each sampled
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        segment(first_photos(root, "warm-up", 64), model, str(root / "out-warm-up"), "ilp", str(dev), 64, 64, 2)
        for engine in ("chunks", "flow"):
            os.environ["WEAKSEG_BENCH_ENGINE"] = engine
            for chunk_size in (64, 256):
                name = f"{engine}_chunk{chunk_size}_workers2"
                with StackSampler() as sampler:
                    report[name] = segment(str(root / "photos"), model, str(root / f"out-{name}"), "ilp", str(dev),
                                           64, chunk_size, 2)
                report[name + "_samples"] = sampler.report()
                save()
                print(name, report[name], flush=True)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            segment_chunk(specs[-1], opts("prof", 16), bundle)
            sync()
        ka = prof.key_averages()
        text = ka.table(sort_by="self_cpu_time_total", row_limit=30)
        if dev.type == "cuda":
            text += "\n\n" + ka.table(sort_by="self_cuda_time_total", row_limit=20)
        Path(args.ops).write_text(text)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
