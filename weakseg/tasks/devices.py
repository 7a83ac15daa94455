"""Which torch device a run uses and in which number format (one rule for training and inference),
and the one thread that feeds an accelerator its forward passes."""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["PRECISIONS", "TRAIN_PRECISIONS", "autocast", "check_precision", "device_thread", "native_bf16",
           "on_device_thread", "resolve_device", "resolve_precision", "uses_device_thread"]

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but torch sees no CUDA device; use --device auto or cpu")
    return device


PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
TRAIN_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")  # fp16 would need loss scaling to train
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """``precision`` when it is one of ``allowed`` (training's: :data:`TRAIN_PRECISIONS`), else a ValueError."""
    if precision not in allowed:
        why = " (training in fp16 would need loss scaling)" if precision in PRECISIONS else ""
        raise ValueError(f"precision must be one of {', '.join(allowed)}, not {precision!r}{why}")
    return precision


def resolve_precision(precision: str, device: torch.device, allowed: tuple[str, ...] = PRECISIONS) -> str:
    """The number format of the network's layers: ``auto`` is bf16 autocast on CUDA, fp32 elsewhere.

    bf16 on the CPU is a choice, never a default: it is faster only where the CPU multiplies bf16
    natively (:func:`native_bf16`); elsewhere it is emulated, and no faster than fp32.
    """
    if check_precision(precision, allowed) == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the network's layers (torch's autocast) of a resolved ``precision``; fp32 as it is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def native_bf16() -> bool:
    """Whether this machine's CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16), where bf16
    autocast makes the CPU's convolutions faster (1.4-1.6x for training EfficientNet-Lite0 here, bench/train.py)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without the probes: assume not
        return False


# Why one thread per accelerator: PyTorch caches cuDNN's execution plans per thread (pytorch
# #103939), so the first forward pass of each input shape on a new thread builds a plan for every
# convolution, holding the GIL. segment-corpus's chunks run on the task runner's threads, new ones
# each run: on an H200 that held it at 39 images/s against 1,067 for the bare forward pass (2.4 s
# a thread for the paper's network at two shapes; bench/gpu_profile.py). On one long-lived thread
# every plan is built once per process, and the forward passes reach the device in one stream of
# submissions, which is how it runs them anyway. The CPU keeps running them on the caller's
# thread: oneDNN has no such cache and chunks side by side share its cores.
_THREADS: dict[tuple[int, torch.device], ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
_LOCAL = threading.local()


def uses_device_thread(device: torch.device) -> bool:
    """Whether forward passes on ``device`` go through :func:`on_device_thread` (accelerators)."""
    return device.type != "cpu"


def _mark() -> None:
    _LOCAL.device_thread = True


def device_thread(device: torch.device) -> ThreadPoolExecutor:
    """``device``'s own thread (made on first use, one per process and device): where segment-corpus
    runs every batch's forward pass and post-processing, so the chunks' host work overlaps them
    and the batches of all chunks reach the device one after the other, as it runs them anyway."""
    key = (os.getpid(), device)  # a forked child gets its own thread, not the parent's dead one
    with _LOCK:
        pool = _THREADS.get(key)
        if pool is None:
            pool = _THREADS[key] = ThreadPoolExecutor(1, thread_name_prefix=f"weakseg-{device}",
                                                      initializer=_mark)
        return pool


def on_device_thread(device: torch.device, fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on ``device``'s own thread (:func:`device_thread`), waiting for it;
    exceptions come back as raised. A call from that thread runs in place."""
    if getattr(_LOCAL, "device_thread", False):
        return fn(*args, **kwargs)
    return device_thread(device).submit(fn, *args, **kwargs).result()
