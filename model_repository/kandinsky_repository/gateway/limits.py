"""What the gateway lets through, derived from the served repository and the component registry.

- `request_limits`: the body cap and the JSON-tensor element limit;
- `generate_fields`: each model's inputs as JSON types, for the generate endpoint's field checks.

Body cap. It must admit the largest request a client legitimately sends and little more. For every
registry model present in the repository that is the sum of its inputs at the model's max batch size and
the largest sizes the server accepts: images for CLIP pre-processing at MAX_INPUT_IMAGE_SIDE (4 x 2048 x
2048 x 3 uint8 = 48 MiB at its max batch of one row per image), MoVQ images and decoded images at the
repository's max_image_size, latents at max_image_size / the MoVQ scale, prompts at MAX_PROMPT_BYTES.
Binary tensors travel at that size; a JSON body with base64 images (the generate endpoint) needs 4/3 of
the raw pixels of MAX_IMAGES_PER_REQUEST images of that side (64 MiB), the largest for every checkpoint.
The cap is the larger of the two plus 1 MiB for JSON headers and framing (65 MiB; 100 MiB where the
ControlNet UNet is served: its full batch of float32 hints at 1024 px is 8 x 3 x 1024^2 x 4 bytes = 96 MiB).

JSON element limit: one full-size RGB image (max_image_size^2 x 3 values). JSON tensors are a debugging
convenience (the client sends binary data); Triton allocates JSON inputs at their declared shape, so this
is what one JSON input may make it allocate (at most 8 bytes per element).

JSON text limit of infer requests (the whole body of a JSON request, the JSON header of a binary one):
16 bytes per allowed element plus 1 MiB (49 MiB at 1024 px), enough for a full-size image written as
JSON numbers. The gateway parses that text before it can count elements, and a parsed JSON number takes
16 bytes in njs, so this bounds what one request can make the gateway itself allocate.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kandinsky_core.components import (
    COMPONENTS,
    MAX_IMAGES_PER_REQUEST,
    MAX_INPUT_IMAGE_SIDE,
    MAX_PROMPT_BYTES,
    SERVED_MODELS,
    ModelDims,
    ModelSpec,
)
from tritonclient.grpc import model_config_pb2 as mc

from ..generator.repository import DEFAULT_MAX_IMAGE_SIZE, read_config

logger = logging.getLogger(__name__)

MIB = 1 << 20
# Bytes per element of each Triton data type on the wire (BYTES: variable, a 4-byte length per element
# and its bytes). The gateway checks that binary and raw tensor data match the declared shape with it.
TRITON_ITEM_BYTES: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "UINT16": 2,
    "INT16": 2,
    "FP16": 2,
    "BF16": 2,
    "UINT32": 4,
    "INT32": 4,
    "FP32": 4,
    "UINT64": 8,
    "INT64": 8,
    "FP64": 8,
    "BYTES": 0,
}
# Models whose image input is bounded by MAX_INPUT_IMAGE_SIDE rather than by the generation size.
_CLIP_IMAGE_MODELS = frozenset({"preprocess_clip_image", "encode_image"})

# Triton data types as JSON value kinds (generate endpoint fields).
_JSON_KINDS = {
    mc.TYPE_STRING: "string",
    mc.TYPE_BOOL: "boolean",
    mc.TYPE_FP16: "number",
    mc.TYPE_FP32: "number",
    mc.TYPE_FP64: "number",
    mc.TYPE_BF16: "number",
    **{
        t: "integer"
        for t in (
            mc.TYPE_INT8,
            mc.TYPE_INT16,
            mc.TYPE_INT32,
            mc.TYPE_INT64,
            mc.TYPE_UINT8,
            mc.TYPE_UINT16,
            mc.TYPE_UINT32,
            mc.TYPE_UINT64,
        )
    },
}


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int
    json_max_elements: int
    reason: str  # which request sets the body cap, for the log

    @property
    def json_max_text_bytes(self) -> int:
        return json_text_limit(self.json_max_elements)


def json_text_limit(json_max_elements: int) -> int:
    return 16 * json_max_elements + MIB


def read_configs(repository: Path) -> dict[str, mc.ModelConfig]:
    return {p.parent.name: read_config(p.parent) for p in sorted(Path(repository).glob("*/config.pbtxt"))}


def _parameter(config: mc.ModelConfig, key: str) -> str | None:
    return config.parameters[key].string_value if key in config.parameters else None


def _served_sizes(configs: dict[str, mc.ModelConfig]) -> tuple[ModelDims | None, int]:
    """The checkpoint's dims and the repository's max_image_size, from the UNet's config parameters."""
    unet = configs.get("unet")
    dims_text = _parameter(unet, "kandinsky_dims") if unet else None
    size_text = _parameter(unet, "max_image_size") if unet else None
    dims = ModelDims.from_dict(json.loads(dims_text)) if dims_text else None
    return dims, int(size_text) if size_text else DEFAULT_MAX_IMAGE_SIZE


def _request_bytes(spec: ModelSpec, batch: int, dims: ModelDims | None, max_image_size: int) -> int | None:
    """Bytes of one request to `spec` at `batch` and the largest accepted sizes (None: dims unknown)."""
    side = MAX_INPUT_IMAGE_SIDE if spec.name in _CLIP_IMAGE_MODELS else max_image_size
    symbols: dict[str, int] = {"batch": batch, "height": side, "width": side}
    if dims is not None:
        symbols.update(dims.as_symbols())
        latent = max_image_size // dims.movq_scale_factor
        symbols.update(latent_height=latent, latent_width=latent)
    total = 0
    for tensor in spec.inputs:
        try:
            shape = tensor.resolve(symbols, keep_dynamic=False)
        except KeyError:
            return None
        itemsize = MAX_PROMPT_BYTES + 4 if tensor.dtype == "bytes" else np.dtype(tensor.dtype).itemsize
        total += math.prod(shape) * itemsize
    return total


def request_limits(repository: Path, configs: dict[str, mc.ModelConfig] | None = None) -> RequestLimits:
    configs = configs if configs is not None else read_configs(repository)
    dims, max_image_size = _served_sizes(configs)
    registry: dict[str, ModelSpec] = {**COMPONENTS, **SERVED_MODELS}
    largest, reason = 0, ""
    for name, config in configs.items():
        spec = registry.get(name)
        if spec is None:
            continue
        size = _request_bytes(spec, max(config.max_batch_size, 1), dims, max_image_size)
        if size is not None and size > largest:
            largest, reason = size, f"{name} at batch {max(config.max_batch_size, 1)}"
    raw_pixels = MAX_IMAGES_PER_REQUEST * MAX_INPUT_IMAGE_SIDE**2 * 3
    base64_images = 4 * math.ceil(raw_pixels / 3)
    if base64_images > largest:
        largest = base64_images
        reason = (
            f"{MAX_IMAGES_PER_REQUEST} base64 images of {MAX_INPUT_IMAGE_SIDE}x{MAX_INPUT_IMAGE_SIDE} RGB"
        )
    cap = math.ceil(largest / MIB) * MIB + MIB
    return RequestLimits(cap, max_image_size**2 * 3, f"{reason}: {largest / MIB:.1f} MiB")


def generate_fields(configs: dict[str, mc.ModelConfig]) -> dict[str, dict[str, dict[str, object]]]:
    """{model: {input: {"kind": JSON type, "list": a list is accepted, "triton": its Triton type}}}.

    A list is accepted where the input holds more than one element per request (a -1 or >1 dim).
    """
    table: dict[str, dict[str, dict[str, object]]] = {}
    for name, config in configs.items():
        fields = {}
        for tensor in config.input:
            dims = list(tensor.dims)
            fields[tensor.name] = {
                "kind": _JSON_KINDS.get(tensor.data_type, "number"),
                "list": any(d == -1 for d in dims) or math.prod(dims) > 1,
                "triton": mc.DataType.Name(tensor.data_type),
            }
        table[name] = fields
    return table
