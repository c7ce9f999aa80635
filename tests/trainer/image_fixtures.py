"""Image files that lie, for the image checks of prepare and training."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def claims_size(path: Path, width: int, height: int) -> Path:
    """A tiny JPEG whose header declares width x height: what a decompression bomb looks like to a
    decoder, without the memory."""
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, "JPEG")
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path
