"""Tests for common/images.py: decoding, validation and normalisation of user images."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image, ImageFile

from common import images
from common.images import (
    ALLOWED_FORMATS,
    ImageError,
    NormalizedImage,
    decode_base64_image,
    image_from_base64,
    normalize_image,
)

MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 1024 * 1024
RED = (220, 20, 30)
BLUE = (20, 40, 210)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """Encode a Pillow image in the given format."""
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    """Return standard base64 text."""
    return base64.b64encode(raw).decode("ascii")


def noisy(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Return an RGB image of random pixels (so every byte of its encoding matters)."""
    return Image.frombytes("RGB", size, random.Random(7).randbytes(size[0] * size[1] * 3))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """Build one PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int) -> bytes:
    """Return a tiny PNG whose header declares width x height greyscale pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024, 9)
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def normalize(raw: bytes, **kwargs: int) -> NormalizedImage:
    """Normalise with the default limits unless overridden."""
    kwargs.setdefault("max_bytes", MAX_BYTES)
    kwargs.setdefault("max_pixels", MAX_PIXELS)
    return normalize_image(raw, **kwargs)


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> None:
    """Assert two colours match within a per-channel tolerance (lossy formats)."""
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def assert_refused(
    code: str, status: int, call: Callable[..., object], *args: Any, **kwargs: Any
) -> ImageError:
    """Assert the call raises ImageError with this code and status, and return it."""
    with pytest.raises(ImageError) as info:
        call(*args, **kwargs)
    assert (info.value.code, info.value.status) == (code, status), str(info.value)
    assert info.value.message
    return info.value


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_accepts_every_allowed_format(fmt: str) -> None:
    raw = encode(Image.new("RGB", (64, 48), RED), fmt)
    result = image_from_base64(b64(raw), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert result.source_format == fmt
    assert (result.width, result.height) == (64, 48)
    assert (result.original_width, result.original_height) == (64, 48)
    assert result.data.startswith(b"\x89PNG\r\n\x1a\n")
    pil = result.to_pil()
    assert pil.mode == "RGB" and pil.size == (64, 48)
    assert_close(pil.getpixel((10, 10)), RED)


def test_data_url_prefix_line_breaks_urlsafe_and_missing_padding_are_accepted() -> None:
    raw = encode(noisy((33, 17)), "PNG")
    text = b64(raw)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    urlsafe = base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    expected = normalize(raw).sha256
    for value in (f"data:image/png;base64,{text}", f"  DATA:image/png;base64,{wrapped}\n", wrapped, urlsafe):
        assert image_from_base64(value, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS).sha256 == expected


@pytest.mark.parametrize("value", ["not base64 at all!", "QUJD*RA==", "A", "QQ==QQ==", "ü" * 8])
def test_bad_base64_is_invalid_image(value: str) -> None:
    error = assert_refused("invalid_image", 400, decode_base64_image, value, max_bytes=MAX_BYTES)
    assert "base64" in error.message


@pytest.mark.parametrize("value", ["", "   ", "data:image/png;base64,", "data:image/png,iVBORw0K"])
def test_empty_or_non_base64_data_url_is_invalid_image(value: str) -> None:
    assert_refused("invalid_image", 400, decode_base64_image, value, max_bytes=MAX_BYTES)


def test_text_file_is_invalid_image() -> None:
    value = b64(b"Dear user,\nthis is a plain text file, not a picture.\n" * 20)
    error = assert_refused(
        "invalid_image", 400, image_from_base64, value, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS
    )
    assert "not a valid PNG, JPEG, BMP, WEBP or GIF image" in error.message


def test_unsupported_format_is_invalid_image() -> None:
    assert_refused("invalid_image", 400, normalize, encode(Image.new("RGB", (8, 8)), "TIFF"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_invalid_image(fmt: str) -> None:
    raw = encode(noisy((128, 128)), fmt)
    error = assert_refused("invalid_image", 400, normalize, raw[: len(raw) // 2])
    assert "truncated" in error.message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0)])
def test_zero_sized_image_is_invalid_image(size: tuple[int, int]) -> None:
    assert_refused("invalid_image", 400, normalize, crafted_png(*size))


@pytest.mark.parametrize(
    ("size", "max_source_pixels"),
    [((30000, 30000), images.DEFAULT_MAX_SOURCE_PIXELS), ((4000, 4000), 10_000_000)],
    ids=["pillow-guard", "explicit-check"],
)
def test_decompression_bomb_is_refused_without_decoding(
    size: tuple[int, int], max_source_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = crafted_png(*size)
    assert len(raw) < 200
    loads: list[object] = []
    original_load = ImageFile.ImageFile.load

    def spy_load(self: ImageFile.ImageFile) -> Any:
        loads.append(self)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        error = assert_refused("invalid_image", 400, normalize, raw, max_source_pixels=max_source_pixels)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 50 * 1024 * 1024
    assert loads == []  # the pixels were never decoded (tracemalloc cannot see Pillow's C buffers)
    assert "too large" in error.message or "safely" in error.message


def test_too_many_bytes_is_refused_at_base64_stage_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an oversize image")

    monkeypatch.setattr(images.base64, "b64decode", never)
    value = "data:image/png;base64," + "A" * 4000
    assert_refused("image_too_large", 413, decode_base64_image, value, max_bytes=2000)
    assert_refused("image_too_large", 413, decode_base64_image, "A" * 10_000_000, max_bytes=2000)


def test_too_many_bytes_is_refused_at_raw_stage() -> None:
    raw = encode(noisy(), "PNG")
    assert_refused("image_too_large", 413, normalize, raw, max_bytes=len(raw) - 1)
    value = b64(raw)  # decodes to exactly len(raw): the base64 estimate is exact, so this is caught there
    assert_refused("image_too_large", 413, image_from_base64, value, max_bytes=len(raw) - 1, max_pixels=10)
    assert normalize(raw, max_bytes=len(raw)).width == 64


def test_cmyk_jpeg_becomes_rgb() -> None:
    raw = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")
    with Image.open(io.BytesIO(raw)) as check:
        assert check.mode == "CMYK"
    pil = normalize(raw).to_pil()
    assert pil.mode == "RGB"
    assert_close(pil.getpixel((16, 16)), (255, 0, 0))


def test_animated_gif_keeps_first_frame() -> None:
    frames = [Image.new("RGB", (24, 24), colour) for colour in (RED, BLUE, (0, 200, 0))]
    raw = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(raw)) as check:
        assert check.n_frames == 3
    assert_close(normalize(raw).to_pil().getpixel((5, 5)), RED)


def test_animated_webp_keeps_first_frame() -> None:
    frames = [Image.new("RGB", (24, 24), colour) for colour in (RED, BLUE)]
    raw = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert_close(normalize(raw).to_pil().getpixel((5, 5)), RED)


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    result = normalize(encode(stored, "JPEG", exif=exif, quality=95))
    assert (result.width, result.height) == (20, 40)
    assert (result.original_width, result.original_height) == (20, 40)
    pil = result.to_pil()
    assert_close(pil.getpixel((10, 5)), RED)  # the stored left edge is now the top
    assert_close(pil.getpixel((10, 35)), BLUE)


def test_rgba_png_is_composited_onto_white() -> None:
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    img.paste((*RED, 255), (0, 0, 10, 20))
    pil = normalize(encode(img, "PNG")).to_pil()
    assert pil.mode == "RGB"
    assert pil.getpixel((5, 5)) == RED
    assert pil.getpixel((15, 5)) == (255, 255, 255)


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([*RED, *BLUE])
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    ("make", "fmt", "expected"),
    [
        (lambda: Image.new("L", (8, 8), 100), "PNG", (100, 100, 100)),
        (lambda: Image.new("1", (8, 8), 1), "BMP", (255, 255, 255)),
        (lambda: Image.new("LA", (8, 8), (50, 0)), "PNG", (255, 255, 255)),
        (lambda: Image.new("I;16", (8, 8), 40000), "PNG", (156, 156, 156)),
        (_palette_with_transparency, "PNG", (255, 255, 255)),
        (_palette_with_transparency, "GIF", (255, 255, 255)),
    ],
    ids=["L", "1", "LA", "I;16", "P-trns-png", "P-trns-gif"],
)
def test_every_mode_becomes_rgb(
    make: Callable[[], Image.Image], fmt: str, expected: tuple[int, int, int]
) -> None:
    pil = normalize(encode(make(), fmt)).to_pil()
    assert pil.mode == "RGB"
    assert pil.getpixel((3, 3)) == expected


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_large_image_is_downscaled_keeping_aspect_ratio(fmt: str) -> None:
    result = normalize(encode(Image.new("RGB", (3000, 1000), BLUE), fmt), max_pixels=1024 * 1024)
    assert result.width * result.height <= 1024 * 1024
    assert abs(result.width / result.height - 3.0) / 3.0 < 0.01
    assert result.width > 1700  # shrunk to fit, not far below the limit
    assert (result.original_width, result.original_height) == (3000, 1000)
    assert_close(result.to_pil().getpixel((100, 100)), BLUE)


def test_jpeg_draft_decode_still_fits_the_limit() -> None:
    result = normalize(encode(Image.new("RGB", (3000, 1000), RED), "JPEG"), max_pixels=100_000)
    assert result.width * result.height <= 100_000
    assert abs(result.width / result.height - 3.0) / 3.0 < 0.01


def test_small_image_is_not_upscaled() -> None:
    result = normalize(encode(Image.new("RGB", (10, 7), RED), "PNG"), max_pixels=MAX_PIXELS)
    assert (result.width, result.height) == (10, 7)


def test_extreme_aspect_ratio_is_invalid_image() -> None:
    assert_refused("invalid_image", 400, normalize, encode(Image.new("L", (2010, 10)), "PNG"))


def test_sha256_is_stable_for_identical_input() -> None:
    raw = encode(noisy(), "PNG")
    first, second = normalize(raw), normalize(raw)
    assert first.sha256 == second.sha256 == hashlib.sha256(first.data).hexdigest()
    assert first == second
    assert normalize(encode(Image.new("RGB", (64, 64), RED), "PNG")).sha256 != first.sha256
    assert "data=" not in repr(first)


def test_corrupted_bytes_never_leak_raw_errors() -> None:
    rng = random.Random(1234)
    sources = [encode(noisy((24, 24)), fmt) for fmt in ALLOWED_FORMATS]
    for _ in range(300):
        raw = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(1, len(raw))]
        try:
            result = normalize(bytes(raw))
        except ImageError as error:
            assert error.code == "invalid_image" and error.status == 400
        else:
            assert result.to_pil().mode == "RGB"
    assert_refused("invalid_image", 400, normalize, os.urandom(64))


def test_image_error_is_a_value_error_with_code_and_status() -> None:
    error = ImageError("image_too_large", "too big", 413)
    assert isinstance(error, ValueError)
    assert (error.code, error.status, error.message) == ("image_too_large", 413, "too big")
    assert str(error) == "too big"
