"""OpenAI Images API requests as `GenerationRequest`s: which mode, which fields, how the images go back.

- generations (JSON) -> text_to_image;
- edits (multipart) -> by what was sent, first match wins:
    several images                                   -> fuse (the prompt and the images, `weights`)
    `left`/`top`/`right`/`bottom`                    -> outpaint
    a `mask`, or transparent pixels in the image     -> inpaint (OpenAI's convention: transparent = repaint)
    `strength`                                       -> image_to_image
    none of these                                    -> fuse of the prompt and the image
- variations (multipart) -> variations.

OpenAI's fields map onto the request's (`n` -> num_images_per_prompt, `size` "WxH" -> width and height,
"auto" -> the mode's default size); Kandinsky's own ride along under the names the rest of the project
uses (`EXTRA_FIELDS`). Values are checked by the core's validation when the request is checked against
the server's limits; this module checks only what OpenAI adds (formats, streaming, its fixed choices).
A multipart value is text: it is converted by the field's wire type first ("12" -> 12).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from kandinsky_core.images import load_image
from kandinsky_core.request import (
    FUSE,
    IMAGE_TO_IMAGE,
    INPAINT,
    OUTPAINT,
    TEXT_TO_IMAGE,
    VARIATIONS,
    GenerationRequest,
    field_specs,
)
from kandinsky_core.validation import integer, text
from PIL import Image

from .errors import APIError, invalid

# The model id clients name (`model`); omitted means this one.
MODEL_ID = "kandinsky-2.2"
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_PARTIAL_IMAGES = 3  # OpenAI's range for partial_images: 0..3
MAX_EDIT_IMAGES = 4  # image files one edit may fuse (the body cap bounds their bytes)
# A pixel whose alpha is below this is transparent, so repainted (the project's masks: >= 50% repaints).
TRANSPARENT_BELOW = 128

# The modes these endpoints reach (ControlNet's need a depth hint, which OpenAI's API has no field for).
API_MODES = (TEXT_TO_IMAGE, VARIATIONS, FUSE, IMAGE_TO_IMAGE, INPAINT, OUTPAINT)
# Kandinsky's own fields, with the project's names.
EXTRA_FIELDS = (
    "negative_prompt",
    "seed",
    "num_inference_steps",
    "prior_num_inference_steps",
    "guidance_scale",
    "prior_guidance_scale",
    "scheduler",
    "scheduler_config",
    "strength",
)
OUTPAINT_FIELDS = ("left", "top", "right", "bottom")
EDIT_EXTRA_FIELDS = (*EXTRA_FIELDS, *OUTPAINT_FIELDS, "weights")

# OpenAI's fields of every endpoint; OpenAI fields that have only one meaning here accept that value.
_OUTPUT = ("response_format", "output_format", "output_compression", "stream", "partial_images")
_COMMON = ("model", "n", "size", "user", "safety_identifier", *_OUTPUT)
_CHOICES = {  # field -> accepted values (OpenAI's values that mean what this server does anyway)
    "quality": ("auto", "standard"),
    "background": ("auto", "opaque"),
    "moderation": ("auto", "low"),
}
_CHOICE_REASONS = {
    "quality": "this server has no quality levels; num_inference_steps sets the work per image",
    "background": "Kandinsky 2.2 draws opaque images",
    "moderation": "this server does not filter prompts or images",
}
GENERATION_FIELDS = ("prompt", *_COMMON, *_CHOICES, *EXTRA_FIELDS)
EDIT_FIELDS = ("image", "mask", "prompt", *_COMMON, *_CHOICES, *EDIT_EXTRA_FIELDS)
VARIATION_FIELDS = ("image", *_COMMON, *EXTRA_FIELDS)

_SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")


@dataclass(frozen=True)
class Output:
    """How the images go back: their file format, and whether as server-sent events."""

    output_format: str = "png"
    compression: int | None = None  # jpeg/webp quality 0..100 (None: 100)
    stream: bool = False
    partial_images: int = 0
    user: str | None = None


@dataclass(frozen=True)
class ImagesCall:
    """One OpenAI request, mapped: the generation to run and how to answer."""

    request: GenerationRequest
    output: Output


class Fields:
    """A body's fields: JSON values, or multipart values (text, or file bytes), each name read once."""

    def __init__(self, values: Mapping[str, Sequence[Any]], *, multipart: bool, endpoint: str) -> None:
        self.values, self.multipart, self.endpoint = values, multipart, endpoint

    @classmethod
    def from_json(cls, body: Any, endpoint: str) -> Fields:
        if not isinstance(body, dict):
            raise APIError(
                400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json"
            )
        return cls({key: [value] for key, value in body.items()}, multipart=False, endpoint=endpoint)

    def check_names(self, valid: Sequence[str]) -> None:
        for name in self.values:
            if name not in valid:
                raise invalid(
                    name,
                    f"is not a parameter of {self.endpoint}; valid parameters: {', '.join(valid)}",
                    code="unknown_parameter",
                )

    def given(self, name: str) -> bool:
        return self.one(name) is not None

    def one(self, name: str) -> Any:
        """The field's value (None when absent or null); refused when it comes more than once."""
        values = self.values.get(name, ())
        if len(values) > 1:
            raise invalid(name, f"is given {len(values)} times; give it once")
        value = values[0] if values else None
        if isinstance(value, bytes) and name not in ("image", "mask"):
            raise invalid(name, "must be a text field, not a file")
        return value

    def files(self, name: str) -> list[bytes]:
        values = list(self.values.get(name, ()))
        for value in values:
            if not isinstance(value, bytes):
                raise invalid(name, "must be an image file (a multipart file part), not a text field")
        return values

    def string(self, name: str) -> str | None:
        value = self.one(name)
        if value is not None and not isinstance(value, str):
            raise invalid(name, f"must be a string, got {type(value).__name__}")
        return value

    def integer(self, name: str, low: int, high: int) -> int | None:
        value = self.typed(name, "int")
        return None if value is None else integer(name, value, low, high)

    def boolean(self, name: str) -> bool:
        value = self.one(name)
        if value is None:
            return False
        if self.multipart and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise invalid(name, f"must be true or false, got {value!r}")

    def typed(self, name: str, wire: str) -> Any:
        """A value as its wire type says: multipart text converted, JSON values as they are (the core
        checks their types with its own messages)."""
        if wire == "floats":
            values = [v for v in self.values.get(name, ()) if v is not None]
            if not self.multipart:
                return values[0] if values else None
            return [_number(f"{name}[{i}]", v, float) for i, v in enumerate(values)] or None
        value = self.one(name)
        if value is None:
            return None
        if not self.multipart:
            if wire == "int" and isinstance(value, float) and not math.isfinite(value):
                raise invalid(name, f"must be an integer, got {value!r}")  # (JSON's Infinity, NaN)
            return value
        if wire == "int":
            return _number(name, value, int)
        if wire == "float":
            return _number(name, value, float)
        return value

    def extras(self, names: Sequence[str]) -> dict[str, Any]:
        specs = field_specs()
        out = {}
        for name in names:
            value = self.typed(name, specs[name].metadata["wire"])
            if value is not None:
                out[name] = value
        return out


def _number(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, bytes):
        raise invalid(name, "must be a text field, not a file")
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise invalid(name, f"must be {what}, got {value!r}") from None


# -- the fields every endpoint shares ----------------------------------------------------------------


def check_model(fields: Fields) -> None:
    model = fields.string("model")
    if model is not None and model != MODEL_ID:
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{MODEL_ID}' (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def size(fields: Fields) -> dict[str, int]:
    """`size` as height and width ({} for "auto" or absent: the mode's default size)."""
    value = fields.one("size")
    if value is None or value == "auto":
        return {}
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise invalid("size", f"is {value!r}; valid values: 'auto' or 'WIDTHxHEIGHT' such as '512x512'")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def output(fields: Fields) -> Output:
    response_format = fields.string("response_format")
    if response_format == "url":
        raise invalid(
            "response_format",
            "'url' is not supported: this server keeps no image files; use 'b64_json' (the default)",
            code="unsupported_value",
        )
    if response_format not in (None, "b64_json"):
        raise invalid("response_format", f"is {response_format!r}; valid values: b64_json")
    output_format = fields.string("output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise invalid("output_format", f"is {output_format!r}; valid values: {', '.join(OUTPUT_FORMATS)}")
    compression = fields.integer("output_compression", 0, 100)
    if compression is not None and output_format == "png":
        raise invalid("output_compression", "applies to output_format jpeg or webp, not png")
    stream = fields.boolean("stream")
    partial = fields.integer("partial_images", 0, MAX_PARTIAL_IMAGES)
    if partial and not stream:
        raise invalid("partial_images", "applies to streamed responses only (stream: true)")
    for name, accepted in _CHOICES.items():
        value = fields.string(name)
        if value is not None and value not in accepted:
            raise invalid(
                name,
                f"is {value!r}; {_CHOICE_REASONS[name]}; valid values: {', '.join(accepted)}",
                code="unsupported_value",
            )
    user = None
    for name in ("user", "safety_identifier"):
        value = fields.string(name)
        if value is not None:
            user = text(name, value)
    return Output(output_format, compression, stream, partial or 0, user)


def _prompt(fields: Fields) -> str:
    prompt = fields.one("prompt")
    if prompt is None:
        raise invalid("prompt", "is required", code="missing_required_parameter")
    return text("prompt", prompt)


def _common(fields: Fields, valid: Sequence[str]) -> tuple[dict[str, Any], Output]:
    fields.check_names(valid)
    check_model(fields)
    options = size(fields)
    n = fields.typed("n", "int")
    if n is not None:
        options["num_images_per_prompt"] = n
    return options, output(fields)


# -- the three endpoints -----------------------------------------------------------------------------


def generation(fields: Fields) -> ImagesCall:
    """POST /v1/images/generations: text to image."""
    options, out = _common(fields, GENERATION_FIELDS)
    options.update(fields.extras(EXTRA_FIELDS))
    return ImagesCall(GenerationRequest.build(TEXT_TO_IMAGE, prompt=_prompt(fields), **options), out)


def variation(fields: Fields) -> ImagesCall:
    """POST /v1/images/variations: images like the given one."""
    options, out = _common(fields, VARIATION_FIELDS)
    options.update(fields.extras(EXTRA_FIELDS))
    images = _images(fields, 1)
    return ImagesCall(GenerationRequest.build(VARIATIONS, image=images[0].data, **options), out)


def edit(fields: Fields) -> ImagesCall:
    """POST /v1/images/edits: fusion, outpainting, inpainting or image-to-image (see the module's table)."""
    options, out = _common(fields, EDIT_FIELDS)
    extras = fields.extras(EDIT_EXTRA_FIELDS)
    prompt = _prompt(fields)
    images = _images(fields, MAX_EDIT_IMAGES)
    masks = fields.files("mask")
    if len(masks) > 1:
        raise invalid("mask", f"is given {len(masks)} times; give one mask")
    margins = {name: extras.pop(name) for name in OUTPAINT_FIELDS if name in extras}
    weights = extras.pop("weights", None)
    options.update(extras)
    if len(images) > 1:
        for name, given in (
            ("mask", masks),
            ("strength", "strength" in extras),
            (", ".join(margins), margins),
        ):
            if given:
                raise invalid(name, f"does not apply to {len(images)} images: several images are fused")
        mode = FUSE
    elif margins:
        if masks:
            raise invalid("mask", "does not apply to outpainting: the new margins are what is painted")
        mode = OUTPAINT
    elif masks or images[0].repaint is not None:
        mode = INPAINT
    elif "strength" in extras:
        mode = IMAGE_TO_IMAGE
    else:
        mode = FUSE
    if weights is not None and mode != FUSE:
        raise invalid(
            "weights",
            f"applies to fusion only (several images, or one without mask, transparency, strength or "
            f"margins); this edit is {mode}",
        )
    image = images[0].data
    if mode == FUSE:
        items = [prompt, *(picture.data for picture in images)]
        weights = [1.0 / len(items)] * len(items) if weights is None else weights
        request = GenerationRequest.build(FUSE, images_and_prompts=items, weights=weights, **options)
    elif mode == OUTPAINT:
        request = GenerationRequest.build(OUTPAINT, image=image, prompt=prompt, **margins, **options)
    elif mode == INPAINT:
        repaint = _mask_repaint(masks[0], images[0].size) if masks else images[0].repaint
        request = GenerationRequest.build(INPAINT, image=image, mask_image=repaint, prompt=prompt, **options)
    else:
        request = GenerationRequest.build(IMAGE_TO_IMAGE, image=image, prompt=prompt, **options)
    return ImagesCall(request, out)


# -- images ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Picture:
    data: bytes  # the file as sent (the server decodes it: transparency composited onto white)
    size: tuple[int, int]  # (width, height)
    repaint: Image.Image | None  # "L" mask, 255 = repaint, where the file has transparent pixels


def _images(fields: Fields, most: int) -> list[_Picture]:
    files = fields.files("image")
    if not files:
        raise invalid("image", "is required (an image file)", code="missing_required_parameter")
    if len(files) > most:
        raise invalid("image", f"has {len(files)} files; at most {most}")
    pictures = []
    for index, data in enumerate(files):
        name = "image" if len(files) == 1 else f"image[{index}]"
        size = load_image(data, name).size  # the server's checks (format, pixels, file size) and messages
        pictures.append(_Picture(data, size, _transparent_area(data)))
    return pictures


def _alpha(data: bytes) -> np.ndarray | None:
    """The alpha channel of an image file already checked by `load_image`, or None when it has none."""
    with Image.open(io.BytesIO(data)) as picture:
        if "A" not in picture.getbands() and picture.info.get("transparency") is None:
            return None
        return np.asarray(picture.convert("RGBA").getchannel("A"))


def _transparent_area(data: bytes) -> Image.Image | None:
    alpha = _alpha(data)
    if alpha is None or not (alpha < TRANSPARENT_BELOW).any():
        return None
    return Image.fromarray(np.where(alpha < TRANSPARENT_BELOW, 255, 0).astype(np.uint8))


def _mask_repaint(data: bytes, image_size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask: its transparent pixels are the area to repaint -> the project's "L" mask."""
    size = load_image(data, "mask").size
    if size != image_size:
        raise invalid(
            "mask",
            f"is {size[0]}x{size[1]} pixels; it must have the image's size {image_size[0]}x{image_size[1]} "
            "(its transparent pixels mark the area to repaint)",
        )
    area = _transparent_area(data)
    if area is None:
        raise invalid(
            "mask",
            "has no transparent pixels: the mask's transparent pixels (alpha 0) mark the area to repaint, "
            "as in OpenAI's API; send a PNG with an alpha channel",
        )
    return area


def describe(call: ImagesCall) -> str:
    """A log line: the request's numbers, mode and scheduler (no images, no prompt text)."""
    given = {
        k: v
        for k, v in call.request.given().items()
        if isinstance(v, int | float) or k in ("mode", "scheduler")
    }
    return json.dumps(given, sort_keys=True)
