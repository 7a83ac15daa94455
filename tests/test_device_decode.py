"""JPEGs decoded on the model's device: the same pixels, predictions and tables as the host path.

On CUDA this is nvjpeg; here the same code runs with torchvision's CPU decoder (decode="device").
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.tasks.images import decode_image
from weakseg.tasks.segment import tables
from weakseg.tasks.segment.chunk import SegmentOptions, segment_chunk
from weakseg.tasks.segment.device_decode import decode_jpeg_on, device_decoding, jpeg_header
from weakseg.tasks.segment.inference import load_model, predict
from weakseg.tasks.segment.inputs import iter_chunks

CLASSES = ["background", "disk", "square"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    from skimage import data

    y, x = 10 * seed, 7 * seed
    return np.ascontiguousarray(data.astronaut()[y:y + h, x:x + w])


def _jpeg(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint):
    path = tmp_path_factory.mktemp("dec") / "model.pt"
    path.write_bytes(tiny_checkpoint(CLASSES, 0))
    return load_model(str(path), "cpu")


def test_device_decoding_only_where_no_prior_needs_host_pixels():
    assert device_decoding("auto", CUDA, ("ilp",)) and device_decoding("auto", CUDA, ())
    assert not device_decoding("auto", CPU, ("ilp",))
    assert not device_decoding("auto", CUDA, ("ilp", "sppxl"))
    assert not device_decoding("device", CPU, ("ilp", "bb"))
    assert device_decoding("device", CPU, ("ilp",)) and not device_decoding("host", CUDA, ("ilp",))
    with pytest.raises(ValueError, match="decode must be"):
        device_decoding("gpu", CUDA, ())  # type: ignore[arg-type]


def test_only_plain_upright_jpegs_go_to_the_device_decoder():
    rgb = _photo(60, 80)
    assert jpeg_header(_jpeg(rgb), 10**6) == (60, 80)
    assert jpeg_header(_jpeg(rgb[..., 0]), 10**6) == (60, 80)  # greyscale: decoded to RGB
    assert jpeg_header(_jpeg(rgb), 60 * 80 - 1) is None  # over max_pixels: the host path's error row
    exif = Image.Exif()
    exif[0x0112] = 6
    assert jpeg_header(_jpeg(rgb, exif=exif.tobytes()), 10**6) is None  # rotated: PIL applies EXIF
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    assert jpeg_header(cmyk.getvalue(), 10**6) is None
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    assert jpeg_header(png.getvalue(), 10**6) is None
    assert jpeg_header(b"not an image", 10**6) is None


def test_device_decoder_gives_the_host_decoders_pixels():
    for data in (_jpeg(_photo(75, 101)), _jpeg(_photo(64, 48)[..., 1])):
        on_device = decode_jpeg_on(data, CPU)
        assert on_device.dtype == torch.uint8 and on_device.shape[-1] == 3
        np.testing.assert_array_equal(on_device.numpy(), np.asarray(decode_image(data).image))
    with pytest.raises(RuntimeError):
        decode_jpeg_on(_jpeg(_photo(64, 64))[:300], CPU)  # truncated: refused, so the host path says why


def test_predictions_from_device_tensors_match_host_arrays(bundle):
    images = [_photo(96, 128), _photo(200, 150, 1), _photo(40, 60, 2)]  # as is, shrunk, enlarged
    kwargs = {"max_side": 128, "min_side": 96}
    host = predict(bundle, images, **kwargs)
    device = predict(bundle, [torch.from_numpy(im) for im in images], **kwargs)
    for h, d in zip(host, device, strict=True):
        assert h.size == d.size and h.forward_size == d.forward_size
    torch.testing.assert_close(host[0].cells, device[0].cells)  # no resize: the same input exactly
    for h, d in zip(host[1:], device[1:], strict=True):  # resized on the device vs OpenCV: close
        assert (h.cells - d.cells).abs().max() < 0.05
        assert np.abs(h.image_probs - d.image_probs).max() < 0.05
    flipped = predict(bundle, [torch.from_numpy(images[0])], tta="1+flip", **kwargs)[0]
    torch.testing.assert_close(flipped.probs(), predict(bundle, images[:1], tta="1+flip", **kwargs)[0].probs())


def test_device_images_resized_together_match_one_at_a_time():
    from weakseg.tasks.segment.forward import _input_batch, _resized_on_device

    shapes = [(200, 150), (96, 128), (200, 150), (40, 60), (200, 150)]  # shrunk, enlarged, shapes interleaved
    images = [torch.from_numpy(_photo(h, w, k)) for k, (h, w) in enumerate(shapes)]
    sizes, padded = [(120, 90), (120, 90), (113, 90), (120, 81), (120, 90)], (128, 96)  # one input shape
    alone = _resized_on_device(images, sizes, padded, CPU, together=False)
    together = _resized_on_device(images, sizes, padded, CPU, together=True)
    assert together.shape == (5, 128, 96, 3)
    torch.testing.assert_close(together, alone, rtol=0, atol=0)
    torch.testing.assert_close(_input_batch(images, sizes, 16, CPU), alone.permute(0, 3, 1, 2), rtol=0, atol=0)
    mixed = [im.numpy() if k == 1 else im for k, im in enumerate(images)]  # a host array among them
    x = _input_batch(mixed, sizes, 16, CPU)
    torch.testing.assert_close(x[[0, 2, 3, 4]], alone.permute(0, 3, 1, 2)[[0, 2, 3, 4]], rtol=0, atol=0)
    torch.testing.assert_close(x[1], _input_batch([mixed[1]], sizes[1:2], 16, CPU)[0], rtol=0, atol=0)
    for k in (2, 3):  # each image is the input it is alone: resized to its size, padded from its own edges
        torch.testing.assert_close(alone[k], _resized_on_device([images[k]], [sizes[k]], padded, CPU)[0],
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="one input shape"):
        _input_batch(images[:2], [(120, 90), (129, 90)], 16, CPU)


def test_chunk_decoded_on_the_device_writes_the_host_paths_tables(tmp_path, bundle):
    folder = tmp_path / "c"
    folder.mkdir()
    for i, (h, w) in enumerate([(96, 128), (128, 96), (96, 128), (100, 100)]):
        (folder / f"{i}.jpg").write_bytes(_jpeg(_photo(h, w, i)))
    Image.fromarray(_photo(80, 80, 3)).save(folder / "4.png")  # not a JPEG: decoded on the host
    (folder / "5.jpg").write_bytes(_jpeg(_photo(96, 96, 5))[:400])  # truncated: an errors row on both paths
    (folder / "6.jpg").write_bytes(b"not an image")
    drop = ("inference_ms", "prior_ms", "processed_at", "occurred_at")
    written = {}
    for decode in ("host", "device"):
        out = tmp_path / decode
        opts = SegmentOptions(out=str(out), run_id="t", run_date="2026-01-01", model="unused", priors=("ilp",),
                              batch_size=2, host_workers=2, thumbnails=1, decode=decode)
        (r,) = [segment_chunk(spec, opts, bundle) for spec in iter_chunks(str(folder), 100)]
        assert (r.ok, r.failed) == (5, 2) and len(r.thumbnails) == 1
        written[decode] = {t: sorted(({k: v for k, v in row.items() if k not in drop}
                                      for row in tables.read_table(str(out), t).to_pylist()),
                                     key=lambda row: (row["image_key"], row.get("class_index") or 0))
                           for t in ("images", "regions", "masks", "errors")}
    assert written["device"] == written["host"]
    assert {row["error_type"] for row in written["device"]["errors"]} == {"CorruptImage", "NotAnImage"}


def _bad_huffman_table(jpeg: bytes) -> bytes:
    """A JPEG whose header reads and whose end marker is there, but whose first Huffman table claims
    more codes than a table may hold: every decoder refuses its data."""
    b = bytearray(jpeg)
    i = b.index(b"\xff\xc4")
    b[i + 5:i + 21] = b"\xff" * 16
    return bytes(b)


def test_a_windows_jpegs_are_decoded_in_one_call_and_a_refused_one_alone(tmp_path, bundle, monkeypatch):
    """One nvjpeg batch a window on CUDA (torchvision: a list beats one call an image); the call has
    no partial results, so a window with a JPEG the device refuses is decoded again one image at a
    time, and the refused one goes to the host decoder, whose verdict is its errors row. A truncated
    JPEG (no end marker) never reaches the device decoder (nvjpeg may return it part grey): the host
    decoder refuses it."""
    import torchvision.io

    calls: list[int] = []
    real = torchvision.io.decode_jpeg

    def counting(raw, *args, **kwargs):
        calls.append(len(raw) if isinstance(raw, list) else 1)
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", counting)
    folder = tmp_path / "c"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(_jpeg(_photo(96, 128, i)))
    (folder / "3.jpg").write_bytes(_bad_huffman_table(_jpeg(_photo(96, 128, 3))))  # second window: refused
    cut = _jpeg(_photo(96, 128, 6))
    (folder / "6.jpg").write_bytes(cut[: len(cut) // 2])  # the header reads, the data (and the end marker) are cut
    opts = SegmentOptions(out=str(tmp_path / "out"), run_id="t", run_date="2026-01-01", model="unused",
                          priors=("ilp",), batch_size=3, host_workers=2, decode="device")
    (r,) = [segment_chunk(spec, opts, bundle) for spec in iter_chunks(str(folder), 100)]
    assert (r.ok, r.failed) == (5, 2)
    assert calls == [3, 3, 1, 1, 1]  # window 0..2 at once; 3..5 refused together, then each alone; 6 never
    rows = tables.read_table(str(tmp_path / "out"), "errors").to_pylist()
    errors = {e["image_uri"].rsplit("/", 1)[1]: e for e in rows}
    assert {k: (e["stage"], e["error_type"]) for k, e in errors.items()} == {"3.jpg": ("decode", "CorruptImage"),
                                                                            "6.jpg": ("decode", "CorruptImage")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg); runs on a GPU machine only")
def test_chunk_on_cuda_decoded_by_nvjpeg_labels_like_the_host_decoder(tmp_path, tiny_checkpoint):
    """nvjpeg's IDCT is not libjpeg-turbo's, so pixels may differ by a level or two: the same rows and
    errors, masks that agree almost everywhere."""
    import cv2

    path = tmp_path / "model.pt"
    path.write_bytes(tiny_checkpoint(CLASSES, 0))
    bundle = load_model(str(path), "cuda")
    assert device_decoding("auto", bundle.device, ("ilp",))
    data = _jpeg(_photo(75, 101))
    on_device = decode_jpeg_on(data, bundle.device)
    assert on_device.is_cuda and on_device.shape == (75, 101, 3)
    host_pixels = np.asarray(decode_image(data).image).astype(np.int16)
    assert np.abs(on_device.cpu().numpy().astype(np.int16) - host_pixels).mean() < 2
    folder = tmp_path / "c"
    folder.mkdir()
    for i, (h, w) in enumerate([(96, 128), (128, 96), (300, 400), (100, 100)]):
        (folder / f"{i}.jpg").write_bytes(_jpeg(_photo(h, w, i)))
    (folder / "5.jpg").write_bytes(_jpeg(_photo(96, 96, 5))[:400])
    (folder / "6.jpg").write_bytes(b"not an image")
    written = {}
    for decode in ("host", "auto"):
        out = tmp_path / decode
        opts = SegmentOptions(out=str(out), run_id="t", run_date="2026-01-01", model="unused", priors=("ilp",),
                              batch_size=2, host_workers=2, decode=decode)
        (r,) = [segment_chunk(spec, opts, bundle) for spec in iter_chunks(str(folder), 100)]
        assert (r.ok, r.failed) == (4, 2)
        written[decode] = {t: tables.read_table(str(out), t).to_pylist() for t in ("images", "masks", "errors")}
    keyed = {d: {t: {row["image_key"]: row for row in rows} for t, rows in w.items()} for d, w in written.items()}
    for table, columns in (("images", ("width", "height", "status", "forward_width", "forward_height")),
                           ("errors", ("error_type",))):
        assert {k: [row[c] for c in columns] for k, row in keyed["auto"][table].items()} == \
            {k: [row[c] for c in columns] for k, row in keyed["host"][table].items()}
    same = total = 0
    for key, row in keyed["host"]["masks"].items():
        a, b = (cv2.imdecode(np.frombuffer(m, np.uint8), cv2.IMREAD_UNCHANGED)
                for m in (row["mask_png"], keyed["auto"]["masks"][key]["mask_png"]))
        same, total = same + int((a == b).sum()), total + a.size
    assert same / total > 0.9
