"""The accelerator's one forward thread (weakseg.tasks.devices): every caller's work runs on the same
long-lived thread, results and exceptions come back, and nothing deadlocks from inside it."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from weakseg.tasks.devices import on_device_thread, uses_device_thread

CPU = torch.device("cpu")


def test_accelerators_use_the_device_thread_and_the_cpu_does_not():
    assert uses_device_thread(torch.device("cuda")) and uses_device_thread(torch.device("cuda", 1))
    assert uses_device_thread(torch.device("mps")) and not uses_device_thread(CPU)


def test_every_callers_work_runs_on_one_long_lived_thread():
    def where(i: int) -> tuple[int, int, str]:
        return i, threading.get_ident(), threading.current_thread().name

    with ThreadPoolExecutor(4) as callers:  # like the task runner's threads, several at once
        done = list(callers.map(lambda i: on_device_thread(CPU, where, i), range(16)))
    later = ThreadPoolExecutor(1).submit(on_device_thread, CPU, where, 99).result()  # a fresh caller thread
    assert [i for i, *_ in done] == list(range(16))
    assert len({ident for _, ident, _ in [*done, later]}) == 1
    assert done[0][1] != threading.get_ident() and done[0][2].startswith("weakseg-cpu")


def test_results_exceptions_and_nested_calls():
    assert np.array_equal(on_device_thread(CPU, np.add, np.arange(3), 1), [1, 2, 3])
    with pytest.raises(ValueError, match="bad batch"):
        on_device_thread(CPU, lambda: (_ for _ in ()).throw(ValueError("bad batch")))
    inner = on_device_thread(CPU, lambda: on_device_thread(CPU, threading.get_ident))  # runs in place
    assert inner == on_device_thread(CPU, threading.get_ident)


def _forward_threads(bundle, images) -> tuple[set[int], set[int], list]:
    """The threads the model's forward passes ran on, and those that called predict (new threads)."""
    from weakseg.tasks.segment.inference import predict

    seen: set[int] = set()
    hook = bundle.model.register_forward_hook(lambda *_: seen.add(threading.get_ident()))
    try:
        with ThreadPoolExecutor(3) as callers:
            done = list(callers.map(lambda im: (threading.get_ident(), predict(bundle, [im])), images))
    finally:
        hook.remove()
    return seen, {ident for ident, _ in done}, [pred for _, pred in done]


def _bundle(tmp_path, tiny_checkpoint, device: str):
    from weakseg.tasks.segment.inference import load_model

    path = tmp_path / "model.pt"
    path.write_bytes(tiny_checkpoint(["background", "disk", "square"], 0))
    return load_model(str(path), device)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(3)]


def test_on_the_cpu_each_caller_runs_its_own_forward(tmp_path, tiny_checkpoint):
    seen, callers, _ = _forward_threads(_bundle(tmp_path, tiny_checkpoint, "cpu"), _images())
    assert seen == callers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; runs on a GPU machine only")
def test_on_cuda_every_callers_forward_runs_on_the_device_thread(tmp_path, tiny_checkpoint):
    from weakseg.tasks.segment.inference import predict

    bundle = _bundle(tmp_path, tiny_checkpoint, "cuda")
    images = _images()
    seen, callers, preds = _forward_threads(bundle, images)
    assert len(seen) == 1 and not seen & callers and threading.get_ident() not in seen
    for im, pred in zip(images, preds, strict=True):
        torch.testing.assert_close(pred[0].cells, predict(bundle, [im])[0].cells)


def test_precision_rules_and_autocast():
    from weakseg.tasks.devices import TRAIN_PRECISIONS, autocast, native_bf16, resolve_precision

    assert resolve_precision("auto", CPU) == "fp32" and resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp16", CPU) == "fp16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, not 'fp16'"):
        resolve_precision("fp16", CPU, TRAIN_PRECISIONS)  # training has no loss scaling
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    assert isinstance(native_bf16(), bool)


def test_training_configs_refuse_fp16():
    from weakseg.tasks.train.refine import RefineConfig
    from weakseg.tasks.train.trainer import TrainConfig

    for config in (TrainConfig, RefineConfig):
        assert config(precision="bf16").precision == "bf16"
        with pytest.raises(ValueError, match="fp16 would need loss scaling"):
            config(precision="fp16")


def test_a_training_runtime_resolves_its_precision_as_training_does():
    """Benches build the trainer's runtime without a precision: auto, bf16 on CUDA as before the option."""
    from weakseg.tasks.train.trainer import _Runtime

    def runtime(device: str, **precision) -> _Runtime:
        return _Runtime(None, None, None, torch.device(device), (0.0,), (1.0,), False, **precision)

    assert runtime("cuda").precision == "bf16" and runtime("cpu").precision == "fp32"
    assert runtime("cpu", precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="fp16 would need loss scaling"):
        runtime("cpu", precision="fp16")
