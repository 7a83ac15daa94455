"""Legends for the pictures people look at: which colour is which class.

Masks are drawn with the VOC palette (:func:`weakseg.tasks.images.voc_palette`: class index
-> colour, 255 unlabelled in cream). A markdown swatch table for artifacts, and a strip drawn
under an overlay PNG, both for the classes a picture shows.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import voc_palette

__all__ = ["UNLABELLED", "colour", "legend_markdown", "with_legend_strip"]

UNLABELLED = 255
_PALETTE = np.array(voc_palette(), np.uint8).reshape(-1, 3)


def colour(index: int) -> tuple[int, int, int]:
    """The palette's colour of a class index (255: unlabelled)."""
    r, g, b = _PALETTE[index]
    return int(r), int(g), int(b)


def _swatch(index: int, side: int = 14) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour(index)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _entries(classes: Sequence[str], present: Sequence[str] | None) -> list[tuple[int, str]]:
    keep = set(classes if present is None else present)
    entries = [(i, name) for i, name in enumerate(classes) if name in keep]
    if "background" not in classes:  # pixels of no class are 255
        entries.append((UNLABELLED, "(unlabelled)"))
    return entries


def legend_markdown(classes: Sequence[str], present: Sequence[str] | None = None) -> str:
    """A markdown table: colour swatch, hex code and class name, for ``present`` (default: all classes)."""
    lines = ["| colour | class | index |", "|---|---|---|"]
    for i, name in _entries(classes, present):
        r, g, b = colour(i)
        lines.append(f"| ![#{r:02x}{g:02x}{b:02x}]({_swatch(i)}) `#{r:02x}{g:02x}{b:02x}` | {name} | {i} |")
    return "\n".join(lines)


def with_legend_strip(tile: np.ndarray, classes: Sequence[str], labels: np.ndarray) -> np.ndarray:
    """``tile`` (H, W, 3 uint8) with a white strip under it: a swatch and the name of each class in ``labels``."""
    found = np.unique(labels)
    entries = [(int(i), classes[i]) for i in found if i < len(classes)]
    if UNLABELLED in found:
        entries.append((UNLABELLED, "(unlabelled)"))
    font = ImageFont.load_default()
    sizes = [12 + 4 + int(font.getlength(name)) + 12 for _, name in entries]
    width, row_h, rows, x = tile.shape[1], 18, 1, 4
    for s in sizes:  # wrap onto as many rows as it takes
        if x + s > width and x > 4:
            rows, x = rows + 1, 4
        x += s
    strip = Image.new("RGB", (width, rows * row_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    x, y = 4, 3
    for (i, name), s in zip(entries, sizes, strict=True):
        if x + s > width and x > 4:
            x, y = 4, y + row_h
        draw.rectangle([x, y + 1, x + 11, y + 12], fill=colour(i), outline=(0, 0, 0))
        draw.text((x + 16, y), name, fill=(0, 0, 0), font=font)
        x += s
    return np.concatenate([tile, np.asarray(strip)], axis=0)
