"""The one request type: every generation parameter and its default, written once.

`GenerationRequest` is what the Python API builds from keyword arguments, what the CLI builds from its
flags, what the server-side generation model builds from a request's named inputs, and what the
repository generator turns into that model's inputs (`wire.py`). Names follow diffusers' Kandinsky 2.2
pipelines (`num_inference_steps`, `prior_guidance_scale`, ...), so user code ports one to one.

Which fields a mode takes and requires comes from its definition (`modes.py`); checking a request
against a server's limits is `validation.check_request`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from .errors import InvalidRequest
from .modes import (  # noqa: F401 - the mode names, importable from here as before
    CONTROLNET,
    CONTROLNET_IMAGE_TO_IMAGE,
    EMB2EMB,
    FUSE,
    IMAGE_TO_IMAGE,
    INPAINT,
    MODES,
    OUTPAINT,
    TEXT_TO_IMAGE,
    VARIATIONS,
    Mode,
    modes_using,
)

OUTPUT_TYPES = ("pil", "np", "latent")  # as diffusers: PIL images, float arrays in [0, 1], final latents

# Side used when neither the request nor an input image gives one (diffusers' pipelines default to 512).
DEFAULT_IMAGE_SIDE = 512


def _param(default: Any, wire: str, help: str) -> Any:
    """A request field. `wire` is its type on the wire (see wire.py); the modes that use it say so (modes.py)."""
    return field(default=default, metadata={"wire": wire, "help": help})


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation takes. Defaults are the documented ones; a mode ignores no field silently.

    Images (`image`, `mask_image`, `hint`, the images of `images_and_prompts`) may be PIL images, paths,
    file bytes or uint8 arrays (see images.py); on the wire they are base64-encoded PNG/JPEG strings.
    """

    mode: str = _param(TEXT_TO_IMAGE, "string", f"one of {', '.join(MODES)}")
    prompt: Any = _param(None, "strings", "what the image should show (one or a list)")
    negative_prompt: Any = _param(None, "strings", "what the image should not show")
    image: Any = _param(None, "image", "input image")
    mask_image: Any = _param(None, "image", "mask of the image's size: white = repaint")
    hint: Any = _param(
        None, "image", "depth map at the output size, grayscale or RGB (white = near); fed as pixel / 255"
    )
    images_and_prompts: Any = _param(
        None, "strings", "prompts and images to mix (images as data:image/... URIs)"
    )
    weights: Any = _param(None, "floats", "one weight >= 0 per item of images_and_prompts")
    negative_prior_prompt: Any = _param(None, "string", "negative prompt of fusion's prior runs")
    num_images_per_prompt: int = _param(1, "int", "images per prompt")
    height: Any = _param(None, "int", "output height (default: the hint's, else the input image's, else 512)")
    width: Any = _param(None, "int", "output width (default: the hint's, else the input image's, else 512)")
    num_inference_steps: int = _param(50, "int", "decoder denoising steps")
    guidance_scale: float = _param(4.0, "float", "decoder classifier-free guidance scale")
    prior_num_inference_steps: int = _param(25, "int", "prior denoising steps")
    prior_guidance_scale: float = _param(4.0, "float", "prior classifier-free guidance scale")
    strength: float = _param(0.3, "float", "part of the schedule to run, in (0, 1]")
    left: int = _param(0, "int", "pixels to add on the left")
    top: int = _param(0, "int", "pixels to add at the top")
    right: int = _param(0, "int", "pixels to add on the right")
    bottom: int = _param(0, "int", "pixels to add at the bottom")
    seed: Any = _param(None, "int", "random seed (numpy PCG64); omit for a random one")
    scheduler: Any = _param(
        None, "string", "decoder scheduler, a diffusers class name (default: the checkpoint's)"
    )
    scheduler_config: Any = _param(
        None,
        "json",
        'decoder scheduler config overrides, e.g. {"use_karras_sigmas": true} (JSON text on the wire)',
    )
    prior_scheduler: Any = _param(None, "string", "prior scheduler: UnCLIPScheduler only")
    latents: Any = _param(
        None, "tensor", "initial decoder latents [batch, channels, h, w] instead of seeded noise"
    )
    output_type: str = _param("pil", "string", f"one of {', '.join(OUTPUT_TYPES)}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, mode: str, **options: Any) -> GenerationRequest:
        """A request for `mode` from keyword arguments, refusing unknown names (listing the valid ones)."""
        unknown = sorted(set(options) - set(cls.field_names()))
        if unknown:
            raise InvalidRequest(
                unknown[0], f"is not a parameter of {mode}; valid parameters: {', '.join(mode_fields(mode))}"
            )
        return cls(mode=mode, **options)

    def given(self) -> dict[str, Any]:
        """The fields that differ from their defaults (what a request has to carry on the wire)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if not _is_default(f, getattr(self, f.name))
        }

    def with_values(self, **changes: Any) -> GenerationRequest:
        return replace(self, **changes)


def _is_default(spec: Any, value: Any) -> bool:
    default = spec.default
    if default is MISSING:
        return False
    if default is None or value is None:
        return value is default
    return type(value) is type(default) and value == default


def field_specs() -> dict[str, Any]:
    """name -> dataclasses.Field of every request field (its metadata: wire, help)."""
    return {f.name: f for f in fields(GenerationRequest)}


def mode_fields(mode: str) -> list[str]:
    """The fields `mode` uses, in declaration order (none for an unknown mode)."""
    used = MODES[mode].fields if mode in MODES else frozenset()
    return [name for name in field_specs() if name in used]


def required_fields(mode: str) -> list[str]:
    """The fields `mode` cannot run without, in declaration order."""
    required = MODES[mode].required if mode in MODES else frozenset()
    return [name for name in field_specs() if name in required]


def check_fields_apply(request: GenerationRequest) -> Mode:
    """The request's mode; refuse an unknown mode, a missing required field, or a field the mode would ignore."""
    mode = MODES.get(request.mode) if isinstance(request.mode, str) else None
    if mode is None:
        raise InvalidRequest("mode", f"is {request.mode!r}; valid modes: {', '.join(MODES)}")
    for name in required_fields(request.mode):
        if getattr(request, name) is None:
            raise InvalidRequest(name, f"is required by mode {request.mode}")
    for name in request.given():
        if name not in mode.fields:
            raise InvalidRequest(
                name, f"is not used by mode {request.mode}; it applies to: {', '.join(modes_using(name))}"
            )
    return mode
