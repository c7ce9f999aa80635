"""Images: LLaVA's expand2square and CLIP preprocessing, identical to the HF processor."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from llava_trainer.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    ClipPreprocess,
    ImageError,
    ImagePipeline,
    background_colour,
    check_image,
    decode_rgb,
    expand2square,
    hf_reference_pixels,
    load_image,
)
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from image_fixtures import claims_size

pytestmark = pytest.mark.trainer  # the training path resizes with torch


def clip_processor(resolution: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": resolution},
        crop_size={"height": resolution, "width": resolution},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth content with noise and a hard edge, like a real photo, JPEG-encoded and decoded."""
    import io

    rng = np.random.default_rng(seed)
    x, y = np.linspace(0, 1, width)[None, :, None], np.linspace(0, 1, height)[:, None, None]
    pixels = 200 * x * (1 - 0.5 * y) + rng.normal(0, 10, (height, width, 3)) + [20, 40, 60]
    pixels[: height // 2, : width // 3] = [250, 10, 10]
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG")
    return Image.open(buffer).convert("RGB")


def test_pad_colour_is_the_clip_mean():
    assert background_colour(CLIP_MEAN) == (122, 116, 104)


@pytest.mark.parametrize(("size", "offset"), [((40, 20), (0, 10)), ((20, 40), (10, 0))])
def test_expand2square_centres_the_image_on_the_mean_colour(size, offset):
    square = expand2square(Image.new("RGB", size, (255, 0, 0)), (122, 116, 104))
    assert square.size == (40, 40)
    pixels = np.asarray(square)
    x, y = offset
    assert tuple(pixels[y, x]) == (255, 0, 0)
    assert tuple(pixels[0, 0]) == (122, 116, 104)
    assert (pixels == (255, 0, 0)).all(axis=2).sum() == 40 * 20


SIZES = [(640, 480), (333, 500), (336, 336), (448, 336), (20, 90), (91, 17)]
TWO_LEVELS = 2 / 255 / min(CLIP_STD) + 1e-5
"""Two 8-bit intensity levels in normalised units."""


@pytest.mark.parametrize("resolution", [56, 336])
@pytest.mark.parametrize("aspect", ["square", "pad"])
@pytest.mark.parametrize("size", SIZES)
def test_pil_resize_path_is_bit_identical_to_clip_image_processor(resolution, aspect, size):
    processor = clip_processor(resolution)
    image = noise(*size)
    ours = ImagePipeline(processor, aspect, resize="pil")(image)
    assert ours.dtype == np.float32 and ours.shape == (3, resolution, resolution)
    assert np.array_equal(ours, hf_reference_pixels(processor, image, aspect))


@pytest.mark.parametrize("resolution", [56, 336])
@pytest.mark.parametrize("aspect", ["square", "pad"])
@pytest.mark.parametrize("size", SIZES)
def test_torch_resize_path_is_within_two_levels_of_clip_image_processor(resolution, aspect, size):
    processor = clip_processor(resolution)
    image = photo(*size)
    ours = ImagePipeline(processor, aspect)(image)
    reference = hf_reference_pixels(processor, image, aspect)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    difference = np.abs(ours - reference)
    assert difference.max() <= TWO_LEVELS
    assert (difference > 1e-5).mean() < 0.02


def test_processor_values_are_read_from_the_processor():
    recipe = ClipPreprocess.from_processor(clip_processor(336))
    assert recipe.resolution == (336, 336)
    assert recipe.resized_size(640, 480) == (448, 336)
    table = recipe.lookup_table()
    assert table.shape == (3, 256) and table[0, 0] == pytest.approx(-CLIP_MEAN[0] / CLIP_STD[0], rel=1e-6)


def test_a_missing_image_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "coco" / "train2017" / "000000000009.jpg"
    with pytest.raises(ImageError, match=r"000000000009\.jpg") as err:
        load_image(path)
    assert err.value.problem == "missing" and err.value.path == str(path)


def test_a_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    noise(64, 48).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageError, match=r"broken\.jpg") as err:
        load_image(path)
    assert err.value.problem == "corrupt"
    problem, fmt = check_image(path)
    assert (problem.problem, problem.path, fmt) == ("corrupt", str(path), None)
    assert problem.reason.startswith("corrupt: ")  # Pillow's words for what is wrong


def test_check_image_reports_the_real_format(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    noise(30, 30).save(path, "PNG")
    assert check_image(path) == (None, "PNG")
    missing, fmt = check_image(tmp_path / "nope.jpg")
    assert (missing.problem, missing.reason, fmt) == ("missing", "missing", None)


@pytest.mark.parametrize("fast", [True, False])
def test_an_image_above_the_pixel_bound_is_too_large_with_its_size(tmp_path, monkeypatch, fast):
    """Prepare's check and training's decoders give the same reason, with the declared size."""
    from llava_trainer.data import images

    if not fast:
        monkeypatch.setattr(images, "simplejpeg", None)
    path = claims_size(tmp_path / "huge.jpg", 20000, 20000)
    problem, fmt = check_image(path)
    assert problem.problem == "too large" and problem.reason.startswith("too large: 20000x20000 ")
    assert str(2 * Image.MAX_IMAGE_PIXELS) in problem.reason and fmt is None
    for decoder in (load_image, decode_rgb):
        with pytest.raises(ImageError) as err:
            decoder(path)
        assert err.value.problem == "too large" and err.value.reason == problem.reason
        assert err.value.path == str(path) and "20000x20000" in str(err.value)


def test_grayscale_and_palette_images_become_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (30, 20), 77).save(path)
    pixels = ImagePipeline(clip_processor(56), "pad").load(path)
    assert pixels.shape == (3, 56, 56)


# --- decode_rgb: libjpeg-turbo via simplejpeg, bit-identical to Pillow --------------------------


def jpeg_file(path, width: int, height: int, *, seed: int = 0, mode: str = "RGB", **save) -> Path:
    image = photo(width, height, seed)
    image = image.convert(mode) if mode != "RGB" else image
    image.save(path, "JPEG", **save)
    return path


def pil_pixels(path) -> np.ndarray:
    return np.asarray(load_image(path))


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("quality", [40, 75, 95])
@pytest.mark.parametrize("size", [(336, 336), (448, 336), (333, 501), (17, 9), (640, 480)])
def test_decode_rgb_is_bit_identical_to_pillow(tmp_path, subsampling, progressive, quality, size):
    path = jpeg_file(
        tmp_path / "x.jpg",
        *size,
        seed=quality,
        quality=quality,
        subsampling=subsampling,
        progressive=progressive,
    )
    pixels = decode_rgb(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (size[1], size[0], 3)
    assert np.array_equal(pixels, pil_pixels(path))


def test_decode_rgb_takes_the_fast_path_for_ordinary_jpegs(tmp_path, monkeypatch):
    pytest.importorskip("simplejpeg")
    from llava_trainer.data import images

    color = jpeg_file(tmp_path / "color.jpg", 64, 48)
    gray = jpeg_file(tmp_path / "gray.jpg", 64, 48, mode="L")
    expected = {p: pil_pixels(p) for p in (color, gray)}
    monkeypatch.setattr(images, "load_image", lambda path: pytest.fail(f"Pillow decoded {path}"))
    for path, pixels in expected.items():
        assert np.array_equal(decode_rgb(path), pixels)


@pytest.mark.parametrize("fast", [True, False])
def test_decode_rgb_falls_back_to_pillow_with_the_same_result(tmp_path, monkeypatch, fast):
    """CMYK JPEG (Pillow's colour conversion, not libjpeg's), PNG named .jpg, a JPEG with trailing
    junk (libjpeg warns), a multi-picture JPEG; and everything without simplejpeg installed."""
    from llava_trainer.data import images

    if not fast:
        monkeypatch.setattr(images, "simplejpeg", None)
    cmyk = jpeg_file(tmp_path / "cmyk.jpg", 50, 40, mode="CMYK")
    png = tmp_path / "really_a_png.jpg"
    photo(30, 20).save(png, "PNG")
    junk = jpeg_file(tmp_path / "junk.jpg", 40, 30)
    junk.write_bytes(junk.read_bytes()[:-2] + b"\x00" * 50 + b"\xff\xd9")
    mpo = tmp_path / "mpo.jpg"
    photo(40, 30).save(mpo, "MPO", save_all=True, append_images=[photo(40, 30, seed=1)])
    for path in (cmyk, png, junk, mpo):
        assert np.array_equal(decode_rgb(path), pil_pixels(path)), path.name


@pytest.mark.parametrize("fast", [True, False])
def test_decode_rgb_names_missing_and_corrupt_files(tmp_path, monkeypatch, fast):
    from llava_trainer.data import images

    if not fast:
        monkeypatch.setattr(images, "simplejpeg", None)
    truncated = jpeg_file(tmp_path / "truncated.jpg", 64, 48)
    truncated.write_bytes(truncated.read_bytes()[:300])
    for path, problem in (
        (tmp_path / "missing.jpg", "missing"),
        (truncated, "corrupt"),
        (tmp_path, "corrupt"),
    ):
        with pytest.raises(ImageError) as err:
            decode_rgb(path)
        assert err.value.problem == problem and err.value.path == str(path)


def test_decode_rgb_leaves_decompression_bombs_to_pillow(tmp_path, monkeypatch):
    path = jpeg_file(tmp_path / "big.jpg", 64, 48)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 3)  # more than twice: Pillow refuses
    with pytest.raises(ImageError) as err:
        decode_rgb(path)
    assert err.value.problem == "too large" and err.value.reason.startswith("too large: 64x48 ")
