"""Checks on request arguments, made before any request is sent.

Every failure is an `InvalidRequest` naming the argument and its valid values. Limits come from the
served checkpoint (`ServerInfo`): image sides must be multiples of what its MoVQ and UNet need.
Image and mask contents are checked where they are read (`images.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequest

if TYPE_CHECKING:
    from .pipeline import ServerInfo

MIN_PRIOR_STEPS = 2  # UnCLIPScheduler.set_timesteps divides by (steps - 1)


def prompt_list(field: str, value: Any, *, allow_empty_text: bool = True) -> list[str]:
    """A prompt or a non-empty list of prompts, as a list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, bytes) or len(value) == 0:
        raise InvalidRequest(field, "must be a string or a non-empty list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRequest(f"{field}[{i}]", f"must be a string, got {type(item).__name__}")
        if not allow_empty_text and not item.strip():
            raise InvalidRequest(f"{field}[{i}]", "must not be empty")
    return list(value)


def integer(field: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise InvalidRequest(field, f"must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        valid = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidRequest(field, f"is {value}; valid values are {valid}")
    return value


def number(field: str, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(field, f"must be a finite number, got {value!r}")
    if value < low:
        raise InvalidRequest(field, f"is {value}; it must be >= {low}")
    return float(value)


def image_side(field: str, value: Any, info: ServerInfo) -> int:
    """A multiple of the checkpoint's size unit, within what the served models accept."""
    multiple = info.dims.size_multiple
    if info.static_size is not None:
        expected = info.static_size[0 if field == "height" else 1]
        value = integer(field, value, 1)
        if value != expected:
            raise InvalidRequest(
                field,
                f"is {value}; the server's engines are built for {info.static_size[0]}x{info.static_size[1]} only",
            )
        return value
    smallest = max(multiple, info.min_image_size)
    value = integer(field, value, smallest, info.max_image_size)
    if value % multiple:
        raise InvalidRequest(
            field, f"is {value}; it must be a multiple of {multiple} in [{smallest}, {info.max_image_size}]"
        )
    return value


def steps(field: str, value: Any, scheduler_config: dict, low: int = 1) -> int:
    return integer(field, value, low, int(scheduler_config.get("num_train_timesteps", 1000)))


def seed(value: Any) -> int | None:
    return None if value is None else integer("seed", value, 0, 2**63 - 1)


def images_per_request(field: str, value: Any, info: ServerInfo, prompts: int = 1) -> int:
    per_prompt = integer(field, value, 1, info.max_images_per_request)
    if prompts * per_prompt > info.max_images_per_request:
        raise InvalidRequest(
            field,
            f"{prompts} prompts x {per_prompt} images = {prompts * per_prompt}; "
            f"at most {info.max_images_per_request} images per request",
        )
    return per_prompt


def strength(field: str, value: Any, num_steps: int) -> float:
    """A strength in (0, 1] that keeps at least one of `num_steps` steps.

    diffusers' get_timesteps keeps int(num_steps * strength) steps; with none there is no timestep to
    noise the input at and no step to run, so such a strength is refused rather than passed on.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(field, f"must be a finite number in (0, 1], got {value!r}")
    if not 0.0 < value <= 1.0:
        raise InvalidRequest(field, f"is {value}; valid values are (0, 1]")
    if int(num_steps * value) < 1:
        raise InvalidRequest(
            field,
            f"is {value}: with {num_steps} steps that keeps int({num_steps} x {value}) = 0 denoising steps; "
            f"valid values are [{1 / num_steps:.4g}, 1] for {num_steps} steps",
        )
    return float(value)


def output_size(info: ServerInfo, height: Any, width: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """Requested (height, width), each defaulting to the input image's side (image_size is (w, h))."""
    sides = []
    for field, value, from_image in (("height", height, image_size[1]), ("width", width, image_size[0])):
        if value is not None:
            sides.append(image_side(field, value, info))
            continue
        try:
            sides.append(image_side(field, from_image, info))
        except InvalidRequest as error:
            raise InvalidRequest(
                field,
                f"defaults to the image's {field}, {from_image}, which is not valid "
                f"({str(error).split(': ', 1)[1]}); pass {field} explicitly",
            ) from None
    return sides[0], sides[1]


def outpaint_margins(
    info: ServerInfo, image_size: tuple[int, int], left: Any, top: Any, right: Any, bottom: Any
) -> tuple[int, int, int, int]:
    """Pixels added on each side: >= 0, at least one > 0, and a canvas within the maximum image size."""
    margins = {
        name: integer(name, value, 0)
        for name, value in zip(("left", "top", "right", "bottom"), (left, top, right, bottom), strict=True)
    }
    if not any(margins.values()):
        raise InvalidRequest("left, top, right, bottom", "are all 0; extend at least one side by >= 1 pixel")
    largest = info.max_image_size
    for fields, side, size in (
        ("left, right", "width", image_size[0]),
        ("top, bottom", "height", image_size[1]),
    ):
        first, second = fields.split(", ")
        canvas = size + margins[first] + margins[second]
        if canvas > largest:
            room = (
                f"{first} + {second} <= {largest - size}"
                if size <= largest
                else "none: shrink the image first"
            )
            raise InvalidRequest(
                fields,
                f"image {side} {size} + {first} {margins[first]} + {second} {margins[second]} = {canvas} "
                f"exceeds the maximum image size {largest}; valid: {room}",
            )
    return margins["left"], margins["top"], margins["right"], margins["bottom"]


def fusion_inputs(images_and_prompts: Any, weights: Any) -> tuple[list[Any], list[float]]:
    """A non-empty list of prompts/images and one finite weight >= 0 per item, not all zero."""
    if (
        not isinstance(images_and_prompts, Sequence)
        or isinstance(images_and_prompts, str | bytes)
        or len(images_and_prompts) == 0
    ):
        raise InvalidRequest("images_and_prompts", "must be a non-empty list of prompts (str) and images")
    if not isinstance(weights, Sequence) or isinstance(weights, str | bytes) or len(weights) == 0:
        raise InvalidRequest("weights", "must be a non-empty list of numbers >= 0, one per item")
    if len(weights) != len(images_and_prompts):
        raise InvalidRequest(
            "weights",
            f"has {len(weights)} entries for {len(images_and_prompts)} images_and_prompts; give one per item",
        )
    checked = []
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise InvalidRequest(f"weights[{i}]", f"must be a finite number >= 0, got {weight!r}")
        if weight < 0:
            raise InvalidRequest(f"weights[{i}]", f"is {weight}; valid values are >= 0")
        checked.append(float(weight))
    if not any(checked):
        raise InvalidRequest("weights", "are all 0; at least one weight must be > 0")
    return list(images_and_prompts), checked


@dataclass(frozen=True)
class DecoderRequest:
    """The decoder arguments of the modes without a text prompt (variations, fusion)."""

    height: int
    width: int
    decoder_steps: int
    decoder_guidance_scale: float
    seed: int | None

    @classmethod
    def build(cls, info: ServerInfo, **kwargs: Any) -> DecoderRequest:
        return cls(
            height=image_side("height", kwargs["height"], info),
            width=image_side("width", kwargs["width"], info),
            decoder_steps=steps("decoder_steps", kwargs["decoder_steps"], info.decoder_scheduler),
            decoder_guidance_scale=number("decoder_guidance_scale", kwargs["decoder_guidance_scale"]),
            seed=seed(kwargs.get("seed")),
        )


@dataclass(frozen=True)
class TextToImageRequest:
    prompt: list[str]
    negative_prompt: list[str] | None
    num_images_per_prompt: int
    height: int
    width: int
    prior_steps: int
    prior_guidance_scale: float
    decoder_steps: int
    decoder_guidance_scale: float
    seed: int | None

    @classmethod
    def build(cls, info: ServerInfo, **kwargs: Any) -> TextToImageRequest:
        prompt = prompt_list("prompt", kwargs["prompt"])
        negative = kwargs.get("negative_prompt")
        if negative is not None:
            negative = prompt_list("negative_prompt", negative)
            if len(negative) == 1 and len(prompt) > 1:
                negative = negative * len(prompt)
            if len(negative) != len(prompt):
                raise InvalidRequest(
                    "negative_prompt",
                    f"has {len(negative)} entries for {len(prompt)} prompts; give one, or one per prompt",
                )
        per_prompt = images_per_request(
            "num_images_per_prompt", kwargs["num_images_per_prompt"], info, len(prompt)
        )
        return cls(
            prompt=prompt,
            negative_prompt=negative,
            num_images_per_prompt=per_prompt,
            height=image_side("height", kwargs["height"], info),
            width=image_side("width", kwargs["width"], info),
            prior_steps=steps("prior_steps", kwargs["prior_steps"], info.prior_scheduler, MIN_PRIOR_STEPS),
            prior_guidance_scale=number("prior_guidance_scale", kwargs["prior_guidance_scale"]),
            decoder_steps=steps("decoder_steps", kwargs["decoder_steps"], info.decoder_scheduler),
            decoder_guidance_scale=number("decoder_guidance_scale", kwargs["decoder_guidance_scale"]),
            seed=seed(kwargs.get("seed")),
        )
