"""Validate and normalise user images (base64 in, upright RGB PNG out) before anything is stored.

Everything happens in memory with Pillow. Every failure raises :class:`ImageError`, whose ``code``
and ``status`` map straight onto the API's error body: 413 ``image_too_large`` for too many bytes,
400 ``invalid_image`` for anything undecodable, unsupported, degenerate or a decompression bomb.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
from dataclasses import dataclass, field

from PIL import Image, ImageOps

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "WEBP", "GIF")

IMAGE_TOO_LARGE = "image_too_large"
INVALID_IMAGE = "invalid_image"

# Pillow's own warning threshold (about 9459 x 9459): a larger header is refused before decoding.
DEFAULT_MAX_SOURCE_PIXELS = 89_478_485
# The Qwen-VL processor rejects images whose long side is more than 200 times the short side;
# refusing them here gives the user a 400 instead of a failed job.
MAX_ASPECT_RATIO = 200

_DATA_URL = re.compile(r"^data:(?P<mime>[^,;]*)(?P<params>(?:;[^,;]*)*),", re.IGNORECASE)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageError(ValueError):
    """An image the gateway refuses, carrying a stable error code and an HTTP status."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class NormalizedImage:
    """An upright RGB image re-encoded as lossless PNG, ready to store and feed to the model."""

    data: bytes = field(repr=False)
    width: int
    height: int
    sha256: str
    source_format: str
    original_width: int
    original_height: int

    def to_pil(self) -> Image.Image:
        """Decode the stored PNG bytes back into an RGB PIL image."""
        with Image.open(io.BytesIO(self.data), formats=["PNG"]) as img:
            return img.convert("RGB")


def _too_large(message: str) -> ImageError:
    """Build the 413 error for an image with too many bytes."""
    return ImageError(IMAGE_TOO_LARGE, message, 413)


def _invalid(message: str) -> ImageError:
    """Build the 400 error for an image that cannot or must not be decoded."""
    return ImageError(INVALID_IMAGE, message, 400)


def _human_bytes(n: int) -> str:
    """Format a byte count for an error message."""
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"


def decode_base64_image(value: str, *, max_bytes: int) -> bytes:
    """Decode a base64 image (optionally a ``data:`` URL), refusing oversize input before decoding."""
    if not isinstance(value, str):
        raise _invalid("The image must be a base64 string.")
    value = value.strip()
    match = _DATA_URL.match(value)
    if match:
        if ";base64" not in match.group("params").lower():
            raise _invalid("Only base64 data URLs are accepted for images.")
        value = value[match.end() :]
    if not value:
        raise _invalid("The image is empty.")
    limit = _human_bytes(max_bytes)
    # Refuse absurd strings before copying them: wrapped base64 is only ~1/77 whitespace, not half.
    if len(value) > 2 * (max_bytes * 4 // 3 + 4) + 1024:
        raise _too_large(f"The image is larger than the {limit} limit.")
    compact = "".join(value.split())
    estimated = len(compact) * 3 // 4 - compact[-2:].count("=")
    if estimated > max_bytes:
        raise _too_large(f"The image is about {_human_bytes(estimated)}; the limit is {limit}.")
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")  # the urlsafe alphabet
    compact += "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _invalid("The image is not valid base64.") from exc
    if not raw:
        raise _invalid("The image is empty.")
    if len(raw) > max_bytes:
        raise _too_large(f"The image is {_human_bytes(len(raw))}; the limit is {limit}.")
    return raw


def _fit_area(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Return the largest size with this aspect ratio and at most ``max_pixels``; never upscale."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_w = max(1, min(width, int(width * scale)))
    new_h = max(1, min(height, int(height * scale)))
    if new_h == 1:
        new_w = min(new_w, max_pixels)
    elif new_w == 1:
        new_h = min(new_h, max_pixels)
    while new_w * new_h > max_pixels:  # float rounding: at most a step or two
        if new_w >= new_h:
            new_w -= 1
        else:
            new_h -= 1
    return new_w, new_h


def _open(raw: bytes, max_source_pixels: int) -> Image.Image:
    """Open the image header from memory and refuse bombs and degenerate sizes before decoding."""
    try:
        img = Image.open(io.BytesIO(raw), formats=list(ALLOWED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _invalid("The image's declared size is too large to decode safely.") from exc
    except Image.UnidentifiedImageError as exc:
        names = ", ".join(ALLOWED_FORMATS[:-1]) + " or " + ALLOWED_FORMATS[-1]
        raise _invalid(f"The data is not a valid {names} image.") from exc
    except Exception as exc:  # a corrupt header can raise almost anything inside a plugin
        raise _invalid("The image header is corrupt or unreadable.") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise _invalid(f"The image has no pixels ({width}x{height}).")
    if width * height > max_source_pixels:
        raise _invalid(
            f"The image declares {width}x{height} pixels, more than the {max_source_pixels:,} "
            "that can be decoded safely."
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise _invalid(f"The image is {width}x{height}; its aspect ratio exceeds {MAX_ASPECT_RATIO}:1.")
    return img


def _to_rgb_ready(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB, or RGBA when it carries transparency, so it resizes correctly."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow clips 16-bit grey to 255 on a plain convert; scale it to 8 bits instead (a 16-bit
        # grey tRNS colour is dropped: rare, and only a single transparent grey level).
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def _flatten(img: Image.Image) -> Image.Image:
    """Composite a transparent image onto white."""
    if img.mode != "RGBA":
        return img
    background = Image.new("RGB", img.size, (255, 255, 255))
    background.paste(img, mask=img.getchannel("A"))
    return background


def _upright(img: Image.Image) -> bool:
    """Apply EXIF orientation in place; return whether width and height were swapped."""
    before = img.size
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except MemoryError:
        raise
    except Exception:  # broken EXIF should not cost the user an otherwise good image
        return False
    return img.size != before


def _encode_png(img: Image.Image) -> bytes:
    """Encode an image as PNG, favouring speed over size (the bytes are stored, not sent around)."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def normalize_image(
    raw: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
) -> NormalizedImage:
    """Decode, orient, convert to RGB, downscale to ``max_pixels`` and re-encode an image as PNG."""
    if len(raw) > max_bytes:
        raise _too_large(f"The image is {_human_bytes(len(raw))}; the limit is {_human_bytes(max_bytes)}.")
    if not raw:
        raise _invalid("The image is empty.")
    img = _open(raw, max_source_pixels)
    source_format = img.format or "unknown"
    original_width, original_height = img.size
    try:
        with img:
            if source_format in ("JPEG", "MPO"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when we would shrink that much anyway.
                img.draft(None, _fit_area(img.width, img.height, max_pixels))
            img.load()  # only the first frame of an animated GIF or WEBP
            if _upright(img):
                original_width, original_height = original_height, original_width
            frame = _to_rgb_ready(img)
            target = _fit_area(frame.width, frame.height, max_pixels)
            if target != frame.size:
                frame = frame.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            frame = _flatten(frame)
            data = _encode_png(frame)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _invalid("The image's declared size is too large to decode safely.") from exc
    except MemoryError as exc:
        raise _invalid("The image is too large to decode.") from exc
    except Exception as exc:  # truncated data surfaces as OSError, broken chunks as SyntaxError, ...
        raise _invalid("The image data is truncated or corrupt.") from exc
    return NormalizedImage(
        data=data,
        width=frame.width,
        height=frame.height,
        sha256=hashlib.sha256(data).hexdigest(),
        source_format=source_format,
        original_width=original_width,
        original_height=original_height,
    )


def image_from_base64(value: str, *, max_bytes: int, max_pixels: int) -> NormalizedImage:
    """Decode a base64 image and normalise it."""
    raw = decode_base64_image(value, max_bytes=max_bytes)
    return normalize_image(raw, max_bytes=max_bytes, max_pixels=max_pixels)
