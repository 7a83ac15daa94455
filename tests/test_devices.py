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
