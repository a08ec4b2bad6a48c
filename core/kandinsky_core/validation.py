"""Checks on request arguments, made before any network evaluation runs.

Every failure is an `InvalidRequest` naming the argument and its valid values. The client runs these
checks before it sends anything, and the server-side generation model runs the very same ones on what it
receives, so both answer a bad request with the same message. Limits come from the served checkpoint
(`ServerInfo`): image sides must be multiples of what its MoVQ and UNet need. Image and mask contents are
checked where they are read (`images.py`).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .components import MAX_PROMPT_BYTES
from .errors import InvalidRequest
from .generation import Plan, new_decoder_scheduler
from .images import load_hint, load_image, load_mask
from .modes import CANVAS_PICTURE, FUSION
from .request import DEFAULT_IMAGE_SIDE, OUTPUT_TYPES, GenerationRequest, check_fields_apply
from .schedulers import check_prior_scheduler, strength_timesteps
from .server_info import ServerInfo

MIN_PRIOR_STEPS = 2  # UnCLIPScheduler.set_timesteps divides by (steps - 1)


# Classifier-free guidance scales above this are refused. The guided prediction uncond + g * (cond - uncond)
# is fed back into the next step, so a huge g (1e30, 1e308) overflows float32 a step later and the
# networks answer NaN; diffusers' Kandinsky pipelines default to 4, and scales beyond a few tens only
# saturate the picture.
MAX_GUIDANCE_SCALE = 100.0


def prompt_list(field: str, value: Any, *, allow_empty_text: bool = True) -> list[str]:
    """A prompt or a non-empty list of prompts, as a list."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, bytes) or len(value) == 0:
        raise InvalidRequest(field, "must be a string or a non-empty list of strings")
    for i, item in enumerate(value):
        text(f"{field}[{i}]" if len(value) > 1 else field, item)
        if not allow_empty_text and not item.strip():
            raise InvalidRequest(f"{field}[{i}]", "must not be empty")
    return list(value)


def text(field: str, value: Any) -> str:
    """A string that encodes as UTF-8 within MAX_PROMPT_BYTES (CLIP keeps 77 tokens of it anyway)."""
    if not isinstance(value, str):
        raise InvalidRequest(field, f"must be a string, got {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise InvalidRequest(
            field, f"is not valid UTF-8 text ({error.reason} at position {error.start})"
        ) from None
    if size > MAX_PROMPT_BYTES:
        raise InvalidRequest(field, f"is {size} bytes of UTF-8; at most {MAX_PROMPT_BYTES}")
    return value


def integer(field: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise InvalidRequest(field, f"must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        valid = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidRequest(field, f"is {value}; valid values are {valid}")
    return value


def number(field: str, value: Any, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(field, f"must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        valid = f">= {low}" if high is None else f"in [{low:g}, {high:g}]"
        raise InvalidRequest(field, f"is {value}; it must be {valid}")
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


MAX_SEED = 2**63 - 1


def seed(value: Any) -> int:
    """The given seed, or a fresh random one (returned with the result, so any image can be redone)."""
    return secrets.randbelow(MAX_SEED + 1) if value is None else integer("seed", value, 0, MAX_SEED)


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


def output_size(
    info: ServerInfo, height: Any, width: Any, image_size: tuple[int, int], source: str = "image"
) -> tuple[int, int]:
    """Requested (height, width), each defaulting to the `source` image's side (image_size is (w, h))."""
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
                f"defaults to the {source}'s {field}, {from_image}, which is not valid "
                f"({str(error).split(': ', 1)[1]}); pass {field} explicitly",
            ) from None
    return sides[0], sides[1]


def hint_size(size: tuple[int, int], height: int, width: int) -> None:
    """The hint (size (w, h)) must have the output's size: the UNet embeds it at the latents' scale."""
    if size != (width, height):
        raise InvalidRequest(
            "hint",
            f"is {size[0]}x{size[1]} pixels (width x height); it must have the output's size {width}x{height}: "
            "resize the depth map, or leave height and width to default to the hint's",
        )


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


def check_request(request: GenerationRequest, info: ServerInfo) -> GenerationRequest:
    """`request` checked against `info` and normalised, or InvalidRequest naming the first bad field.

    Normalised: prompts are lists (one negative prompt per prompt), images are RGB PIL images (masks
    "L"), fusion items are prompts or RGB images, sizes and seed are concrete, numbers have their types.
    Checking a checked request again changes nothing.
    """
    return plan_request(request, info).request


def plan_request(request: GenerationRequest, info: ServerInfo) -> Plan:
    """`request` checked (as `check_request` does) and planned: the decoder scheduler built to check the
    scheduler fields is the one its plan keeps for the step counts and the loop.

    What is checked follows the mode's definition: the fields it takes and requires, where its output
    size comes from (the hint, else the picture its decoder starts from, else the default), and which
    loop `strength` cuts.
    """
    mode = check_fields_apply(request)
    changes: dict[str, Any] = {}
    prompts = 1
    if request.prompt is not None:
        changes["prompt"] = prompt_list("prompt", request.prompt)
        prompts = len(changes["prompt"])
        if request.negative_prompt is not None:
            negative = prompt_list("negative_prompt", request.negative_prompt)
            if len(negative) == 1 and prompts > 1:
                negative = negative * prompts
            if len(negative) != prompts:
                raise InvalidRequest(
                    "negative_prompt",
                    f"has {len(negative)} entries for {prompts} prompts; give one, or one per prompt",
                )
            changes["negative_prompt"] = negative
    changes["num_images_per_prompt"] = images_per_request(
        "num_images_per_prompt", request.num_images_per_prompt, info, prompts
    )
    changes["num_inference_steps"] = steps(
        "num_inference_steps", request.num_inference_steps, info.decoder_scheduler
    )
    changes["guidance_scale"] = number("guidance_scale", request.guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    changes["prior_num_inference_steps"] = steps(
        "prior_num_inference_steps", request.prior_num_inference_steps, info.prior_scheduler, MIN_PRIOR_STEPS
    )
    changes["prior_guidance_scale"] = number(
        "prior_guidance_scale", request.prior_guidance_scale, 0.0, MAX_GUIDANCE_SCALE
    )
    changes["seed"] = seed(request.seed)
    scheduler_fields, scheduler = _scheduler_fields(request, info, changes["num_inference_steps"])
    changes.update(scheduler_fields)
    if request.output_type not in OUTPUT_TYPES:
        raise InvalidRequest(
            "output_type", f"is {request.output_type!r}; valid values: {', '.join(OUTPUT_TYPES)}"
        )
    if mode.embeddings is FUSION:
        changes.update(_fusion_fields(request))
    if request.image is not None:
        changes["image"] = load_image(request.image, "image")
    if request.mask_image is not None:
        changes["mask_image"] = load_mask(request.mask_image, changes["image"].size, "mask_image")
    if request.hint is not None:
        changes["hint"] = load_hint(request.hint, "hint")
    if mode.decoder.picture == CANVAS_PICTURE:
        margins = outpaint_margins(
            info, changes["image"].size, request.left, request.top, request.right, request.bottom
        )
        changes.update(zip(("left", "top", "right", "bottom"), margins, strict=True))
        left, top, right, bottom = margins
        width, height = changes["image"].size
        changes["height"], changes["width"] = output_size(
            info, request.height, request.width, (width + left + right, height + top + bottom)
        )
    elif request.hint is not None:  # the hint is not resized (diffusers takes it as it is): it sets the size
        changes["height"], changes["width"] = output_size(
            info, request.height, request.width, changes["hint"].size, "hint"
        )
        hint_size(changes["hint"].size, changes["height"], changes["width"])
    elif mode.decoder.picture is not None:  # the decoder starts from the input image, resized
        changes["height"], changes["width"] = output_size(
            info, request.height, request.width, changes["image"].size
        )
    else:
        default = info.static_size or (DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE)
        height = default[0] if request.height is None else request.height
        width = default[1] if request.width is None else request.width
        changes["height"], changes["width"] = (
            image_side("height", height, info),
            image_side("width", width, info),
        )
    if mode.decoder.strength or mode.embeddings.strength:  # the part of the decoder or prior that runs
        stage = "num_inference_steps" if mode.decoder.strength else "prior_num_inference_steps"
        changes["strength"] = strength("strength", request.strength, changes[stage])
        if mode.decoder.strength:  # the scheduler's own slicing may refuse more (repeated timesteps)
            strength_timesteps(scheduler, changes[stage], changes["strength"])
    if request.latents is not None:
        changes["latents"] = initial_latents(
            request.latents, info, prompts * changes["num_images_per_prompt"], changes
        )
    return Plan.of(replace(request, **changes), info, scheduler, source=request)


def _scheduler_fields(
    request: GenerationRequest, info: ServerInfo, num_steps: int
) -> tuple[dict[str, Any], Any]:
    """The decoder scheduler's name and overrides, checked by building it (its own step limits included);
    returns them with the scheduler (the request's one)."""
    name = None if request.scheduler is None else text("scheduler", request.scheduler)
    overrides = scheduler_overrides(request.scheduler_config)
    check_prior_scheduler(
        None if request.prior_scheduler is None else text("prior_scheduler", request.prior_scheduler)
    )
    scheduler = new_decoder_scheduler(info, replace(request, scheduler=name, scheduler_config=overrides))
    scheduler.set_timesteps(num_steps)
    return {"scheduler": name, "scheduler_config": overrides}, scheduler


def scheduler_overrides(value: Any) -> dict[str, Any] | None:
    """scheduler_config: a mapping, or its JSON text (as the wire carries it)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidRequest(
                "scheduler_config", f"is not valid JSON ({error.msg} at {error.pos})"
            ) from None
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise InvalidRequest(
            "scheduler_config",
            f'must be an object of config keys, e.g. {{"use_karras_sigmas": true}}; got {value!r}',
        )
    return dict(value)


def initial_latents(value: Any, info: ServerInfo, batch: int, sizes: Mapping[str, Any]) -> np.ndarray:
    """`latents` of exactly the decoder's shape (diffusers' check), finite, as float32.

    A flat array of the right size (as the wire carries it) is reshaped.
    """
    try:
        latents = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidRequest("latents", f"must be a float array, got {type(value).__name__}") from None
    expected = (batch, info.dims.latent_channels, *info.latent_size(sizes["height"], sizes["width"]))
    if latents.ndim == 1 and latents.size == np.prod(expected):
        latents = latents.reshape(expected)  # the wire carries tensors flattened
    if latents.shape != expected:
        raise InvalidRequest(
            "latents",
            f"has shape {latents.shape}; this request needs {expected} "
            "(images, latent channels, height and width divided by the MoVQ scale)",
        )
    if not np.isfinite(latents).all():
        raise InvalidRequest("latents", "contains NaN or Inf")
    return latents


def _fusion_fields(request: GenerationRequest) -> dict[str, Any]:
    """Fusion items (prompts stay strings, images are loaded), weights, and its single negative prompts."""
    items, weights = fusion_inputs(request.images_and_prompts, request.weights)
    loaded = [
        text(f"images_and_prompts[{i}]", item)
        if isinstance(item, str)
        else load_image(item, f"images_and_prompts[{i}]")
        for i, item in enumerate(items)
    ]
    changes: dict[str, Any] = {"images_and_prompts": loaded, "weights": weights}
    for name in ("negative_prompt", "negative_prior_prompt"):
        value = getattr(request, name)
        if isinstance(value, list | tuple) and len(value) == 1:
            value = value[0]
        if value is not None:
            changes[name] = text(name, value)
    return changes
