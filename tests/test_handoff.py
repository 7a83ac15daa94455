"""Shared-memory hand-off between the flow's process and its host workers (segment/handoff.py)."""
from __future__ import annotations

import resource
import signal

import numpy as np

from weakseg.tasks.segment import handoff


def test_slots_shrink_to_what_the_shared_memory_can_hold(tmp_path):
    """A ``/dev/shm`` too small for every slot (here: a file-size limit of 10 MiB) gets as many as fit
    (halving), not none; the slots work as usual."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, hard))
    try:
        slots = handoff.Slots.create(str(tmp_path), 2**20, 64)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert slots is not None and slots.count == 8
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    slot = slots.take()
    packed = handoff.pack({"0": labels, "1": labels + 1}, slot, slots, str(tmp_path))
    assert packed.slot == slot
    back = handoff.unpack(packed, slots)
    assert (back["0"] == labels).all() and (back["1"] == labels + 1).all()
    slots.close()


def test_no_slots_where_not_even_a_few_fit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        assert handoff.Slots.create(str(tmp_path), 2**20, 64) is None
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
