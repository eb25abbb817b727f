"""Decode a radiograph file into the square uint8 grayscale array the image cache holds.

One geometry for every image source (MIMIC-CXR-JPG, the synthetic generator, test fixtures): the shorter side is
scaled to `size` and the centre `size`×`size` square is kept, with exactly the arithmetic of torchvision's
`Resize(size)` + `CenterCrop(size)` (long side `int(size * long / short)`, crop offset `round((L - size) / 2)`,
bilinear with antialiasing). A model trained on the cache therefore sees what the usual torchvision transform
would give on the raw file.

Speed matters because full MIMIC-CXR-JPG images are ~2500×3000 px and the cache holds tens of thousands of them:
- JPEGs are decoded at reduced scale with `Image.draft` (libjpeg's DCT scaling, 1/2, 1/4 or 1/8), keeping at
  least 2×`size` pixels on each side so the final antialiased resize still has enough input (the same
  "reducing gap" Pillow's `thumbnail` uses). Greyscale is requested from the decoder, which then decodes luma only.
- The resize is done with a source `box`, i.e. only the `size`×`size` output pixels are computed; this equals
  resize-then-crop exactly (Pillow clamps filter support at the image border, not the box border). The box is
  computed from the original size, so draft scaling does not shift the crop.
Pillow releases the GIL while decoding and resampling, so callers can decode in a thread pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

# Pillow modes holding more than 8 bits per pixel in a single channel (16-bit PNG/TIFF, 32-bit int, float).
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
# Keep at least this factor × target size when decoding a JPEG at reduced scale.
REDUCING_GAP = 2


def to_gray8(img: Image.Image) -> Image.Image:
    """Return an 8-bit grayscale ("L") version of any Pillow image.

    - L: unchanged. 1/P/RGB/RGBA/LA/CMYK/YCbCr…: Pillow's luma conversion (ITU-R 601-2), alpha dropped.
    - Wider than 8 bits (I;16 PNG, I, F): the image's own [min, max] is stretched linearly to [0, 255]. The bit
      depth actually used by a 16-bit container is unknown (12-bit detector data is common), so dividing by
      65535 could give a near-black image; min–max scaling is the usual radiograph normalisation and is exact
      for full-range data (value×257 maps back to value). A constant image becomes all zeros.
    """
    if img.mode == "L":
        return img
    if img.mode in _WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return Image.fromarray(np.zeros(a.shape, dtype=np.uint8), mode="L")
        scaled = np.rint((a - lo) * (255.0 / (hi - lo)))
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA").convert("RGB")  # drop alpha (values kept as stored)
    return img.convert("L")


def square_geometry(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """Source box (left, top, right, bottom) in original pixel coordinates for resize-shorter-side + centre crop.

    Mirrors torchvision: the resized image is `size` on the shorter side and `int(size * long / short)` on the
    longer one; the crop starts at `int(round((resized - size) / 2))` on each axis.
    """
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    left = round((new_w - size) / 2)  # Python rounds half to even, as torchvision does
    top = round((new_h - size) / 2)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def resize_center_crop(
    img: Image.Image, size: int, original_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Shorter side to `size`, centre crop to `size`×`size`; returns uint8 [size, size].

    `original_size` is the (width, height) before any draft reduction; the crop box is computed in those
    coordinates and mapped onto `img`, so a reduced-scale decode covers exactly the same region.
    """
    gray = to_gray8(img)
    ow, oh = original_size or gray.size
    left, top, right, bottom = square_geometry(ow, oh, size)
    # libjpeg's reduced decode maps pixel i to source pixels [s*i, s*(i+1)) with s a power of two, and rounds
    # the reduced size up; use the exact factor 1/s rather than reduced/original size.
    fx = fy = 1.0 / round(ow / gray.size[0]) if gray.size != (ow, oh) else 1.0
    box = (left * fx, top * fy, right * fx, bottom * fy)
    out = gray.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


def load_square_gray(source: str | Path | BinaryIO, size: int, *, draft: bool = True) -> np.ndarray:
    """Decode an image file into a uint8 [size, size] grayscale array (see module docstring for the rules).

    Raises FileNotFoundError for a missing file and OSError/ValueError/SyntaxError (Pillow's errors, including
    `UnidentifiedImageError` and "image file is truncated") for an unreadable one; the caller decides what a bad
    file means.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    with Image.open(source) as img:
        original = img.size
        if draft and img.format == "JPEG":
            img.draft("L", (REDUCING_GAP * size, REDUCING_GAP * size))
        img.load()
        return resize_center_crop(img, size, original_size=original)


class ImageDecodeError(Exception):
    """An image file could not be decoded; `path` names it, `cause` is the decoder's error."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(f"{path}: cannot be decoded as an image ({type(cause).__name__}: {cause})")
        self.path, self.cause = path, cause


def write_image_cache(paths: list[Path], out_npy: Path, size: int, threads: int = 2) -> None:
    """Decode `paths` in order into a uint8 [len(paths), size, size] .npy at `out_npy` (memory-mapped, so the
    cache never has to fit in memory). Decoding runs in a thread pool (Pillow releases the GIL) with a bounded
    look-ahead. The first unreadable file raises ImageDecodeError; the caller owns `out_npy` and removes it on
    failure."""
    from concurrent.futures import ThreadPoolExecutor

    cache = np.lib.format.open_memmap(out_npy, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))

    def decode(p: Path) -> np.ndarray:
        try:
            return load_square_gray(p, size)
        except Exception as e:  # any decoder failure is "unreadable file"
            raise ImageDecodeError(p, e) from e

    window = max(4, 8 * threads)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="image-decode") as pool:
        for start in range(0, len(paths), window):
            chunk = paths[start : start + window]
            for k, pixels in enumerate(pool.map(decode, chunk)):
                cache[start + k] = pixels
    cache.flush()
    del cache
