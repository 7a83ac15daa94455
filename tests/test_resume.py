"""Issue 37 item 10: training and refinement killed mid-epoch (SIGKILL of the real CLI process) and resumed end with
the weights of an uninterrupted run, bit for bit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from weakseg.models import load_checkpoint
from weakseg.tasks.train.shard_reader import write_synthetic_shards
from weakseg.tasks.train.trainer import CHECKPOINT_RE, checkpoint_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict[str, str]:
    """The CLI's environment: this checkout's code, and the test session's Prefect API (no server start per run)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "weakseg.flows.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _kill_after(proc: subprocess.Popen, checkpoint: Path, timeout: float = 600) -> None:
    """SIGKILL the CLI's whole process group (loader workers included) once ``checkpoint`` is written."""
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {checkpoint.name}: {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {checkpoint.name} after {timeout} s")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _steps(out: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := CHECKPOINT_RE.search(p.name)))


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _kill_resume_compare(args: list[str], tmp_path: Path, kill_at: int, spe: int,
                         before_resume: Callable[[Path], None] = lambda _: None) -> Path:
    """The run of ``args`` uninterrupted (``whole``) and killed once step checkpoint ``kill_at`` is written, then
    resumed (``killed``), side by side; the two model.pt files hold the same weights, bit for bit."""
    env = _env(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _cli([*args, "--out", str(whole)], env)
    _kill_after(_cli([*args, "--out", str(killed)], env), killed / checkpoint_name(kill_at))
    assert not (killed / "model.pt").exists()
    assert _steps(killed)[-1] % spe, f"killed at an epoch's end, not in the middle: {_steps(killed)}"
    before_resume(killed)
    _finish(reference)
    _finish(_cli([*args, "--out", str(killed), "--resume"], env))
    _assert_same_weights(whole / "model.pt", killed / "model.pt")
    return killed


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, prefect_harness) -> None:
    shards = tmp_path / "shards"
    write_synthetic_shards(str(shards), n_train=32, n_val=8, size=96, per_shard=8)
    spe = 4
    args = ["train", "--shards", str(shards), "--pretrained", "none", "--epochs", "2", "--steps-per-epoch", str(spe),
            "--batch-size", "4", "--input-size", "144", "--head-widths", "16,16,16", "--num-workers", "2",
            "--shuffle-buffer", "16", "--checkpoint-every", "1", "--keep-checkpoints", "0", "--val-every", "0",
            "--no-progress", "--seed", "3"]
    killed = _kill_resume_compare(args, tmp_path, spe + 1, spe)
    whole, resumed = (load_checkpoint(p / "model.pt").metrics["history"] for p in (tmp_path / "whole", killed))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]  # the epoch rows too


def test_refinement_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, prefect_harness,
                                                                          tiny_checkpoint) -> None:
    """A soup of two, killed in the middle of the second member's first epoch: the first member's weights, the
    second's optimiser, schedule, dropout RNG and data position all come back; the pseudo-labels are not made
    again."""
    shards, model = tmp_path / "shards", tmp_path / "mil.pt"
    manifest = write_synthetic_shards(str(shards), n_train=16, n_val=4, size=96, per_shard=8)
    model.write_bytes(tiny_checkpoint(manifest["classes"], input_size=96))
    spe, epochs = 3, 2
    args = ["refine", "--shards", str(shards), "--model", str(model), "--epochs", str(epochs), "--steps-per-epoch",
            str(spe), "--batch-size", "4", "--input-size", "96", "--soup", "2", "--num-workers", "1",
            "--checkpoint-every", "1", "--tta", "1", "--max-side", "96", "--device", "cpu", "--no-progress",
            "--seed", "5", "--rounds", "1"]
    labels: dict[Path, int] = {}

    def refused_without_resume(killed: Path) -> None:
        """Without --resume the unfinished refinement is refused before its pseudo-labels are overwritten."""
        from weakseg.flows.refine_mil import refine_mil

        labels.update({p: p.stat().st_mtime_ns for p in (killed / "pseudo-labels").iterdir()})
        options = dict(zip(args[1::2], args[2::2], strict=False))
        with pytest.raises(ValueError, match="--resume"):
            refine_mil(shards=str(shards), model=str(model), out=str(killed), tta="1", max_side=96,
                       epochs=int(options["--epochs"]), rounds=1, progress=False)

    killed = _kill_resume_compare(args, tmp_path, epochs * spe + 1, spe, refused_without_resume)
    assert labels and {p: p.stat().st_mtime_ns for p in (killed / "pseudo-labels").iterdir()} == labels  # reused
    assert not _steps(killed)  # the step checkpoints go once model.pt is written
    whole, resumed = (load_checkpoint(p / "model.pt").metrics["history"] for p in (tmp_path / "whole", killed))
    assert resumed == whole  # every member's every epoch, losses included
