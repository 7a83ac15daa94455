"""Decoding policy: every kind of bad input has a reason; odd encodings become 8-bit RGB."""
import io

import numpy as np
import pytest
from PIL import Image

from weakseg.tasks.images import ImageError, decode_image, resize_shorter_side


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(w=64, h=48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_plain_rgb_jpeg_is_kept_unchanged():
    out = decode_image(_encode(photo(), "JPEG"))
    assert out.unchanged and out.image.mode == "RGB" and (out.width, out.height) == (64, 48)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _encode(photo().convert("L"), "PNG"),
        lambda: _encode(photo().convert("P"), "PNG"),
        lambda: _encode(photo().convert("RGBA"), "PNG"),
        lambda: _encode(photo().convert("CMYK"), "JPEG"),
        lambda: _encode(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)), "PNG"),
        lambda: _encode(photo(), "BMP"),
        lambda: _encode(photo(), "WEBP"),
    ],
    ids=["gray", "palette", "alpha", "cmyk", "16bit", "bmp", "webp"],
)
def test_odd_encodings_become_8bit_rgb(make):
    out = decode_image(make())
    assert out.image.mode == "RGB" and out.image.size == (64, 48) and not out.unchanged


def test_16bit_keeps_its_range():
    arr = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    out = np.asarray(decode_image(_encode(Image.fromarray(arr), "PNG")).image)
    assert out.min() == 0 and out.max() == 255


def test_exif_orientation_is_applied():
    img = photo(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert (out.width, out.height) == (48, 64) and not out.unchanged


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "EmptyFile"),
        (b"hello, I am a text file", "NotAnImage"),
        (_encode(photo(), "JPEG")[:200], "CorruptImage"),
        (_encode(photo(), "PNG")[:-40], "CorruptImage"),
    ],
    ids=["zero-byte", "not-an-image", "truncated-jpeg", "truncated-png"],
)
def test_bad_inputs_have_a_reason(data, kind):
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.kind == kind


def test_pixel_limit_refuses_before_decoding():
    with pytest.raises(ImageError) as err:
        decode_image(_encode(photo(200, 200), "PNG"), max_pixels=10_000)
    assert err.value.kind == "TooManyPixels"


def test_resize_shorter_side_never_enlarges():
    assert resize_shorter_side(photo(64, 48), 100).size == (64, 48)
    assert resize_shorter_side(photo(200, 100), 50).size == (100, 50)


def test_max_pixels_is_ours_not_pillows():
    # 100M pixels is over Pillow's default bomb limit (89.5M) but within ours: the header is
    # read, the limit decides. A lower limit refuses the same file with our message.
    big = _encode(Image.new("L", (10_000, 10_000)), "PNG")
    with pytest.raises(ImageError, match="over the limit of 99,999,999"):
        decode_image(big, max_pixels=99_999_999)
    assert decode_image(big, max_pixels=100_000_000).image.size == (10_000, 10_000)
