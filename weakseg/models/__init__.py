"""Torch modules of weakseg: backbones, the MIL head, LSE aggregation, losses, checkpoints.

Torch only: nothing here knows about Prefect or object storage.
"""
from .backbone import Backbone, create_backbone
from .checkpoint import Checkpoint, CheckpointError, checkpoint_bytes, load_checkpoint, save_checkpoint
from .head import DEFAULT_HEAD_WIDTHS, MILHead
from .losses import ImageLoss, image_prior_for, image_probabilities, labels_to_target, mil_loss
from .lse import LSEPool, lse_pool
from .network import ModelConfig, WeakSegNet, create_model

__all__ = [
    "DEFAULT_HEAD_WIDTHS",
    "Backbone",
    "Checkpoint",
    "CheckpointError",
    "ImageLoss",
    "LSEPool",
    "MILHead",
    "ModelConfig",
    "WeakSegNet",
    "checkpoint_bytes",
    "create_backbone",
    "create_model",
    "image_prior_for",
    "image_probabilities",
    "labels_to_target",
    "load_checkpoint",
    "lse_pool",
    "mil_loss",
    "save_checkpoint",
]
