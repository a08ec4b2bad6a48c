"""The generation modes, each defined once.

A `Mode` is made of three parts, each saying what it reads of the request and which served models it
calls:

- `Embeddings`: how the decoder's image embeddings are made (the prior side), and how many prior loops
  that runs for a request;
- `Decoder`: how the decoder loop starts: from noise, from a picture noised at the first timestep that
  `strength` keeps (image-to-image), or inpainting a picture's masked part;
- `Unet`: the UNet the decoder loop runs (each comes with its own checkpoint's scheduler config).

plus its Python API method (`KandinskyClient.<name>`: positional parameters and docstring) and its CLI
subcommand. Everything else is derived from these definitions: the request fields a mode takes and
requires (`request.mode_fields`, `request.check_fields_apply`), the served models it needs, its
validation (`validation.plan_request`), the step counts of its progress and the generation itself
(`generation.Plan`, `generation.Generator`), the client's methods and the CLI's subcommands. The wire
format carries every request field, whatever the mode. Adding a mode made of existing parts is one
`Mode` in `MODES`.

This module names request fields as strings and imports nothing of the request (which builds on it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import components as registry

TEXT_TO_IMAGE = "text_to_image"
VARIATIONS = "variations"
FUSE = "fuse"
IMAGE_TO_IMAGE = "image_to_image"
EMB2EMB = "emb2emb"
INPAINT = "inpaint"
OUTPAINT = "outpaint"
CONTROLNET = "controlnet"
CONTROLNET_IMAGE_TO_IMAGE = "controlnet_image_to_image"

# The request fields every mode takes.
COMMON_FIELDS = (
    "mode",
    "num_images_per_prompt",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "scheduler_config",
    "output_type",
)
# The fields of a mode that runs the prior, and the models it calls.
_PRIOR_FIELDS = ("negative_prompt", "prior_num_inference_steps", "prior_guidance_scale", "prior_scheduler")
_PRIOR_MODELS = (registry.ENCODE_PROMPT.name, registry.PRIOR.name, registry.PRIOR_POSTPROCESS.name)


# -- parts -------------------------------------------------------------------------------------------


def _one_prior_run(request: Any) -> int:
    return 1


def _no_prior_run(request: Any) -> int:
    return 0


def fusion_runs_negative_prior(request: Any) -> bool:
    """Whether fusion's negative embedding comes from a prior run (that calls the step callback).

    KandinskyV22PriorPipeline.interpolate always runs the prior on its `negative_prompt`; with neither
    `negative_prompt` nor `negative_prior_prompt` it returns the zero-image embedding, and that run's
    draws are consumed without network calls or step callbacks (`Generator.skip_prior`).
    """
    return bool(request.negative_prompt) or request.negative_prior_prompt is not None


def _fusion_prior_runs(request: Any) -> int:
    """One prior run per prompt among the items, plus the negative's."""
    prompts = sum(isinstance(item, str) for item in request.images_and_prompts)
    return prompts + fusion_runs_negative_prior(request)


@dataclass(frozen=True)
class Embeddings:
    """How a mode makes the decoder's image embeddings (and their negatives)."""

    name: str
    fields: tuple[str, ...]  # request fields it reads
    required: tuple[str, ...]  # of those, the ones a request must give
    models: tuple[str, ...]  # served models it calls
    # Prior loops it runs for a checked request (each calls the step callback once per step).
    prior_runs: Callable[[Any], int]
    strength: bool = False  # its prior loops run the part of their schedule that `strength` keeps

    @property
    def uses_prior(self) -> bool:
        return registry.PRIOR.name in self.models


# KandinskyV22PriorPipeline on `prompt`.
PROMPT_PRIOR = Embeddings(
    "prompt_prior", ("prompt", *_PRIOR_FIELDS), ("prompt",), _PRIOR_MODELS, _one_prior_run
)
# The image's CLIP embedding (as `interpolate` encodes images), the zero-image embedding as negative.
IMAGE_EMBEDDING = Embeddings(
    "image_embedding",
    ("image",),
    ("image",),
    (registry.ENCODE_IMAGE.name, registry.PRIOR_POSTPROCESS.name),
    _no_prior_run,
)
# KandinskyV22PriorPipeline.interpolate: the weighted sum of prompts' prior outputs and images' embeddings.
FUSION = Embeddings(
    "fusion",
    ("images_and_prompts", "weights", "negative_prior_prompt", *_PRIOR_FIELDS),
    ("images_and_prompts", "weights"),
    (registry.ENCODE_IMAGE.name, *_PRIOR_MODELS),
    _fusion_prior_runs,
)
# KandinskyV22PriorEmb2EmbPipeline: the prior on `prompt`, from the image's CLIP embedding noised.
IMAGE_PRIOR = Embeddings(
    "image_prior",
    ("image", "prompt", "strength", *_PRIOR_FIELDS),
    ("image", "prompt"),
    (registry.ENCODE_IMAGE.name, *_PRIOR_MODELS),
    _one_prior_run,
    strength=True,
)

# What the decoder starts from: the input image, or the input image on a larger canvas (outpainting).
IMAGE_PICTURE = "image"
CANVAS_PICTURE = "canvas"


@dataclass(frozen=True)
class Decoder:
    """How a mode's decoder loop starts (its diffusers pipeline's `prepare_latents`)."""

    name: str
    fields: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    picture: str | None = None  # None: seeded noise (or `latents`); else IMAGE_PICTURE or CANVAS_PICTURE
    strength: bool = False  # the picture noised at the first timestep `strength` keeps (image-to-image)
    inpainting: bool = False  # the picture's unmasked part is kept, on the inpainting UNet

    def __post_init__(self) -> None:
        if self.picture is None and (self.strength or self.inpainting):
            raise ValueError(f"decoder start {self.name}: noising or inpainting needs a picture")
        if self.picture is not None and self.strength == self.inpainting:
            raise ValueError(f"decoder start {self.name}: a picture is either noised or inpainted")


# KandinskyV22Pipeline: noise scaled by the scheduler's init_noise_sigma, every timestep.
FROM_NOISE = Decoder("from_noise", ("latents",))
# KandinskyV22Img2ImgPipeline.
FROM_IMAGE = Decoder(
    "from_image",
    ("image", "strength"),
    ("image",),
    (registry.ENCODE_LATENTS.name,),
    picture=IMAGE_PICTURE,
    strength=True,
)
# KandinskyV22InpaintPipeline on the image, repainting the white part of `mask_image`.
INPAINTING = Decoder(
    "inpainting",
    ("image", "mask_image", "latents"),
    ("image", "mask_image"),
    (registry.ENCODE_LATENTS.name,),
    picture=IMAGE_PICTURE,
    inpainting=True,
)
# KandinskyV22InpaintPipeline on the image extended by the margins (edge pixels repeated), the new
# area masked.
OUTPAINTING = Decoder(
    "outpainting",
    ("image", "left", "top", "right", "bottom", "latents"),
    ("image",),
    (registry.ENCODE_LATENTS.name,),
    picture=CANVAS_PICTURE,
    inpainting=True,
)


@dataclass(frozen=True)
class Unet:
    """The UNet a mode's decoder loop runs."""

    spec: registry.ComponentSpec
    fields: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    @property
    def models(self) -> tuple[str, ...]:
        return (self.spec.name,)


DECODER_UNET = Unet(registry.UNET)
INPAINT_UNET = Unet(registry.UNET_INPAINT)
# The ControlNet UNet also sees `hint`, a depth map at the output size (which it sets by default).
CONTROLNET_UNET = Unet(registry.UNET_CONTROLNET, ("hint",), ("hint",))


# -- the Python API and the CLI ----------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A mode's `KandinskyClient` method: its positional parameters (request fields) and docstring."""

    args: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class Command:
    """A mode's `kandinsky-client` subcommand: its name, positional arguments (request fields), help."""

    name: str
    args: tuple[str, ...]
    help: str


# -- modes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One generation mode: its parts, its API method (`KandinskyClient.<name>`) and its CLI subcommand."""

    name: str
    pipelines: str  # the diffusers pipelines it follows step for step
    embeddings: Embeddings
    decoder: Decoder
    unet: Unet
    method: Method
    command: Command

    def __post_init__(self) -> None:
        if self.decoder.inpainting != (self.unet.spec.name == registry.UNET_INPAINT.name):
            raise ValueError(f"mode {self.name}: an inpainting start needs the inpainting UNet, and only it")
        if self.decoder.strength and self.embeddings.strength:
            raise ValueError(f"mode {self.name}: `strength` applies to the decoder or the prior, not both")
        for where, names in (("method", self.method.args), ("command", self.command.args)):
            unknown = sorted(set(names) - set(self.fields))
            if unknown:
                raise ValueError(f"mode {self.name}: {where} arguments {unknown} are not fields of the mode")

    @property
    def fields(self) -> frozenset[str]:
        """The request fields this mode reads (any other given field is refused)."""
        parts = (self.embeddings, self.decoder, self.unet)
        return frozenset(COMMON_FIELDS).union(*(part.fields for part in parts))

    @property
    def required(self) -> frozenset[str]:
        """The request fields this mode cannot run without."""
        return frozenset().union(*(part.required for part in (self.embeddings, self.decoder, self.unet)))

    @property
    def models(self) -> tuple[str, ...]:
        """The served models it calls (with the decoder's MoVQ; see `Generator.required_models`)."""
        return (
            *self.decoder.models,
            *self.embeddings.models,
            *self.unet.models,
            registry.DECODE_IMAGE.name,
        )


# Every mode, by name, in the order the API, the CLI and messages list them.
MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode(
            TEXT_TO_IMAGE,
            "KandinskyV22PriorPipeline + KandinskyV22Pipeline",
            PROMPT_PRIOR,
            FROM_NOISE,
            DECODER_UNET,
            Method(
                ("prompt",),
                "Prompt(s) -> images, as KandinskyV22PriorPipeline followed by KandinskyV22Pipeline.",
            ),
            Command("generate", ("prompt",), "text-to-image"),
        ),
        Mode(
            VARIATIONS,
            "the image's CLIP embedding (as `interpolate` encodes images) + KandinskyV22Pipeline",
            IMAGE_EMBEDDING,
            FROM_NOISE,
            DECODER_UNET,
            Method(
                ("image",),
                "Images like `image`: its CLIP embedding decoded, the zero-image embedding as the negative.",
            ),
            Command("variations", ("image",), "images like the input image (its CLIP embedding)"),
        ),
        Mode(
            FUSE,
            "KandinskyV22PriorPipeline.interpolate + KandinskyV22Pipeline",
            FUSION,
            FROM_NOISE,
            DECODER_UNET,
            Method(
                ("images_and_prompts", "weights"),
                "KandinskyV22PriorPipeline.interpolate of weighted prompts and images, then decoded.",
            ),
            Command("fuse", ("images_and_prompts",), "a weighted mix of prompts and images (@file)"),
        ),
        Mode(
            IMAGE_TO_IMAGE,
            "KandinskyV22PriorPipeline + KandinskyV22Img2ImgPipeline",
            PROMPT_PRIOR,
            FROM_IMAGE,
            DECODER_UNET,
            Method(
                ("image", "prompt"),
                """Redraw `image` towards the prompt; `strength` in (0, 1] is the part of the decoder schedule run.

The output has `height`/`width`, by default the image's; the image is resized to it first.
(diffusers 0.42.1 passes (width, height) swapped to its image processor, so for a non-square size
it resizes to the transposed shape; here the output has the requested height and width.)""",
            ),
            Command("img2img", ("image", "prompt"), "redraw an image following a prompt (decoder side)"),
        ),
        Mode(
            EMB2EMB,
            "KandinskyV22PriorEmb2EmbPipeline + KandinskyV22Pipeline",
            IMAGE_PRIOR,
            FROM_NOISE,
            DECODER_UNET,
            Method(
                ("image", "prompt"),
                "Image-to-image on the prior side: the prior starts from the image's CLIP embedding.",
            ),
            Command(
                "emb2emb", ("image", "prompt"), "move an image's embedding towards a prompt (prior side)"
            ),
        ),
        Mode(
            INPAINT,
            "KandinskyV22PriorPipeline + KandinskyV22InpaintPipeline",
            PROMPT_PRIOR,
            INPAINTING,
            INPAINT_UNET,
            Method(
                ("image", "mask_image", "prompt"),
                "Repaint the white part of `mask_image` (the image's size) following the prompt.",
            ),
            Command(
                "inpaint",
                ("image", "mask_image", "prompt"),
                "repaint the white part of a mask following a prompt",
            ),
        ),
        Mode(
            OUTPAINT,
            "`inpaint` on a larger canvas whose new area is the mask",
            PROMPT_PRIOR,
            OUTPAINTING,
            INPAINT_UNET,
            Method(
                ("image", "prompt"),
                """Extend `image` by `left`/`top`/`right`/`bottom` pixels and paint the new area (edge pixels
repeated, then masked); the canvas must fit the server's maximum image size.""",
            ),
            Command("outpaint", ("image", "prompt"), "extend an image on any side following a prompt"),
        ),
        Mode(
            CONTROLNET,
            "KandinskyV22PriorPipeline + KandinskyV22ControlnetPipeline",
            PROMPT_PRIOR,
            FROM_NOISE,
            CONTROLNET_UNET,
            Method(
                ("prompt", "hint"),
                """Text-to-image following a depth map, as KandinskyV22PriorPipeline + KandinskyV22ControlnetPipeline.

`hint` is the depth map (grayscale or RGB image, bright = near, e.g. transformers'
depth-estimation output) at the output size; `height`/`width` default to its size. It reaches
the UNet as pixel / 255 on 3 channels, as diffusers' documented `make_hint` prepares it.""",
            ),
            # The CLI takes the depth map first: `controlnet depth.png "a robot"`.
            Command("controlnet", ("hint", "prompt"), "text-to-image following a depth map (ControlNet)"),
        ),
        Mode(
            CONTROLNET_IMAGE_TO_IMAGE,
            "KandinskyV22PriorPipeline + KandinskyV22ControlnetImg2ImgPipeline",
            PROMPT_PRIOR,
            FROM_IMAGE,
            CONTROLNET_UNET,
            Method(
                ("image", "prompt", "hint"),
                """Redraw `image` following the prompt and a depth map (KandinskyV22ControlnetImg2ImgPipeline);
`strength` as in `image_to_image`. The image is resized to the output size, the hint is not.""",
            ),
            Command(
                "controlnet-img2img",
                ("image", "hint", "prompt"),
                "redraw an image following a prompt and a depth map (ControlNet)",
            ),
        ),
    )
}


def modes_using(field: str) -> list[str]:
    """The modes that take request field `field`, in MODES order."""
    return [name for name, mode in MODES.items() if field in mode.fields]
