"""The component registry: every served model's tensors, written once.

The exporter (ONNX input/output names, dynamic axes), the parity checks, the Triton configuration
generator, the TensorRT profile builder and this client's request builders all read these specs, so a
renamed tensor or a changed shape cannot drift between them.

Shapes are symbolic. Symbols are resolved from the checkpoint's configs (see `ModelDims`), never from
the released model's numbers; the symbols in `DYNAMIC_SYMBOLS` stay dynamic (-1) in served models.
The first dimension of every tensor is the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

BATCH = "batch"
DYNAMIC_SYMBOLS = frozenset({BATCH, "height", "width", "latent_height", "latent_width"})

# How many images one request may ask for. The batch a model sees follows from it and from the model's
# `rows_per_image`: the prior and text encoder run [prompts, negative prompts] x [uncond, cond]; the UNet
# runs [uncond, cond]; everything else one row per image.
MAX_IMAGES_PER_REQUEST = 4

# The largest image side served unless `kandinsky-repository --max-image-size` (or the engines' profile)
# says otherwise. Read by the repository generator, the engine profiles and the python models.
MAX_IMAGE_SIZE = 1024

# A prompt's length in UTF-8 bytes, checked before tokenizing: CLIP keeps 77 tokens of it anyway, and an
# unbounded prompt ties up the tokenizer (1 MB prompts took seconds and hundreds of MB each).
MAX_PROMPT_BYTES = 8192

# Largest side of an image sent to `preprocess_clip_image` / `encode_image`. CLIP resizes to 224 px, so a
# larger input brings nothing but memory; clients shrink larger images to this first (images.fit_within).
MAX_INPUT_IMAGE_SIDE = 2048


@dataclass(frozen=True)
class ModelDims:
    """Sizes read from a checkpoint's configs; everything the served graph shapes depend on."""

    text_seq_len: int  # tokenizer.model_max_length (77 for CLIP)
    text_hidden: int  # text_encoder.config.hidden_size
    text_embed: int  # text_encoder.config.projection_dim
    embed_dim: int  # prior.config.embedding_dim == image embedding width used by the UNet
    image_size: int  # image_encoder.config.image_size
    latent_channels: int  # movq.config.latent_channels == unet.config.in_channels
    unet_out_channels: int  # unet.config.out_channels (2x latent channels with learned variance)
    inpaint_in_channels: int  # inpaint unet in_channels (latent + masked latent + mask), 0 if absent
    movq_scale_factor: int  # 2 ** (len(movq.config.block_out_channels) - 1)
    unet_downscale: int  # 2 ** (number of UNet downsampling blocks)

    def as_symbols(self) -> dict[str, int]:
        """Symbol table used to resolve `TensorSpec.shape`."""
        return asdict(self)

    def size_symbols(self, batch: int, height: int, width: int) -> dict[str, int]:
        """`as_symbols` plus the dynamic ones of a call: its batch and image size (pixels; latent sides
        follow from the MoVQ scale factor)."""
        return {
            **self.as_symbols(),
            BATCH: batch,
            "height": height,
            "width": width,
            "latent_height": height // self.movq_scale_factor,
            "latent_width": width // self.movq_scale_factor,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, int]) -> ModelDims:
        return cls(**{f.name: int(values[f.name]) for f in fields(cls)})

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this, so the decoded image has the requested size.

        diffusers rounds the latent size up to a multiple of movq_scale_factor pixels squared
        (`downscale_height_and_width`); the UNet additionally needs latents divisible by its downscale.
        """
        multiple = self.movq_scale_factor**2
        while (multiple // self.movq_scale_factor) % self.unet_downscale:
            multiple *= 2
        return multiple


@dataclass(frozen=True)
class DType:
    """One tensor dtype of the registry, as every runtime spells it (the only dtype table)."""

    name: str  # the registry's (numpy's) name: float32, float16, int64, int32, bool, uint8, bytes
    triton: str  # Triton's ModelConfig DataType name
    tensorrt: str  # TensorRT's DataType name, as an engine reports its I/O
    onnx: int  # ONNX TensorProto.DataType value


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", "TYPE_FP32", "FLOAT", 1),
        DType("float16", "TYPE_FP16", "HALF", 10),
        DType("int64", "TYPE_INT64", "INT64", 7),
        DType("int32", "TYPE_INT32", "INT32", 6),
        DType("bool", "TYPE_BOOL", "BOOL", 9),
        DType("uint8", "TYPE_UINT8", "UINT8", 2),
        DType("bytes", "TYPE_STRING", "", 8),
    )
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, bool, uint8, or "bytes" for strings
    shape: tuple[str | int, ...]

    def resolve(self, dims: Mapping[str, int], *, keep_dynamic: bool = True) -> tuple[int, ...]:
        """Concrete shape: symbols from `dims`; dynamic symbols become -1 when `keep_dynamic`."""
        out: list[int] = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif keep_dynamic and d in DYNAMIC_SYMBOLS:
                out.append(-1)
            else:
                out.append(int(dims[d]))
        return tuple(out)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """ONNX dynamic axes: axis index -> symbolic name."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str) and d in DYNAMIC_SYMBOLS}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A served Triton model: its tensors and how many batch rows one image costs it.

    `rows_per_image` is the most rows one image of a request puts in this model's batch (the prior and
    text encoder: 2 for [uncond, cond] x 2 with a negative prompt; the UNets 2; everything else 1);
    `row_group` is how rows arrive together (2: [uncond, cond] pairs under classifier-free guidance).
    Batch limits, engine profiles, CUDA-graph batch sizes, preferred batch sizes and warm-up requests
    are derived from these two numbers, never written elsewhere.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rows_per_image: int
    row_group: int = 1
    description: str = ""

    @property
    def max_batch_size(self) -> int:
        """The largest batch a request (or the dynamic batcher) sends: every image at its most rows."""
        return self.rows_per_image * MAX_IMAGES_PER_REQUEST

    def batch_sizes(self) -> tuple[int, ...]:
        """Every batch the traffic has: multiples of `row_group` up to `max_batch_size`.

        Requests arrive in groups of `row_group` rows (guidance pairs), and the dynamic batcher sums
        whole requests, so these are the batches worth a CUDA graph (without guidance, a request of
        one row per image runs too, without a graph).
        """
        return tuple(range(self.row_group, self.max_batch_size + 1, self.row_group))

    def request_batch_sizes(self) -> tuple[int, ...]:
        """Every batch one request sends on its own: the guided batches (`batch_sizes()`), and without
        guidance one row per image (1 .. MAX_IMAGES_PER_REQUEST).

        A dynamic batcher with a queue delay must treat each of these as a preferred batch size, or a
        lone generation's step waits out the whole window (an empty preferred list means only
        `max_batch_size`).
        """
        unguided = range(1, min(MAX_IMAGES_PER_REQUEST, self.max_batch_size) + 1)
        return tuple(sorted({*self.batch_sizes(), *unguided}))

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True, kw_only=True)
class ComponentSpec(ModelSpec):
    """One network exported to ONNX and served as one Triton model."""

    checkpoint: str  # which checkpoint part holds it: "prior", "decoder", "decoder_inpaint", "controlnet"
    called_per_step: bool = False  # evaluated once per denoising step: worth dynamic batching
    optional: bool = False  # exported only when its checkpoint is present


def _latent(name: str, channels: str) -> TensorSpec:
    return TensorSpec(name, "float32", (BATCH, channels, "latent_height", "latent_width"))


# Rows per image: [uncond, cond] pairs (classifier-free guidance), and two prompt runs per image when a
# negative prompt is given (the prior also runs on the negative prompts).
_GUIDED = {"rows_per_image": 2, "row_group": 2}
_GUIDED_WITH_NEGATIVE = {"rows_per_image": 4, "row_group": 2}
_ONE_ROW = {"rows_per_image": 1}
# The prior's latents after its loop: one row per image, two with a negative prompt (no guidance pairs).
_PRIOR_OUTPUT = {"rows_per_image": 2}

TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    checkpoint="prior",
    description="CLIP text encoder with projection (diffusers calls it with input_ids only).",
    inputs=(TensorSpec("input_ids", "int64", (BATCH, "text_seq_len")),),
    outputs=(
        TensorSpec("text_embeds", "float32", (BATCH, "text_embed")),
        TensorSpec("last_hidden_state", "float32", (BATCH, "text_seq_len", "text_hidden")),
    ),
    **_GUIDED_WITH_NEGATIVE,
)

IMAGE_ENCODER = ComponentSpec(
    name="image_encoder",
    checkpoint="prior",
    description="CLIP vision encoder with projection: normalised pixels -> image embedding.",
    inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, "image_size", "image_size")),),
    outputs=(TensorSpec("image_embeds", "float32", (BATCH, "embed_dim")),),
    **_ONE_ROW,
)

PRIOR = ComponentSpec(
    name="prior",
    checkpoint="prior",
    description="PriorTransformer: one denoising step of the CLIP image embedding.",
    inputs=(
        TensorSpec("hidden_states", "float32", (BATCH, "embed_dim")),
        TensorSpec("timestep", "int64", (BATCH,)),
        TensorSpec("proj_embedding", "float32", (BATCH, "text_embed")),
        TensorSpec("encoder_hidden_states", "float32", (BATCH, "text_seq_len", "text_hidden")),
        TensorSpec("attention_mask", "bool", (BATCH, "text_seq_len")),
    ),
    outputs=(TensorSpec("predicted_image_embedding", "float32", (BATCH, "embed_dim")),),
    **_GUIDED_WITH_NEGATIVE,
    called_per_step=True,
)

UNET = ComponentSpec(
    name="unet",
    checkpoint="decoder",
    description="UNet2DConditionModel: one denoising step of the image latents.",
    inputs=(
        _latent("sample", "latent_channels"),
        TensorSpec("timestep", "int64", (BATCH,)),
        TensorSpec("image_embeds", "float32", (BATCH, "embed_dim")),
    ),
    outputs=(_latent("noise_pred", "unet_out_channels"),),
    **_GUIDED,
    called_per_step=True,
)

UNET_INPAINT = ComponentSpec(
    name="unet_inpaint",
    checkpoint="decoder_inpaint",
    description="Inpainting UNet: latents, masked-image latents and mask concatenated on channels.",
    inputs=(
        _latent("sample", "inpaint_in_channels"),
        TensorSpec("timestep", "int64", (BATCH,)),
        TensorSpec("image_embeds", "float32", (BATCH, "embed_dim")),
    ),
    outputs=(_latent("noise_pred", "unet_out_channels"),),
    **_GUIDED,
    called_per_step=True,
    optional=True,
)

UNET_CONTROLNET = ComponentSpec(
    name="unet_controlnet",
    checkpoint="controlnet",
    description=(
        "ControlNet-depth UNet (addition_embed_type image_hint): the hint, a depth map in [0, 1] at the "
        "image size, is embedded inside the graph and concatenated to the latents."
    ),
    inputs=(
        _latent("sample", "latent_channels"),
        TensorSpec("timestep", "int64", (BATCH,)),
        TensorSpec("image_embeds", "float32", (BATCH, "embed_dim")),
        TensorSpec("hint", "float32", (BATCH, 3, "height", "width")),
    ),
    outputs=(_latent("noise_pred", "unet_out_channels"),),
    **_GUIDED,
    called_per_step=True,
    optional=True,
)

MOVQ_ENCODER = ComponentSpec(
    name="movq_encoder",
    checkpoint="decoder",
    description="MoVQ encoder: image in [-1, 1] -> latents (not quantised, no scaling factor).",
    inputs=(TensorSpec("image", "float32", (BATCH, 3, "height", "width")),),
    outputs=(_latent("latents", "latent_channels"),),
    **_ONE_ROW,
)

MOVQ_DECODER = ComponentSpec(
    name="movq_decoder",
    checkpoint="decoder",
    description="MoVQ decoder with force_not_quantize=True: latents -> image in [-1, 1].",
    inputs=(_latent("latents", "latent_channels"),),
    outputs=(TensorSpec("image", "float32", (BATCH, 3, "height", "width")),),
    **_ONE_ROW,
)

# The inpainting repo's own MoVQ, exported only where it differs from the decoder's (diffusers' inpainting
# pipeline uses it; an identical one shares the decoder's export: export/kandinsky_export/inpaint_movq.py).
MOVQ_ENCODER_INPAINT = replace(
    MOVQ_ENCODER,
    name="movq_encoder_inpaint",
    checkpoint="decoder_inpaint",
    optional=True,
    description="The inpainting repo's own MoVQ encoder (served only where it differs from the decoder's).",
)
MOVQ_DECODER_INPAINT = replace(
    MOVQ_DECODER,
    name="movq_decoder_inpaint",
    checkpoint="decoder_inpaint",
    optional=True,
    description="The inpainting repo's own MoVQ decoder (served only where it differs from the decoder's).",
)
INPAINT_MOVQ_COMPONENTS = (MOVQ_ENCODER_INPAINT.name, MOVQ_DECODER_INPAINT.name)

COMPONENTS: dict[str, ComponentSpec] = {
    c.name: c
    for c in (
        TEXT_ENCODER,
        IMAGE_ENCODER,
        PRIOR,
        UNET,
        UNET_INPAINT,
        UNET_CONTROLNET,
        MOVQ_ENCODER,
        MOVQ_DECODER,
        MOVQ_ENCODER_INPAINT,
        MOVQ_DECODER_INPAINT,
    )
}


@dataclass(frozen=True, kw_only=True)
class ServedModelSpec(ModelSpec):
    """A Triton model that is not an exported network: pre/post-processing or an ensemble."""

    steps: tuple[str, ...] = ()  # for ensembles: the models it chains, in order


TOKENIZER = ServedModelSpec(
    name="tokenizer",
    description="CLIPTokenizer from the checkpoint: pad/truncate to the model's max length.",
    inputs=(TensorSpec("prompt", "bytes", (BATCH, 1)),),
    outputs=(
        TensorSpec("input_ids", "int64", (BATCH, "text_seq_len")),
        TensorSpec("attention_mask", "bool", (BATCH, "text_seq_len")),
    ),
    **_GUIDED_WITH_NEGATIVE,
)

PRIOR_POSTPROCESS = ServedModelSpec(
    name="prior_postprocess",
    description=(
        "Un-normalise prior latents (x * clip_std + clip_mean) and return the checkpoint's constant "
        "negative image embedding (image encoder on a zero image), computed once at export."
    ),
    inputs=(TensorSpec("latents", "float32", (BATCH, "embed_dim")),),
    outputs=(
        TensorSpec("image_embeds", "float32", (BATCH, "embed_dim")),
        TensorSpec("zero_image_embeds", "float32", (BATCH, "embed_dim")),
    ),
    **_PRIOR_OUTPUT,
)

POSTPROCESS_IMAGE = ServedModelSpec(
    name="postprocess_image",
    description="[-1, 1] NCHW float -> uint8 NHWC RGB, rounded as diffusers' numpy_to_pil does.",
    inputs=(TensorSpec("image", "float32", (BATCH, 3, "height", "width")),),
    outputs=(TensorSpec("image_rgb", "uint8", (BATCH, "height", "width", 3)),),
    **_ONE_ROW,
)

ENCODE_PROMPT = ServedModelSpec(
    name="encode_prompt",
    description="Ensemble: prompt strings -> tokenizer -> text encoder.",
    inputs=TOKENIZER.inputs,
    outputs=(*TEXT_ENCODER.outputs, TOKENIZER.output("attention_mask")),
    **_GUIDED_WITH_NEGATIVE,
    steps=("tokenizer", "text_encoder"),
)

DECODE_IMAGE = ServedModelSpec(
    name="decode_image",
    description="Ensemble: latents -> MoVQ decoder -> uint8 RGB.",
    inputs=MOVQ_DECODER.inputs,
    outputs=POSTPROCESS_IMAGE.outputs,
    **_ONE_ROW,
    steps=("movq_decoder", "postprocess_image"),
)

# uint8 RGB as image files hold it, any size: what the client sends and `decode_image` returns.
_IMAGE_RGB = TensorSpec("image_rgb", "uint8", (BATCH, "height", "width", 3))

PREPROCESS_CLIP_IMAGE = ServedModelSpec(
    name="preprocess_clip_image",
    description=(
        "The checkpoint's CLIPImageProcessor on uint8 RGB of any size: shortest edge resized (bicubic), "
        "center crop, rescale, CLIP mean/std (numpy + PIL, no transformers in the backend)."
    ),
    inputs=(_IMAGE_RGB,),
    outputs=IMAGE_ENCODER.inputs,
    **_ONE_ROW,
)

PREPROCESS_MOVQ_IMAGE = ServedModelSpec(
    name="preprocess_movq_image",
    description=(
        "uint8 RGB already at the generation size (the client resizes, as diffusers does, with PIL) -> "
        "[-1, 1] NCHW float, with diffusers' VaeImageProcessor arithmetic."
    ),
    inputs=(_IMAGE_RGB,),
    outputs=MOVQ_ENCODER.inputs,
    **_ONE_ROW,
)

ENCODE_IMAGE = ServedModelSpec(
    name="encode_image",
    description="Ensemble: uint8 RGB -> CLIP pre-processing -> image encoder -> image embedding.",
    inputs=PREPROCESS_CLIP_IMAGE.inputs,
    outputs=IMAGE_ENCODER.outputs,
    **_ONE_ROW,
    steps=("preprocess_clip_image", "image_encoder"),
)

ENCODE_LATENTS = ServedModelSpec(
    name="encode_latents",
    description="Ensemble: uint8 RGB -> [-1, 1] -> MoVQ encoder -> latents (img2img and inpainting).",
    inputs=PREPROCESS_MOVQ_IMAGE.inputs,
    outputs=MOVQ_ENCODER.outputs,
    **_ONE_ROW,
    steps=("preprocess_movq_image", "movq_encoder"),
)

# The same ensembles on the inpainting repo's own MoVQ (written only where its components are exported).
DECODE_IMAGE_INPAINT = replace(
    DECODE_IMAGE,
    name="decode_image_inpaint",
    description="Ensemble: latents -> the inpainting repo's MoVQ decoder -> uint8 RGB.",
    steps=(MOVQ_DECODER_INPAINT.name, "postprocess_image"),
)
ENCODE_LATENTS_INPAINT = replace(
    ENCODE_LATENTS,
    name="encode_latents_inpaint",
    description="Ensemble: uint8 RGB -> [-1, 1] -> the inpainting repo's MoVQ encoder -> latents.",
    steps=("preprocess_movq_image", MOVQ_ENCODER_INPAINT.name),
)


@dataclass(frozen=True)
class MovqModels:
    """The MoVQ models one generation encodes and decodes with (the decoder's, or the inpainting repo's)."""

    encode_latents: ServedModelSpec
    decode_image: ServedModelSpec
    decoder: ComponentSpec  # the bare decoder, for float output (`output_type="np"`)


MOVQ = MovqModels(ENCODE_LATENTS, DECODE_IMAGE, MOVQ_DECODER)
INPAINT_MOVQ = MovqModels(ENCODE_LATENTS_INPAINT, DECODE_IMAGE_INPAINT, MOVQ_DECODER_INPAINT)

SERVED_MODELS: dict[str, ServedModelSpec] = {
    m.name: m
    for m in (
        TOKENIZER,
        PRIOR_POSTPROCESS,
        POSTPROCESS_IMAGE,
        PREPROCESS_CLIP_IMAGE,
        PREPROCESS_MOVQ_IMAGE,
        ENCODE_PROMPT,
        DECODE_IMAGE,
        ENCODE_IMAGE,
        ENCODE_LATENTS,
        DECODE_IMAGE_INPAINT,
        ENCODE_LATENTS_INPAINT,
    )
}


def model_inputs(spec: ModelSpec, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`inputs` as the served model takes them: cast to the spec's dtypes, per-item scalars as [batch, 1].

    Every transport (gRPC/HTTP on the client, BLS in the server) sends what this returns.
    """
    arrays = {}
    for tensor in spec.inputs:
        value = np.asarray(inputs[tensor.name], dtype=np.object_ if tensor.dtype == "bytes" else tensor.dtype)
        if tensor.shape == (BATCH,):
            value = value.reshape(-1, 1)  # served as dims [1] reshaped to a per-item scalar
        arrays[tensor.name] = np.ascontiguousarray(value)
    return arrays


def call_symbols(spec: ModelSpec, dims: ModelDims, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Every shape symbol of a call: the checkpoint's dims, and the dynamic ones read from its inputs
    (image sides from latent sides and back, with the MoVQ scale factor)."""
    symbols = dict(dims.as_symbols())
    for tensor in spec.inputs:
        shape = shapes[tensor.name]
        # Not strict: a per-item scalar (batch,) is served as [batch, 1].
        for symbol, size in zip(tensor.shape, shape, strict=False):
            if isinstance(symbol, str) and symbol in DYNAMIC_SYMBOLS:
                symbols[symbol] = int(size)
    scale = dims.movq_scale_factor
    for pixels, latent in (("height", "latent_height"), ("width", "latent_width")):
        if latent in symbols and pixels not in symbols:
            symbols[pixels] = symbols[latent] * scale
        elif pixels in symbols and latent not in symbols:
            symbols[latent] = symbols[pixels] // scale
    return symbols
