"""Self-describing checkpoints: one file, ``torch.load(..., weights_only=True)`` safe.

A checkpoint holds the state dict and everything needed to rebuild and use the model:
class names in index order, the architecture config (backbone, head widths, r, output
stride), input size and normalisation, the shard manifest it was trained on, training
metrics and the weakseg version. Only plain Python types and tensors are stored, so no
pickle code runs on load.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import torch

from .. import __version__
from .._atomic import atomic_write
from .network import ModelConfig, WeakSegNet, create_model

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "weakseg.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that cannot be used as a weakseg checkpoint, with the reason."""


@dataclass
class Checkpoint:
    model: WeakSegNet
    config: ModelConfig
    classes: list[str]
    input_size: int
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] = field(default_factory=dict)
    weakseg_version: str = ""
    created_at: str = ""


def _payload(
    model: WeakSegNet,
    config: ModelConfig,
    classes: Sequence[str],
    input_size: int,
    manifest: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
    training_state: dict[str, Any] | None,
) -> dict[str, Any]:
    if len(classes) != config.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {config.num_classes} classes")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weakseg_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": list(classes),
        "config": config.to_dict(),
        "input_size": int(input_size),
        "manifest": dict(manifest or {}),
        "metrics": dict(metrics or {}),
        "training_state": dict(training_state or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_checkpoint(
    f: str | os.PathLike | IO[bytes],
    model: WeakSegNet,
    config: ModelConfig,
    classes: Sequence[str],
    *,
    input_size: int,
    manifest: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint; a path is written atomically (temp file + rename)."""
    payload = _payload(model, config, classes, input_size, manifest, metrics, training_state)
    if not isinstance(f, str | os.PathLike):
        torch.save(payload, f)
        return
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(f, buf.getvalue())


def checkpoint_bytes(model: WeakSegNet, config: ModelConfig, classes: Sequence[str], **meta: Any) -> bytes:
    """The checkpoint as bytes, for writers that put whole objects (object storage)."""
    buf = io.BytesIO()
    save_checkpoint(buf, model, config, classes, **meta)
    return buf.getvalue()


def _read(f: str | os.PathLike | IO[bytes], name: str) -> dict[str, Any]:
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: no such checkpoint file") from None
    except Exception as err:  # zip, unpickling and weights_only errors all mean the same here
        raise CheckpointError(
            f"{name}: cannot be read as a checkpoint (truncated, corrupt, or not a torch file "
            f"of plain tensors): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{name}: not a weakseg checkpoint (no format marker {FORMAT!r}; a bare state dict "
            "or another project's file?)"
        )
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{name}: checkpoint format version {version!r} is newer than this weakseg "
            f"({__version__}) understands ({FORMAT_VERSION}); upgrade weakseg"
        )
    missing = [k for k in ("classes", "config", "state_dict", "input_size") if k not in obj]
    if missing:
        raise CheckpointError(f"{name}: checkpoint lacks {missing}")
    return obj


def load_checkpoint(f: str | os.PathLike | IO[bytes], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model from the file alone (no network, no pretrained download)."""
    name = str(f) if isinstance(f, str | os.PathLike) else getattr(f, "name", "<stream>")
    obj = _read(f, name)
    try:
        config = ModelConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{name}: bad model config in checkpoint: {err}") from err
    if len(obj["classes"]) != config.num_classes:
        raise CheckpointError(f"{name}: {len(obj['classes'])} class names for {config.num_classes} classes")
    model, config = create_model(config, pretrained="none")  # an old config without cell_offset: measured
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{name}: weights do not match the stored architecture: {err}") from err
    model.to(map_location).eval()
    return Checkpoint(
        model=model,
        config=config,
        classes=list(obj["classes"]),
        input_size=int(obj["input_size"]),
        manifest=obj.get("manifest", {}),
        metrics=obj.get("metrics", {}),
        training_state=obj.get("training_state", {}),
        weakseg_version=obj.get("weakseg_version", ""),
        created_at=obj.get("created_at", ""),
    )
