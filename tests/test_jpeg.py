"""JPEG files decode to Pillow's pixels exactly: the oracle is `np.asarray(Image.open(f).convert("RGB"))`,
what transformers' processors start from. Files come from Pillow's encoder (made here) and from
libjpeg-turbo's cjpeg for the layouts Pillow cannot write (tests/data/jpeg/, scripts/make_jpeg_fixtures.sh)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import BlipImageProcessor as HFImageProcessor

import blip_peft as bp

FIXTURES = Path(__file__).parent / "data" / "jpeg"
RAW = {"do_resize": False, "do_rescale": False, "do_normalize": False, "return_tensors": "np"}


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Ramps plus noise: detail in luma and chroma for the IDCT and the upsamplers to get wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 64], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8))


def pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def our_pixels(data: bytes | str) -> np.ndarray:
    values = bp.BlipImageProcessor()(data, **RAW)["pixel_values"][0]
    assert np.array_equal(values, np.round(values))
    return values.transpose(1, 2, 0).astype(np.uint8)


def encode(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


PIL_LAYOUTS = [
    ("RGB", {"subsampling": 0, "quality": 95}),
    ("RGB", {"subsampling": 1}),
    ("RGB", {"subsampling": 2}),
    ("RGB", {"subsampling": 2, "progressive": True}),
    ("RGB", {"subsampling": 1, "progressive": True, "optimize": True}),
    ("RGB", {"quality": 20}),
    ("RGB", {"quality": 100, "subsampling": 0}),
    ("L", {}),
    ("L", {"progressive": True}),
    ("CMYK", {}),
    ("CMYK", {"progressive": True}),
]


@pytest.mark.parametrize("size", [(640, 480), (53, 37), (1, 1), (17, 300)])
@pytest.mark.parametrize(("mode", "options"), PIL_LAYOUTS)
def test_pillow_encoded(size: tuple[int, int], mode: str, options: dict) -> None:
    data = encode(picture(*size, seed=sum(size)).convert(mode), **options)
    np.testing.assert_array_equal(our_pixels(data), pil_pixels(data), err_msg=f"{mode} {options} {size}")


def test_fixture_layouts() -> None:
    """Every chroma layout libjpeg reads (4:4:0, 4:1:1, 4:1:0), arithmetic coding, restart markers, RGB
    stored without the YCbCr transform, greyscale; from paths, as users pass files."""
    files = sorted(FIXTURES.glob("*.jpg"))
    layouts = {tuple(Image.open(f).layer[0][1:3]) for f in files}
    assert {(1, 2), (4, 1), (4, 2), (2, 2), (2, 1), (1, 1)} <= layouts
    for f in files:
        np.testing.assert_array_equal(our_pixels(str(f)), pil_pixels(f.read_bytes()), err_msg=f.name)


def test_processor_output_equals_transformers() -> None:
    """The whole preprocessing (resize, rescale, normalise) on JPEG bytes equals transformers' on the PIL
    image: bit for bit, now that the pixels are."""
    ours, theirs = bp.BlipImageProcessor(), HFImageProcessor()
    for i, (mode, options) in enumerate(PIL_LAYOUTS):
        data = encode(picture(333, 250, seed=i).convert(mode), **options)
        a = ours(data, return_tensors="np")["pixel_values"]
        b = theirs(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(a, b, err_msg=f"{mode} {options}")


def test_damaged_files_are_errors() -> None:
    """libjpeg would fill what it cannot read with grey; Pillow reports truncation but returns garbage
    for damaged data. We refuse both, naming the image."""
    data = encode(picture(320, 240, seed=1))
    with pytest.raises(ValueError, match="image 0: cannot decode JPEG: image file is truncated"):
        bp.BlipImageProcessor()(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    with pytest.raises(ValueError, match=r"image 0: cannot decode JPEG: Corrupt JPEG data.*the file is damaged"):
        bp.BlipImageProcessor()(bytes(damaged))
    # Harmless oddities Pillow accepts stay accepted: junk bytes between two markers.
    end_of_app0 = 4 + struct.unpack(">H", data[4:6])[0]
    junk = data[:end_of_app0] + b"junk" + data[end_of_app0:]
    np.testing.assert_array_equal(our_pixels(junk), pil_pixels(junk))
    with pytest.raises(ValueError, match="cannot decode JPEG"):
        bp.BlipImageProcessor()(data[:200])


def segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def crafted_progressive(al: int = 13) -> tuple[bytes, int]:
    """A valid progressive JPEG of one grey 8x8 block per component whose every coefficient is refined one
    bit at a time: 1 + al DC scans and 3 x 63 x (1 + al) AC scans, each a few bytes. Valid (Pillow decodes
    it), but no encoder writes it: it stands for a small file made to have the decoder revisit the image
    thousands of times."""
    one_code = bytes([1] + [0] * 15) + b"\x00"  # a Huffman table whose only code, "0", is symbol 0
    parts = [b"\xff\xd8", segment(0xDB, b"\x00" + b"\x01" * 64)]
    parts.append(segment(0xC2, struct.pack(">BHHB", 8, 8, 8, 3) + b"".join(bytes([c, 0x11, 0]) for c in (1, 2, 3))))
    parts.append(segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code))

    def scan(components: tuple[int, ...], ss: int, ah: int, al: int, data: bytes) -> bytes:
        header = bytes([len(components)]) + b"".join(bytes([c, 0]) for c in components)
        return segment(0xDA, header + bytes([ss, ss, (ah << 4) | al])) + data

    # DC: three blocks of category 0 ("000", padded with ones); refinements: one bit a block. AC: EOB ("0").
    parts.append(scan((1, 2, 3), 0, 0, al, b"\x1f"))
    parts += [scan((1, 2, 3), 0, a, a - 1, b"\x1f") for a in range(al, 0, -1)]
    for c in (1, 2, 3):
        for k in range(1, 64):
            parts.append(scan((c,), k, 0, al, b"\x7f"))
            parts += [scan((c,), k, a, a - 1, b"\x7f") for a in range(al, 0, -1)]
    parts.append(b"\xff\xd9")
    return b"".join(parts), (1 + al) * (1 + 3 * 63)


def test_scan_limit() -> None:
    data, scans = crafted_progressive()
    assert scans > 1000
    assert pil_pixels(data).shape == (8, 8, 3)  # valid: Pillow decodes it, scan by scan
    with pytest.raises(ValueError, match=r"cannot decode JPEG: more than 1000 scans"):
        bp.BlipImageProcessor()(data)
    few, scans = crafted_progressive(al=2)
    assert scans < 1000
    np.testing.assert_array_equal(our_pixels(few), pil_pixels(few))
