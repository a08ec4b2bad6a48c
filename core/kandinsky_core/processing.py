"""The numeric pre/post-processing the served python models run, usable without Triton.

The python models (`kandinsky_repository.python_models`) wrap these in Triton's batching and input
checks; the exporter's calibration run (`kandinsky_export.calibration`) calls them directly, so the FP16
check sees exactly what the served pipeline computes.

- CLIP image pre-processing: what the checkpoint's `CLIPImageProcessor` does (transformers' PIL backend,
  which diffusers' prior pipelines use), every setting read from its `preprocessor_config.json`, in numpy
  + PIL with the same operations in the same order and dtypes (transformers cannot be imported in the
  python backend stub: it pulls in ssl).
- MoVQ pre-processing: uint8 -> [-1, 1] as diffusers' `VaeImageProcessor` (`2 * (x / 255) - 1`).
- Post-processing: [-1, 1] NCHW float -> uint8 NHWC with diffusers' arithmetic.
- Tokenizing: the `tokenizers` library on the `tokenizer.json` the export writes, padded to
  `model_max_length` and truncated, like KandinskyV22PriorPipeline._encode_prompt (`tokenizers` is
  imported only when a tokenizer is loaded: the client never needs it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC, with diffusers' arithmetic (x*0.5+0.5, clamp, *255, round)."""
    image = np.clip(image.astype(np.float32) * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
    return (image.transpose(0, 2, 3, 1) * np.float32(255)).round().astype(np.uint8)


def load_tokenizer(folder: Path):
    """A `tokenizers.Tokenizer` that pads with the pad token and truncates to the model's max length."""
    from tokenizers import Tokenizer

    config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    max_length = int(config["model_max_length"])
    pad_token = config.get("pad_token") or config["eos_token"]
    pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    return tokenizer


def tokenize(tokenizer, prompts: list[str]) -> dict[str, np.ndarray]:
    encodings = tokenizer.encode_batch(prompts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=bool),
    }
