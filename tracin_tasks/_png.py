"""Small PNG images from arrays, with the standard library only (zlib): thumbnails of examples in
the report and in Label Studio tasks."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale (H, W) or RGB (H, W, 3) PNG."""
    height, width = pixels.shape[:2]
    color = 0 if pixels.ndim == 2 else 2
    raw = b"".join(b"\x00" + np.ascontiguousarray(pixels[y]).tobytes() for y in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def png_data_uri(pixels: np.ndarray) -> str:
    """``pixels`` as a ``data:image/png;base64,…`` URI (for self-contained HTML)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")


def to_pixels(image: np.ndarray, invert: bool = False) -> np.ndarray:
    """A 2-D array (or channels-last RGB) stretched to 0..255 per image; ``invert`` for dark-on-light."""
    arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(arr.min()), float(arr.max())
    scaled = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
    pixels = np.round(scaled * 255).astype(np.uint8)
    return 255 - pixels if invert else pixels
