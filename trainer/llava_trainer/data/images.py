"""Image loading and CLIP preprocessing: LLaVA's result with a fraction of the work.

LLaVA: PIL open → RGB → (finetune `pad`) expand2square on the CLIP mean colour → CLIPImageProcessor
(resize shortest edge, bicubic; center crop; rescale; normalize). The HF processor resizes in PIL
on uint8, then converts to float64 and back and normalises in several full-image passes.
`ClipPreprocess` crops by slicing and does rescale + normalise in one pass per channel. Two modes:
`resize="pil"` resizes in PIL and normalises through a lookup table computed with exactly the HF
arithmetic: bit-identical to the HF processor. `resize="torch"` (the training default) resizes
with torch's uint8 antialiased bicubic (the same Keys kernel, ~4x faster than PIL here) and
normalises with one multiply-add: within two 8-bit levels of PIL on a few pixels in a thousand
(tests hold it to that), which training cannot tell from JPEG noise.
A missing, undecodable or too large image raises `ImageError` naming the file; never a blank image.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libjpeg-turbo straight into a numpy array; optional: without it PIL decodes (same pixels)
    import simplejpeg
except ImportError:  # pragma: no cover - exercised by monkeypatching in tests
    simplejpeg = None

JPEG_SOI = b"\xff\xd8\xff"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(Exception):
    """A sample's image is missing, cannot be decoded or is too large; `path` names the file."""

    def __init__(self, path: str | Path, problem: str, detail: str = "") -> None:
        super().__init__(f"{problem} image {path}" + (f": {detail}" if detail else ""))
        self.path = str(path)
        self.problem = problem
        """"missing", "corrupt" or "too large"."""
        self.detail = detail

    @property
    def reason(self) -> str:
        """What is wrong, without the path: "too large: 20000x20000 (...)", "corrupt: <Pillow's words>"."""
        return self.problem + (f": {self.detail}" if self.detail else "")


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def _too_large(path: str | Path) -> ImageError:
    """Pillow refuses images above twice `Image.MAX_IMAGE_PIXELS` (a decompression bomb) before
    reading their size out to us; read it from the header to say how large the image claims to be."""
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    size = "an unknown size"
    Image.init()
    with open(path, "rb") as file:
        prefix = file.read(16)
        for name in Image.ID:
            factory, accept = Image.OPEN[name]
            if accept and not accept(prefix):
                continue
            file.seek(0)
            try:
                width, height = factory(file, str(path)).size
            except Exception:  # not this format: try the next plugin, as Image.open does
                continue
            size = f"{width}x{height}"
            break
    return ImageError(path, "too large", f"{size} is above the {limit}-pixel limit")


def load_image(path: str | Path) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) and convert to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette/transparency chatter
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(path, "missing") from None
    except Image.DecompressionBombError:
        raise _too_large(path) from None
    except _DECODE_ERRORS as err:
        raise ImageError(path, "corrupt", str(err)) from None


def decode_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of an image file: exactly `np.asarray(load_image(path))`, faster.

    Baseline/progressive JPEGs in YCbCr or grayscale (all but a few LLaVA images) are decoded by
    libjpeg-turbo through `simplejpeg`, straight into a numpy array: the same library and settings
    (accurate integer IDCT, fancy upsampling) as Pillow's decoder, so the same pixels (tested), minus
    Pillow's RGBX image memory and the copy out of it (~40% of the decode time at 336 px). Anything
    else (PNG, CMYK/YCCK or Adobe-RGB JPEG, a JPEG libjpeg warns about, a decompression bomb)
    goes through `load_image`, which also names missing, corrupt and too large files.
    """
    if simplejpeg is not None:
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError:
            data = b""  # load_image raises the right ImageError
        if data.startswith(JPEG_SOI):
            try:
                height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
                if colorspace in ("YCbCr", "Gray") and height * width <= (Image.MAX_IMAGE_PIXELS or 1 << 62):
                    return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
            except ValueError:
                pass  # truncated, corrupt or merely warned about: Pillow decides, as LLaVA's path does
    return np.asarray(load_image(path))


def check_image(path: str | Path, *, decode: bool = True) -> tuple[ImageError | None, str | None]:
    """(problem, format) of an image file: the ImageError training would raise (None: usable).

    JPEGs are decoded at reduced DCT scale (`draft`): every entropy-coded byte is still read, so
    truncation and corruption are still found, at a fraction of the cost. Too large means what
    training's decoder refuses (see `_too_large`).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                fmt = image.format
                if decode:
                    if fmt == "JPEG":
                        image.draft("RGB", (64, 64))
                    image.load()
                return None, fmt
    except FileNotFoundError:
        return ImageError(path, "missing"), None
    except Image.DecompressionBombError:
        return _too_large(path), None
    except _DECODE_ERRORS as err:
        return ImageError(path, "corrupt", str(err)), None


def background_colour(image_mean: tuple[float, ...] | list[float]) -> tuple[int, ...]:
    """LLaVA's pad colour: the processor mean as ints, (122, 116, 104) for CLIP."""
    return tuple(int(x * 255) for x in image_mean)


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Centre a non-square image on a square canvas of the background colour (LLaVA `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return canvas


def pad_to_square(pixels: np.ndarray, background: tuple[int, ...]) -> np.ndarray:
    """`expand2square` on an HxWx3 uint8 array (same placement as PIL's paste)."""
    height, width = pixels.shape[:2]
    if width == height:
        return pixels
    side = max(width, height)
    canvas = np.empty((side, side * 3), dtype=np.uint8)
    canvas[:] = np.tile(np.asarray(background, dtype=np.uint8), side)  # row-wise: 50x faster than per pixel
    canvas = canvas.reshape(side, side, 3)
    top, left = ((side - height) // 2, 0) if width > height else (0, (side - width) // 2)
    canvas[top : top + height, left : left + width] = pixels
    return canvas


def resize_uint8(image: Image.Image | np.ndarray, size: tuple[int, int], resample: int, backend: str) -> Any:
    """Resize to (width, height): PIL, or torch's antialiased bicubic/bilinear on uint8 (same kernels).

    torch only downscales here: that is where the time goes, and where it stays within one level of
    PIL (strong upscaling of tiny images drifts by two).
    """
    pixels = np.asarray(image)
    downscale = size[0] <= pixels.shape[1] and size[1] <= pixels.shape[0]
    if backend == "torch" and downscale and resample in (Image.Resampling.BICUBIC, Image.Resampling.BILINEAR):
        import torch

        if not pixels.flags.writeable:
            pixels = pixels.copy()
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # channels-last NCHW: the fast path
        mode = "bicubic" if resample == Image.Resampling.BICUBIC else "bilinear"
        out = torch.nn.functional.interpolate(tensor, size=(size[1], size[0]), mode=mode, antialias=True)
        return out[0].permute(1, 2, 0).numpy()
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    return image.resize(size, resample=resample)


def _size_dict(value: Any) -> dict[str, int]:
    if isinstance(value, int):
        return {"shortest_edge": value}
    return {k: int(v) for k, v in dict(value).items() if v is not None}


@dataclass(frozen=True)
class ClipPreprocess:
    """The CLIPImageProcessor recipe as plain values, applied with PIL + one table lookup."""

    size: dict[str, int]
    crop_size: dict[str, int]
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_processor(cls, processor: Any) -> ClipPreprocess:
        """Read the recipe off a loaded (HF) CLIP image processor."""
        return cls(
            size=_size_dict(processor.size),
            crop_size=_size_dict(processor.crop_size),
            image_mean=tuple(processor.image_mean),
            image_std=tuple(processor.image_std),
            rescale_factor=float(processor.rescale_factor),
            resample=int(processor.resample),
            do_resize=bool(processor.do_resize),
            do_center_crop=bool(processor.do_center_crop),
            do_rescale=bool(processor.do_rescale),
            do_normalize=bool(processor.do_normalize),
        )

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width) of the output."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        return self.size.get("height", self.size.get("shortest_edge", 0)), self.size.get(
            "width", self.size.get("shortest_edge", 0)
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, with HF's integer arithmetic."""
        if "shortest_edge" in self.size:
            target = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = target, int(target * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        return self.size["width"], self.size["height"]

    def lookup_table(self) -> np.ndarray:
        """[3, 256] float32: the normalised value of every uint8 level, computed as HF does."""
        levels = np.arange(256, dtype=np.float64)
        scaled = (levels * self.rescale_factor if self.do_rescale else levels).astype(np.float32)
        scaled = np.broadcast_to(scaled, (3, 256))
        if not self.do_normalize:
            return np.ascontiguousarray(scaled)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        return np.ascontiguousarray((scaled - mean) / std)

    def __call__(
        self, image: Image.Image | np.ndarray, table: np.ndarray | None = None, *, resize: str = "pil"
    ) -> np.ndarray:
        """[3, H, W] float32 pixel values of an RGB image (PIL or HxWx3 uint8)."""
        width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
        if self.do_resize:
            size = self.resized_size(width, height)
            if size != (width, height):
                image = resize_uint8(image, size, self.resample, resize)
        pixels = np.asarray(image)
        if self.do_center_crop:
            crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
            height, width = pixels.shape[:2]
            if crop_w > width or crop_h > height:
                raise ValueError(f"image {width}x{height} smaller than the crop {crop_w}x{crop_h}")
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            pixels = pixels[top : top + crop_h, left : left + crop_w]
        if resize == "pil":  # exact: HF's arithmetic, tabulated
            out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
            table = self.lookup_table() if table is None else table
            for channel in range(3):
                np.take(table[channel], pixels[:, :, channel], out=out[channel])
            return out
        # One multiply-add per value (within 1 float32 ulp of the table). Deinterleaving the uint8
        # crop first keeps the float passes contiguous: ~30% less than casting from the HWC view.
        scale, shift = self._affine
        out = np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32)
        out *= scale
        out += shift
        return out

    @cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        scale, shift = self.affine()
        return scale.reshape(3, 1, 1), shift.reshape(3, 1, 1)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) per channel with value = level * scale + shift."""
        rescale = self.rescale_factor if self.do_rescale else 1.0
        mean = np.asarray(self.image_mean if self.do_normalize else (0.0,) * 3, dtype=np.float64)
        std = np.asarray(self.image_std if self.do_normalize else (1.0,) * 3, dtype=np.float64)
        return (rescale / std).astype(np.float32), (-mean / std).astype(np.float32)


class ImagePipeline:
    """File → pixel values for one aspect-ratio policy ("square": CLIP crop, "pad": expand2square).

    Uses `ClipPreprocess` when the processor is a CLIP-style one and falls back to calling the HF
    processor itself otherwise (still correct, slower). `resize`: "torch" (fast) or "pil" (exact).
    """

    def __init__(self, processor: Any, aspect_ratio: str = "square", *, resize: str = "torch") -> None:
        if aspect_ratio not in ("square", "pad"):
            raise ValueError(f"image_aspect_ratio must be 'square' or 'pad', got {aspect_ratio!r}")
        if resize not in ("torch", "pil"):
            raise ValueError(f"resize must be 'torch' or 'pil', got {resize!r}")
        self.processor, self.aspect_ratio, self.resize = processor, aspect_ratio, resize
        self.background = background_colour(processor.image_mean)
        try:
            self.fast: ClipPreprocess | None = ClipPreprocess.from_processor(processor)
            self.table = self.fast.lookup_table()
        except (AttributeError, KeyError, TypeError, ValueError):
            self.fast, self.table = None, None

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """[3, H, W] float32 pixel values of an RGB image (PIL, or HxWx3 uint8 as `decode_rgb` gives)."""
        if self.fast is not None:
            pixels: Image.Image | np.ndarray = image
            if self.aspect_ratio == "pad":
                pixels = pad_to_square(np.asarray(image), self.background)
            try:
                return self.fast(pixels, self.table, resize=self.resize)
            except ValueError:
                pass  # an image smaller than the crop: HF pads it; let HF do it
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        if self.aspect_ratio == "pad":
            image = expand2square(image, self.background)
        return np.asarray(self.processor(image, return_tensors="np")["pixel_values"][0], dtype=np.float32)

    def load(self, path: str | Path) -> np.ndarray:
        return self(decode_rgb(path))


def hf_reference_pixels(processor: Any, image: Image.Image, aspect_ratio: str) -> np.ndarray:
    """What LLaVA computes (`expand2square` + `processor.preprocess`), for tests and the benchmark."""
    if aspect_ratio == "pad":
        image = expand2square(image, background_colour(processor.image_mean))
    return np.asarray(processor.preprocess(image, return_tensors="np")["pixel_values"][0])
