"""Decoding and validating images: one policy for sharding and segmentation.

Every image is fully decoded (truncated files fail here, not later in training), EXIF
orientation is applied, and grayscale, palette, alpha, CMYK and 16-bit inputs become 8-bit
RGB. Images over a pixel limit are refused before decoding (decompression bombs).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "DecodedImage", "ImageError", "decode_image", "encode_jpeg",
           "resize_shorter_side", "voc_palette"]

DEFAULT_MAX_PIXELS = 100_000_000
# --max-bytes of shard-imagenet and segment-corpus: larger inputs are refused before they are read
DEFAULT_MAX_BYTES = 64 * 2**20
# Pillow refuses images over 2 x its MAX_IMAGE_PIXELS in Image.open, before ``max_pixels``
# can decide; weakseg enforces ``max_pixels`` itself on every decode, so Pillow's global
# limit is lifted (a process-wide Pillow setting: any caller of decode_image sets a limit).
Image.MAX_IMAGE_PIXELS = None
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class ImageError(ValueError):
    """An input that is not a usable image; ``kind`` is the error_type recorded for it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, 8 bit, EXIF orientation applied
    format: str  # source encoding (JPEG, PNG, ...)
    width: int  # as displayed (after EXIF orientation)
    height: int
    unchanged: bool  # True when the source bytes already are exactly this RGB JPEG


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / ((hi - lo) or 1.0) * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode and validate; raises :class:`ImageError` with the reason."""
    if not data:
        raise ImageError("EmptyFile", "zero-byte file")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check (89.5M pixels, a warning, then an error at twice that)
            # would override ``max_pixels``; the check below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if img.width * img.height > max_pixels:
                raise ImageError(
                    "TooManyPixels", f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over the limit "
                    f"of {max_pixels:,}"
                )
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("NotAnImage", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("CorruptImage", f"cannot decode ({err})") from None
    orientation = img.getexif().get(0x0112, 1)
    oriented = ImageOps.exif_transpose(img) if orientation != 1 else img
    rgb = _to_rgb(oriented)
    unchanged = fmt == "JPEG" and img.mode == "RGB" and orientation == 1
    return DecodedImage(rgb, fmt, rgb.width, rgb.height, unchanged)


def resize_shorter_side(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the shorter side is at most ``max_side`` (never enlarges)."""
    short = min(img.size)
    if short <= max_side:
        return img
    scale = max_side / short
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, subsampling="4:2:0")
    return buf.getvalue()


def voc_palette() -> list[int]:
    """PASCAL VOC's colour map (index 255, void, is cream), as a flat 768-entry PIL palette."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3 : 256 * 3] = [224, 224, 192]
    return palette
