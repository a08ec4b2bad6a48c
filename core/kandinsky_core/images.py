"""Reading images and masks, and the pixel-space preparation diffusers does before the MoVQ encoder.

Conventions (the README repeats them):
- Images may be PIL images, `pathlib.Path`s or path strings to image files, raw file bytes, or uint8
  arrays ([H, W], [H, W, 3] or [H, W, 4]). Every image is converted to 8-bit RGB when read, as
  transformers' CLIPImageProcessor converts: grayscale is replicated, palette images are expanded, and
  transparency is composited onto white. diffusers' img2img/inpaint pipelines resize *before* converting
  (palette images then resize with nearest neighbour, alpha is dropped); converting first gives the same
  result for RGB and grayscale images and a sensible one for the others.
- Masks: white (1, 255, True) = repaint, black = keep, as in diffusers >= 0.19. A mask has the image's
  size. Files are read as diffusers reads PIL masks (Lanczos resize, 8-bit grayscale, >= 50% = repaint);
  arrays may be bool, uint8 (0..255) or float (0..1).
- Resizing for the MoVQ happens here, with the PIL call diffusers makes (bicubic, reducing_gap=1), so the
  server's `encode_latents` receives the image at the generation size.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequest

IMAGE_TYPES = "a PIL image, a path to an image file, file bytes, or a uint8 array [H, W] / [H, W, 3|4]"
# Image files larger than this are refused before they are decoded (a small file can declare a huge
# image). 40 megapixels holds any camera photo; decoded RGB it is 120 MB. Bigger inputs bring nothing:
# CLIP sees 224x224 and the MoVQ at most the maximum generation size.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_FILE_BYTES = 32 * 1024 * 1024
# diffusers' prepare_mask: a pixel to repaint also marks these neighbours (row, column offsets) for
# repainting. It is a 3x3 neighbourhood without the anti-diagonal corners (-1, +1) and (+1, -1).
MASK_GROWTH_OFFSETS = ((-1, 0), (0, -1), (-1, -1), (1, 0), (0, 1), (1, 1))


def _open(value: Any, field: str) -> Image.Image:
    """A PIL image from any accepted source, fully decoded (so truncated files fail here)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return _from_array(value, field)
    if isinstance(value, bytes | bytearray):
        if not value:
            raise InvalidRequest(field, "is empty (0 bytes); expected an image file (PNG, JPEG, WebP, ...)")
        if len(value) > MAX_IMAGE_FILE_BYTES:
            raise InvalidRequest(
                field, f"is {len(value)} bytes; image files may have at most {MAX_IMAGE_FILE_BYTES}"
            )
        source: Any = io.BytesIO(value)
        name = "the given bytes"
    elif isinstance(value, str | Path):
        path = Path(value)
        if not path.is_file():
            raise InvalidRequest(field, f"no such image file: '{path}'")
        if path.stat().st_size == 0:
            raise InvalidRequest(
                field, f"'{path}' is empty (0 bytes); expected an image file (PNG, JPEG, ...)"
            )
        source, name = path, f"'{path}'"
    else:
        raise InvalidRequest(field, f"must be {IMAGE_TYPES}; got {type(value).__name__}")
    try:
        image = Image.open(source)
        if image.width * image.height > MAX_IMAGE_PIXELS:  # known from the header, before decoding
            raise InvalidRequest(
                field,
                f"{name} is {image.width}x{image.height} pixels; at most {MAX_IMAGE_PIXELS} pixels "
                "(larger images bring nothing: they are resized to the generation size)",
            )
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, InvalidRequest):
            raise
        # PIL's own message for an unknown format names a buffer's address: keep messages reproducible.
        reason = "unknown or unsupported format" if isinstance(error, UnidentifiedImageError) else str(error)
        raise InvalidRequest(field, f"{name} is not a readable image file ({reason})") from error
    return image


def _from_array(array: np.ndarray, field: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise InvalidRequest(field, f"is a {array.dtype} array; image arrays must be uint8 (0..255)")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise InvalidRequest(field, f"has shape {array.shape}; valid shapes are [H, W], [H, W, 3], [H, W, 4]")
    if 0 in array.shape:
        raise InvalidRequest(field, f"has shape {array.shape}; an image needs at least 1x1 pixels")
    return Image.fromarray(np.ascontiguousarray(array))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, compositing transparency onto white (transformers' convert_to_rgb)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(value: Any, field: str = "image") -> Image.Image:
    """Any accepted image source -> an RGB PIL image; InvalidRequest naming `field` otherwise."""
    image = to_rgb(_open(value, field))
    if image.width < 1 or image.height < 1:
        raise InvalidRequest(field, f"is {image.width}x{image.height} pixels; an image needs at least 1x1")
    return image


# ControlNet hints: 8-bit grayscale or RGB, as a depth estimator writes them (transformers' depth-estimation
# pipeline returns an "L" image). Alpha, 16-bit and other modes are refused: there is no single obvious
# way to bring them to the [0, 1] the UNet was trained on.
HINT_MODES = ("1", "L", "P", "RGB")


def load_hint(value: Any, field: str = "hint") -> Image.Image:
    """A ControlNet hint (a depth map) as an RGB PIL image; InvalidRequest naming `field` otherwise.

    Grayscale is replicated to 3 channels, as diffusers' documented `make_hint` does with the depth map.
    """
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[-1] not in (1, 3):
        raise InvalidRequest(
            field, f"has shape {value.shape}: {value.shape[-1]} channels; a hint has 1 (grayscale) or 3 (RGB)"
        )
    image = _open(value, field)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha or image.mode not in HINT_MODES:
        what = "has an alpha channel" if has_alpha else f"has PIL mode {image.mode}"
        raise InvalidRequest(
            field,
            f"{what}; a hint is a depth map as an 8-bit grayscale or RGB image "
            "(e.g. the 'depth' image of transformers' depth-estimation pipeline)",
        )
    return load_image(image, field)


def hint_array(hint: Image.Image) -> np.ndarray:
    """An RGB hint as the float32 [1, 3, H, W] in [0, 1] the ControlNet UNet takes (pixel / 255, as in
    diffusers' documented `make_hint`)."""
    values = np.asarray(hint.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(values.transpose(2, 0, 1)[None])


def fit_within(image: Image.Image, largest_side: int) -> Image.Image:
    """`image` shrunk (bicubic, aspect kept) so that no side exceeds `largest_side`; unchanged if it fits.

    Used before CLIP pre-processing, which the server accepts up to MAX_INPUT_IMAGE_SIDE: an image larger
    than that is reduced here, in two resizes instead of diffusers' one (a documented, tiny difference).
    """
    if max(image.size) <= largest_side:
        return image
    scale = largest_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample=Image.Resampling.BICUBIC)


def rgb_array(image: Image.Image) -> np.ndarray:
    """An RGB image as the uint8 [1, H, W, 3] batch that `encode_image` / `encode_latents` take."""
    return np.asarray(image, dtype=np.uint8)[None]


def resize_for_movq(image: Image.Image, height: int, width: int) -> np.ndarray:
    """diffusers' resize before the MoVQ encoder (img2img and inpaint): PIL bicubic, reducing_gap=1."""
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC, reducing_gap=1)
    return rgb_array(resized)


def _mask_from_array(array: np.ndarray, field: str) -> Image.Image:
    """bool / uint8 0..255 / float 0..1 [H, W] -> an 8-bit "L" mask; out-of-range values are refused."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or 0 in array.shape:
        raise InvalidRequest(field, f"has shape {array.shape}; a mask array must be [height, width]")
    if array.dtype == np.bool_:
        return Image.fromarray(np.where(array, 255, 0).astype(np.uint8))
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InvalidRequest(
                field, f"has values in [{low}, {high}]; integer masks must lie in [0, 255] (255 = repaint)"
            )
        return Image.fromarray(array.astype(np.uint8))
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidRequest(field, "contains NaN or Inf; float masks must lie in [0, 1] (1 = repaint)")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InvalidRequest(
                field, f"has values in [{low:g}, {high:g}]; float masks must lie in [0, 1] (1 = repaint)"
            )
        # diffusers binarises float masks at 0.5; doing it before the 8-bit conversion keeps that threshold.
        return Image.fromarray(np.where(array >= 0.5, 255, 0).astype(np.uint8))
    raise InvalidRequest(field, f"is a {array.dtype} array; valid mask dtypes are bool, uint8 and float")


def load_mask(value: Any, image_size: tuple[int, int], field: str = "mask_image") -> Image.Image:
    """A mask (white = repaint) of exactly `image_size` (width, height), as a PIL image."""
    if isinstance(value, np.ndarray):
        mask = _mask_from_array(value, field)
    else:
        mask = _open(value, field)
        if mask.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit files: check the value range
            mask = _mask_from_array(np.asarray(mask), field)
    if mask.size != tuple(image_size):
        raise InvalidRequest(
            field,
            f"is {mask.width}x{mask.height} pixels; it must have the image's size "
            f"{image_size[0]}x{image_size[1]} (white = repaint, black = keep)",
        )
    return mask


def repaint_mask(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """bool [height, width], True = repaint: diffusers' prepare_mask_and_masked_image for a PIL mask."""
    resized = mask.resize((width, height), resample=Image.Resampling.LANCZOS)
    values = np.asarray(resized.convert("L")).astype(np.float32) / np.float32(255.0)
    return values >= 0.5


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="nearest") source indices (float32 scale, floor)."""
    if size_in == size_out:
        return np.arange(size_out)
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)


def grow_repaint_region(repaint: np.ndarray) -> np.ndarray:
    """diffusers' prepare_mask, vectorised: a max-pool of the repaint mask over its footprint.

    The reference walks every pixel in Python; here each footprint offset is one shifted view, so the
    cost is six array operations whatever the size. Works on the last two axes.
    """
    repaint = np.asarray(repaint, dtype=bool)
    grown = repaint.copy()
    height, width = repaint.shape[-2:]
    for di, dj in MASK_GROWTH_OFFSETS:
        # grown[t] |= repaint[t + (di, dj)] wherever t + (di, dj) lies inside the mask.
        rows_t = slice(max(0, -di), height - max(0, di))
        cols_t = slice(max(0, -dj), width - max(0, dj))
        rows_s = slice(max(0, di), height - max(0, -di))
        cols_s = slice(max(0, dj), width - max(0, -dj))
        grown[..., rows_t, cols_t] |= repaint[..., rows_s, cols_s]
    return grown


def latent_keep_mask(repaint: np.ndarray, latent_size: tuple[int, int]) -> np.ndarray:
    """float32 [1, 1, h, w], 1 = keep: the pixel mask brought to latent size (nearest), repaint grown."""
    rows = _nearest_indices(repaint.shape[0], latent_size[0])
    cols = _nearest_indices(repaint.shape[1], latent_size[1])
    small = repaint[np.ix_(rows, cols)]
    return (~grow_repaint_region(small)).astype(np.float32)[None, None]


def outpaint_canvas(
    image: Image.Image, left: int, top: int, right: int, bottom: int
) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas and the mask of the new area (white = repaint).

    The new area repeats the edge pixels rather than a flat colour: the MoVQ encoder sees plausible content
    across the seam, so the kept latents next to it are not pulled towards the fill colour.
    """
    array = np.asarray(image)
    canvas = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top : top + array.shape[0], left : left + array.shape[1]] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)
