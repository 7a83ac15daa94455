"""JPEG decoding on the model's device (nvjpeg through ``torchvision.io.decode_jpeg`` on CUDA).

On an accelerator the host's cores, not the device, limit segment-corpus: decoding a 500 px
JPEG costs the host a few milliseconds, the forward pass a fraction of one. When no host-side
prior needs the pixels (chains of ``ilp`` only, or none), a plain baseline JPEG is decoded
where the network runs and never lands in host memory; the forward pass resizes it there.

Only complete files (ending with the end-of-image marker) whose header PIL reads as a JPEG in
RGB or greyscale, upright (EXIF orientation 1) and within ``max_pixels`` go this way; anything
else, and any input the device decoder refuses, goes through
:func:`weakseg.tasks.images.decode_image` as before, so validation and error rows are the
same on both paths (a truncated JPEG is a ``decode`` error row on both). On the CPU the same
code runs with libjpeg-turbo (the tests' way to exercise it).
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from PIL import Image

from .proposals import PRIOR_INPUTS  # the priors whose inputs are computed from host pixels

__all__ = ["DecodeMode", "decode_jpeg_on", "decode_jpegs_on", "device_decoding", "jpeg_header"]

DecodeMode = Literal["auto", "host", "device"]


def device_decoding(mode: DecodeMode, device: torch.device, priors: Sequence[str]) -> bool:
    """Whether a chunk decodes JPEGs on ``device``: ``auto`` does on CUDA when no prior needs host pixels."""
    if mode not in ("auto", "host", "device"):
        raise ValueError(f"decode must be auto, host or device, not {mode!r}")
    if mode == "host" or any(p in PRIOR_INPUTS for p in priors):
        return False
    return mode == "device" or device.type == "cuda"


def jpeg_header(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG the device decoder can take as is; None: decode on the host.

    The file must also end with the JPEG end-of-image marker: a truncated JPEG goes to the host
    decoder, which refuses it (an errors row), where nvjpeg might return a partly grey image.
    """
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.width * img.height > max_pixels or img.getexif().get(0x0112, 1) != 1:
                return None
            return img.height, img.width
    except Exception:  # not a JPEG header PIL reads: the host path says why
        return None


def decode_jpegs_on(data: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """``uint8[H, W, 3]`` images on ``device`` (HWC like the host path's arrays), decoded in one call.

    On CUDA a list is decoded as one nvjpeg batch, which torchvision documents as more
    efficient than one call per image. The call has no partial results: one refused input
    raises for all of them.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    raws = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    return [img.permute(1, 2, 0) for img in decode_jpeg(raws, mode=ImageReadMode.RGB, device=device)]


def decode_jpeg_on(data: bytes, device: torch.device) -> torch.Tensor:
    """One image of :func:`decode_jpegs_on`; raises when the decoder refuses it."""
    return decode_jpegs_on([data], device)[0]
