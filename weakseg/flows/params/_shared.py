"""What more than one flow's parameters use, without torch or Prefect.

*Mirrors* are defaults that the modules doing the work define too, behind torch imports the
command line must not pay for; ``tests/test_params.py`` holds each equal to its original, so
a change made in one place only fails there.
"""
from __future__ import annotations

from typing import Literal

__all__ = ["DEFAULT_MAX_SIDE", "PSEUDO_LABEL_TTA", "REFINE_BACKBONE_LR_SCALE", "REFINE_CHECKPOINT_EVERY", "REFINE_LR",
           "REFINE_OUTPUT_STRIDE", "REFINE_ROUNDS", "REFINE_SCALE", "REFINE_SOUP", "TRAIN_AVERAGE_EPOCHS",
           "BackgroundMode", "MultiLabelLoss", "TaskRunnerKind"]

TaskRunnerKind = Literal["threads", "dask"]  # where fanned-out tasks run (weakseg.flows._runners)

# mirrors
DEFAULT_MAX_SIDE = 512  # weakseg.tasks.segment.inference.DEFAULT_MAX_SIDE
PSEUDO_LABEL_TTA = "1,2+flip"  # weakseg.tasks.train.pseudo_labels.PSEUDO_LABEL_TTA
MultiLabelLoss = Literal["softmax", "bce", "softmax+bce"]  # weakseg.models.losses.MultiLabelLoss
BackgroundMode = Literal["auto", "every-image", "as-tagged"]  # weakseg.models.losses.BackgroundMode
TRAIN_AVERAGE_EPOCHS = 2  # weakseg.tasks.train.trainer.TrainConfig.average_epochs
REFINE_LR = 2e-3  # weakseg.tasks.train.refine.RefineConfig.lr
REFINE_SCALE = (0.8, 1.2)  # RefineConfig.scale
REFINE_SOUP = 2  # RefineConfig.soup
REFINE_ROUNDS = 1  # refine-mil --rounds: a second round was a wash on MSRC-21-objects dev with Lite2 (docs/method.md)
REFINE_BACKBONE_LR_SCALE = 1.0  # RefineConfig.backbone_lr_scale
REFINE_OUTPUT_STRIDE = None  # RefineConfig.output_stride
REFINE_CHECKPOINT_EVERY = 1000  # RefineConfig.checkpoint_every
