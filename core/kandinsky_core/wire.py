"""The `kandinsky` generation model's inputs and outputs, and their encoding, written once.

The server-side generation model takes every `GenerationRequest` field as a named input (a scalar, a
string or a list), so Triton's HTTP generate extension maps a flat JSON object onto it:

    POST /v2/models/kandinsky/generate  {"prompt": "a cat", "height": 512, "seed": 42}

Images travel as base64-encoded PNG/JPEG strings (a `data:image/...;base64,` prefix is accepted; in
`images_and_prompts` the prefix is what marks an item as an image). Results come back as base64 PNG
strings in `image`, one per image. The repository generator builds the model's config from
`input_specs()`/`output_specs()`, the client encodes with `request_inputs()` / `request_json()`, and the
model decodes with `request_from_inputs()`: one table, three users.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidRequest
from .generation import Generation
from .request import GenerationRequest, field_specs

MODEL_NAME = "kandinsky"
DATA_URI_PREFIX = "data:image/"

# wire type -> (Triton data type, dims). Every input is optional: the request's defaults fill the gaps.
WIRE_TYPES: dict[str, tuple[str, list[int]]] = {
    "string": ("TYPE_STRING", [1]),
    "strings": ("TYPE_STRING", [-1]),
    "image": ("TYPE_STRING", [1]),
    "int": ("TYPE_INT64", [1]),
    "float": ("TYPE_FP64", [1]),  # float64: strength * steps must round as diffusers' Python floats do
    "floats": ("TYPE_FP64", [-1]),
    "bool": ("TYPE_BOOL", [1]),
    "json": ("TYPE_STRING", [1]),  # a JSON object as text (Triton's generate maps no JSON objects)
    "tensor": ("TYPE_FP32", [-1]),  # flattened: the receiver knows the shape from the other fields
}


def _option(default: Any, wire: str, help: str) -> Any:
    return field(default=default, metadata={"wire": wire, "help": help})


@dataclass(frozen=True)
class ResponseOptions:
    """What the server-side generation sends back besides the images, and how long it may take."""

    return_image_embeds: bool = _option(False, "bool", "also return image_embeds and negative_image_embeds")
    progress: bool = _option(
        False, "bool", "send a progress response after every step (generate_stream / gRPC streaming only)"
    )
    preview_every: int = _option(0, "int", "with progress: a preview image every N decoder steps (0: none)")
    timeout_s: float = _option(0.0, "float", "seconds the generation may take (0: the server's limit)")


def _all_inputs() -> dict[str, Any]:
    specs = dict(field_specs())
    specs.update({f.name: f for f in fields(ResponseOptions)})
    return specs


def input_specs() -> list[tuple[str, str, list[int]]]:
    """(name, Triton data type, dims) of every input of the generation model."""
    return [(name, *WIRE_TYPES[spec.metadata["wire"]]) for name, spec in _all_inputs().items()]


def output_specs(embed_dim: int) -> list[tuple[str, str, list[int]]]:
    """(name, Triton data type, dims) of every output; a response carries the ones that apply to it."""
    return [
        ("image", "TYPE_STRING", [-1]),  # final response, output_type "pil": base64 PNG, one per image
        ("image_np", "TYPE_FP32", [-1, -1, -1, 3]),  # output_type "np": float images in [0, 1]
        ("latents", "TYPE_FP32", [-1, -1, -1, -1]),  # output_type "latent": the final latents
        ("image_embeds", "TYPE_FP32", [-1, embed_dim]),  # with return_image_embeds
        ("negative_image_embeds", "TYPE_FP32", [-1, embed_dim]),
        ("seed", "TYPE_INT64", [1]),  # the seed used (drawn by the server when none was given)
        ("timings", "TYPE_STRING", [1]),  # JSON: seconds per stage, measured in the server (final only)
        ("stage", "TYPE_STRING", [1]),  # progress responses: "prior" or "decoder"
        ("step", "TYPE_INT64", [1]),  # 1-based step within the stage's loop
        ("num_steps", "TYPE_INT64", [1]),  # steps of this loop
        ("timestep", "TYPE_INT64", [1]),
        ("done", "TYPE_INT64", [1]),  # steps done over the whole generation
        ("total", "TYPE_INT64", [1]),  # steps of the whole generation
        ("preview", "TYPE_STRING", [-1]),  # with preview_every: base64 PNG of the current latents
    ]


# -- images ------------------------------------------------------------------------------------------


def image_to_base64(value: Any) -> str:
    """An image (PIL, uint8 array, file bytes or path) as base64 text: file bytes as they are, else PNG."""
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str | Path):
        data = Path(value).read_bytes()
    else:
        picture = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value, np.uint8))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        data = buffer.getvalue()
    return base64.b64encode(data).decode("ascii")


def base64_to_bytes(field: str, text: str) -> bytes:
    """Image file bytes from base64 text, with or without a `data:image/...;base64,` prefix."""
    if text.startswith(DATA_URI_PREFIX):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequest(field, "is a data URI that is not base64-encoded (expected ';base64,')")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidRequest(
            field, f"is not valid base64 ({error}); send the image file base64-encoded"
        ) from None


def png_base64(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue())


# -- requests: client side ---------------------------------------------------------------------------


def _wire_values(request: GenerationRequest, options: ResponseOptions) -> dict[str, tuple[str, Any]]:
    """name -> (wire type, JSON-ready value) for the fields that differ from their defaults."""
    specs = _all_inputs()
    values = dict(request.given())
    values.update(
        {f.name: getattr(options, f.name) for f in fields(options) if getattr(options, f.name) != f.default}
    )
    out = {}
    for name, value in values.items():
        wire = specs[name].metadata["wire"]
        if wire == "image":
            value = image_to_base64(value)
        elif wire == "json":
            value = value if isinstance(value, str) else json.dumps(value)
        elif wire == "tensor":
            value = np.asarray(value, dtype=np.float32).reshape(-1)
        elif name == "images_and_prompts":
            value = [
                item if isinstance(item, str) else DATA_URI_PREFIX + "png;base64," + image_to_base64(item)
                for item in value
            ]
        elif wire in ("strings", "floats") and not isinstance(value, list | tuple):
            value = [value]
        out[name] = (wire, value)
    return out


def request_json(request: GenerationRequest, options: ResponseOptions) -> dict[str, Any]:
    """The JSON body of a generate / generate_stream call."""
    body = {}
    for name, (_, value) in _wire_values(request, options).items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        body[name] = list(value) if isinstance(value, tuple) else value
    return body


def request_inputs(request: GenerationRequest, options: ResponseOptions) -> dict[str, np.ndarray]:
    """Named numpy inputs of a gRPC call (strings as UTF-8 bytes objects)."""
    arrays = {}
    for name, (wire, value) in _wire_values(request, options).items():
        triton_type = WIRE_TYPES[wire][0]
        if triton_type == "TYPE_STRING":
            items = value if isinstance(value, list | tuple) else [value]
            arrays[name] = np.array(
                [str(item).encode("utf-8", "surrogatepass") for item in items], dtype=np.object_
            )
        elif wire == "tensor":
            arrays[name] = np.ascontiguousarray(value, dtype=np.float32)
        else:
            dtype = {"TYPE_INT64": np.int64, "TYPE_FP64": np.float64, "TYPE_BOOL": np.bool_}[triton_type]
            arrays[name] = np.atleast_1d(np.asarray(value, dtype=dtype))
    return arrays


# -- requests: server side ---------------------------------------------------------------------------


def _text(field: str, raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest(
            field, f"is not valid UTF-8 text ({error.reason} at byte {error.start})"
        ) from None


def request_from_inputs(
    inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any] | None = None
) -> tuple[GenerationRequest, ResponseOptions]:
    """A request from the generation model's named inputs (as Triton hands them over).

    `parameters` are the request's Triton parameters: the HTTP generate extension puts every JSON key
    that is not a declared input there, so an unknown (e.g. misspelt) field is refused here by name.
    """
    specs = _all_inputs()
    unknown = sorted(set(parameters or {}) - set(specs))
    if unknown:
        raise InvalidRequest(
            unknown[0], f"is not a parameter of the generation model; valid: {', '.join(specs)}"
        )
    values: dict[str, Any] = {}
    for name, array in inputs.items():
        wire = specs[name].metadata["wire"]
        flat = np.asarray(array).reshape(-1)
        if wire == "tensor":
            values[name] = np.asarray(array, dtype=np.float32)
            continue
        if wire in ("string", "image", "int", "float", "bool", "json") and flat.size != 1:
            raise InvalidRequest(name, f"must be a single value, got {flat.size}")
        if wire in ("string", "strings", "image", "json"):
            items = [_text(name if flat.size == 1 else f"{name}[{i}]", raw) for i, raw in enumerate(flat)]
            if wire == "image":
                values[name] = base64_to_bytes(name, items[0])
            elif name == "images_and_prompts":
                values[name] = [
                    base64_to_bytes(f"{name}[{i}]", item) if item.startswith(DATA_URI_PREFIX) else item
                    for i, item in enumerate(items)
                ]
            else:
                values[name] = items[0] if wire in ("string", "json") else items
        elif wire == "floats":
            values[name] = [float(x) for x in flat]
        else:
            values[name] = flat[0].item()
    option_names = {f.name for f in fields(ResponseOptions)}
    options = ResponseOptions(**{k: v for k, v in values.items() if k in option_names})
    request = GenerationRequest(**{k: v for k, v in values.items() if k not in option_names})
    return request, options


# -- responses ---------------------------------------------------------------------------------------


FINAL_OUTPUT = "timings"  # present in the final response only (progress responses never carry it)


def final_outputs(generation: Generation, seed: int, return_image_embeds: bool) -> dict[str, np.ndarray]:
    """The final response's tensors for a finished generation (the server side of the next function)."""
    if isinstance(generation.images, list):
        outputs = {"image": np.array([png_base64(image) for image in generation.images], dtype=np.object_)}
    elif generation.images.shape[-1] == 3:
        outputs = {"image_np": np.ascontiguousarray(generation.images, np.float32)}
    else:
        outputs = {"latents": np.ascontiguousarray(generation.images, np.float32)}
    outputs["seed"] = np.array([seed], np.int64)
    outputs[FINAL_OUTPUT] = np.array([json.dumps(generation.timings).encode()], dtype=np.object_)
    if return_image_embeds:
        outputs["image_embeds"] = np.ascontiguousarray(generation.image_embeds, np.float32)
        outputs["negative_image_embeds"] = np.ascontiguousarray(generation.negative_image_embeds, np.float32)
    return outputs


def decode_images(encoded: Any) -> list[Image.Image]:
    """base64 PNG strings (one, or an array/list of them) -> RGB PIL images."""
    images = []
    for item in np.asarray(encoded, dtype=object).reshape(-1):
        data = base64.b64decode(item if isinstance(item, bytes | str) else bytes(item))
        with Image.open(io.BytesIO(data)) as picture:
            images.append(picture.convert("RGB"))
    return images


def generation_from_outputs(
    outputs: Mapping[str, Any], embed_dim: int, shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Generation:
    """A `Generation` from a final response's outputs (numpy arrays over gRPC, JSON values over HTTP).

    JSON flattens float tensors: `shapes` ({"image_np": (N, H, W, 3), "latents": (N, C, h, w)}, known
    from the request) restores them.
    """

    def embeds(name: str) -> np.ndarray | None:
        value = outputs.get(name)
        return None if value is None else np.asarray(value, dtype=np.float32).reshape(-1, embed_dim)

    if "image" in outputs:
        images: Any = decode_images(outputs["image"])
    else:
        name = "image_np" if "image_np" in outputs else "latents"
        images = np.asarray(outputs[name], dtype=np.float32)
        if shapes and name in shapes:
            images = images.reshape(shapes[name])
    seed = outputs.get("seed")
    timings = json.loads(_text("timings", np.asarray(outputs[FINAL_OUTPUT], dtype=object).reshape(-1)[0]))
    return Generation(
        images=images,
        image_embeds=embeds("image_embeds"),
        negative_image_embeds=embeds("negative_image_embeds"),
        seed=None if seed is None else int(np.asarray(seed).reshape(-1)[0]),
        timings=timings,
    )


def scalar(outputs: Mapping[str, Any], name: str) -> Any:
    """One value of a (progress) response output, decoded: str for strings, int otherwise."""
    value = np.asarray(outputs[name], dtype=object).reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value
