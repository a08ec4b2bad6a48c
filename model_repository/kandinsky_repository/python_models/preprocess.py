"""Pre-processing models: uint8 RGB images -> the inputs of the CLIP image encoder and the MoVQ encoder.

`preprocess_clip_image` does what the checkpoint's `CLIPImageProcessor` does (transformers' PIL
backend, which diffusers' prior pipelines use): resize the shortest edge with PIL (bicubic), center
crop, rescale, normalise with the CLIP mean/std, every setting read from the checkpoint's
`preprocessor_config.json`. transformers itself cannot be imported in the python backend stub (it pulls
in ssl), so this is numpy + PIL, with the same operations in the same order and dtypes; a unit test
checks it against transformers pixel for pixel.

`preprocess_movq_image` maps uint8 to [-1, 1] as diffusers' `VaeImageProcessor` does
(`2 * (x / 255) - 1` in float32, identical to the inpainting pipeline's `x / 127.5 - 1` for every uint8
value). It does not resize: the image arrives at the generation size, because the client resizes it with
the very PIL call diffusers makes (`resize((width, height), BICUBIC, reducing_gap=1)`) while building the
request, which also keeps large photos off the wire.

Size limits (config parameters written by the repository generator), checked on the declared shape
before any pixel is read, so that one request cannot make the backend allocate gigabytes:
`preprocess_movq_image` takes sides up to the repository's `max_image_size` (the largest generation);
`preprocess_clip_image` up to `max_input_side` (`MAX_INPUT_IMAGE_SIDE` of the registry; the client
downscales larger photos).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kandinsky_client.components import MAX_IMAGE_SIZE, MAX_INPUT_IMAGE_SIDE
from kandinsky_export.bundle import IMAGE_PROCESSOR_CONFIG
from PIL import Image

from .base import BatchingModel, InvalidInput, require_side

# Used when a repository's config has no limit parameter (written by an older generator).
DEFAULT_MAX_IMAGE_SIZE = MAX_IMAGE_SIZE

# transformers' CLIPImageProcessorPil class defaults, for keys a checkpoint's config leaves out.
_CLIP_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


@dataclass(frozen=True)
class ClipPreprocessing:
    """The settings of a CLIPImageProcessor config that change its output."""

    do_resize: bool
    shortest_edge: int | None  # resize keeping the aspect ratio, or
    resize_to: tuple[int, int] | None  # a fixed (height, width)
    resample: int
    do_center_crop: bool
    crop_size: tuple[int, int]
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClipPreprocessing:
        values = {**_CLIP_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        size = values["size"]
        if isinstance(size, int):  # legacy configs: an int is the shortest edge
            size = {"shortest_edge": size}
        if set(size) == {"shortest_edge"}:
            shortest, resize_to = int(size["shortest_edge"]), None
        elif set(size) == {"height", "width"}:
            shortest, resize_to = None, (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(
                f"unsupported CLIPImageProcessor size {size!r}: use shortest_edge or height/width"
            )
        crop = values["crop_size"]
        crop = (int(crop), int(crop)) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        return cls(
            do_resize=bool(values["do_resize"]),
            shortest_edge=shortest,
            resize_to=resize_to,
            resample=int(values["resample"]),
            do_center_crop=bool(values["do_center_crop"]),
            crop_size=crop,
            do_rescale=bool(values["do_rescale"]),
            rescale_factor=float(values["rescale_factor"]),
            do_normalize=bool(values["do_normalize"]),
            image_mean=tuple(float(m) for m in values["image_mean"]),
            image_std=tuple(float(s) for s in values["image_std"]),
        )

    @classmethod
    def from_file(cls, path: Path) -> ClipPreprocessing:
        return cls.from_config(json.loads(Path(path).read_text()))


def _resized_size(height: int, width: int, settings: ClipPreprocessing) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False), for (height, width)."""
    if settings.resize_to is not None:
        return settings.resize_to
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = settings.shortest_edge, int(settings.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """transformers' center_crop on an HWC array, zero-padding an image smaller than the crop."""
    height, width = image.shape[:2]
    crop_h, crop_w = size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return image[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w, *image.shape[2:]), dtype=image.dtype)
    top_pad, left_pad = -(-(new_h - height) // 2), -(-(new_w - width) // 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = image
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def clip_preprocess_one(image: np.ndarray, settings: ClipPreprocessing) -> np.ndarray:
    """One uint8 HWC RGB image -> float32 CHW pixel_values, in transformers' order and dtypes."""
    if settings.do_resize:
        height, width = _resized_size(image.shape[0], image.shape[1], settings)
        image = np.asarray(
            Image.fromarray(image).resize((width, height), resample=settings.resample, reducing_gap=None)
        )
    if settings.do_center_crop:
        image = _center_crop(image, settings.crop_size)
    if settings.do_rescale:  # transformers rescales in float64, then casts to float32
        image = (image.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    if settings.do_normalize:
        image = image.astype(np.float32, copy=False)
        mean = np.array(settings.image_mean, dtype=np.float32)
        std = np.array(settings.image_std, dtype=np.float32)
        image = (image - mean) / std
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def clip_preprocess(images: np.ndarray, settings: ClipPreprocessing) -> np.ndarray:
    """uint8 [batch, H, W, 3] -> float32 [batch, 3, crop_h, crop_w]."""
    return np.stack([clip_preprocess_one(image, settings) for image in images])


def movq_preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 [batch, H, W, 3] -> float32 [batch, 3, H, W] in [-1, 1] (VaeImageProcessor arithmetic)."""
    unit = images.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((np.float32(2.0) * unit - np.float32(1.0)).transpose(0, 3, 1, 2))


def require_image(name: str, shape: Sequence[int], max_side: int) -> None:
    """The declared shape of a batch of uint8 HWC RGB images, with both sides in [1, max_side]."""
    if len(shape) != 4 or shape[-1] != 3:
        raise InvalidInput(f"input '{name}' has shape {list(shape)}; expected [batch, height, width, 3]")
    require_side(name, "height", shape[1], max_side)
    require_side(name, "width", shape[2], max_side)


class PreprocessClipImage(BatchingModel):
    def setup(self, parameters: Mapping[str, str]) -> None:
        path = self.version_dir / IMAGE_PROCESSOR_CONFIG  # placed there by the generator
        self.settings = ClipPreprocessing.from_file(path)
        self.max_side = int(parameters.get("max_input_side", MAX_INPUT_IMAGE_SIDE))

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        require_image("image_rgb", shapes["image_rgb"], self.max_side)

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"pixel_values": clip_preprocess(inputs["image_rgb"], self.settings)}


class PreprocessMovqImage(BatchingModel):
    def setup(self, parameters: Mapping[str, str]) -> None:
        self.max_side = int(parameters.get("max_image_size", DEFAULT_MAX_IMAGE_SIZE))

    def validate_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        require_image("image_rgb", shapes["image_rgb"], self.max_side)

    def compute(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": movq_preprocess(inputs["image_rgb"])}


__all__: Sequence[str] = ["PreprocessClipImage", "PreprocessMovqImage", "clip_preprocess", "movq_preprocess"]
