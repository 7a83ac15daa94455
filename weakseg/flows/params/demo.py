"""The parameters of the demo (``weakseg demo``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = ["demo"]


def demo(
    workdir: Annotated[str, Field(description="where everything is written (reused on a second run)")] = "demo-output",
    n_train: Annotated[int, Field(ge=16, description="synthetic training images")] = 400,
    n_val: Annotated[int, Field(ge=4, description="synthetic validation images (the scored ones)")] = 48,
    size: Annotated[int, Field(ge=64, description="image side in pixels")] = 160,
    epochs: Annotated[int, Field(ge=1, description="training epochs")] = 8,
    refine_epochs: Annotated[int, Field(ge=0, description="epochs of the refinement stage (0: none)")] = 4,
    seed: Annotated[int, Field(description="data seed")] = 0,
) -> None:
    """The parameters of demo (its flow: :mod:`weakseg.flows.demo`)."""
