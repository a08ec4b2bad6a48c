"""Checks on request arguments, made before any request is sent.

Every failure is an `InvalidRequest` naming the argument and its valid values. Limits come from the
served checkpoint (`ServerInfo`): image sides must be multiples of what its MoVQ and UNet need.
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
    multiple = info.dims.size_multiple
    value = integer(field, value, multiple, info.max_image_size)
    if value % multiple:
        raise InvalidRequest(
            field, f"is {value}; it must be a multiple of {multiple} in [{multiple}, {info.max_image_size}]"
        )
    return value


def steps(field: str, value: Any, scheduler_config: dict, low: int = 1) -> int:
    return integer(field, value, low, int(scheduler_config.get("num_train_timesteps", 1000)))


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
        per_prompt = integer(
            "num_images_per_prompt", kwargs["num_images_per_prompt"], 1, info.max_images_per_request
        )
        if len(prompt) * per_prompt > info.max_images_per_request:
            raise InvalidRequest(
                "num_images_per_prompt",
                f"{len(prompt)} prompts x {per_prompt} images = {len(prompt) * per_prompt}; "
                f"at most {info.max_images_per_request} images per request",
            )
        seed = kwargs.get("seed")
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
            seed=None if seed is None else integer("seed", seed, 0, 2**63 - 1),
        )
