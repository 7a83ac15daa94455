"""The ``gpu`` concurrency slot against a real Prefect server: taken only where the limit exists."""
from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound

from weakseg.flows._gpu import gpu_slot, limit_slot


def _limit(name: str):
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def _create(name: str, active: bool) -> None:
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2, active=active))


def test_a_slot_is_held_while_the_block_runs_where_the_limit_exists(prefect_harness):
    _create("weakseg-test-gpu", active=True)
    with limit_slot("weakseg-test-gpu"):
        assert _limit("weakseg-test-gpu").active_slots == 1
    assert _limit("weakseg-test-gpu").active_slots == 0


def test_no_limit_or_an_inactive_one_takes_nothing_and_creates_nothing(prefect_harness):
    ran = []
    with limit_slot("weakseg-test-absent"):
        ran.append(True)
    assert ran == [True]
    with pytest.raises(ObjectNotFound):
        _limit("weakseg-test-absent")
    _create("weakseg-test-off", active=False)
    with limit_slot("weakseg-test-off"):
        assert _limit("weakseg-test-off").active_slots == 0


def test_cpu_runs_need_no_server():
    with gpu_slot("cpu"):  # no Prefect API reachable or asked
        pass
