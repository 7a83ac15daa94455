"""Legends: a swatch table for artifacts, a strip under the demo's overlays; the masks' own colours."""
import base64
import io

import numpy as np
from PIL import Image

from weakseg.tasks.legend import colour, legend_markdown, with_legend_strip


def test_the_markdown_legend_shows_each_present_class_in_its_mask_colour():
    md = legend_markdown(["background", "cat", "dog"], present=["dog"])
    rows = md.splitlines()[2:]
    assert len(rows) == 1 and "| dog | 2 |" in rows[0] and "#{:02x}{:02x}{:02x}".format(*colour(2)) in rows[0]
    swatch = rows[0].split("](data:image/png;base64,")[1].split(")")[0]
    assert Image.open(io.BytesIO(base64.b64decode(swatch))).getpixel((3, 3)) == colour(2)
    assert "(unlabelled) | 255" in legend_markdown(["cat", "dog"])  # no background class: 255 is shown too


def test_the_strip_names_the_classes_in_the_mask_under_the_picture():
    tile = np.full((40, 120, 3), 128, np.uint8)
    labels = np.zeros((40, 40), np.uint8)
    labels[5:20, 5:20] = 2
    out = with_legend_strip(tile, ["background", "cat", "dog"], labels)
    assert out.shape[1] == 120 and out.shape[0] > 40 and np.array_equal(out[:40], tile)
    strip = {tuple(p) for p in out[40:].reshape(-1, 3)}
    assert colour(0) in strip and colour(2) in strip and colour(1) not in strip
