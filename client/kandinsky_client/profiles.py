"""Which shapes the GPU engines serve: TensorRT optimisation profiles and image-size limits, from the registry.

Pure Python (no tensorrt, no torch): the engine builder (`kandinsky-export engines`), the repository
generator (ONNX Runtime's TensorRT accelerator, CUDA graphs, warm-up) and this client's size checks all
derive what they need from here, so an engine, its Triton config and the client cannot disagree.

Profiles. Every dynamic axis of the registry gets a [min, opt, max] range:
- batch: 1 .. the component's `max_batch_size` (MAX_IMAGES_PER_REQUEST images x its `rows_per_image`).
  The minimum is 1 because Triton's dynamic batcher may form any batch up to `max_batch_size`; the
  optimum is one image's rows.
- image sides: `min_size` .. `max_size` pixels (optimum `opt_size`); latent axes divide by the
  checkpoint's MoVQ scale factor (8 for the released MoVQ).
- `static_size`: one image size, min = opt = max on the spatial axes (the batch stays dynamic).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .components import MAX_IMAGE_SIZE, ModelDims, ModelSpec

SPATIAL_SYMBOLS = ("height", "width", "latent_height", "latent_width")

# TensorRT profile defaults: sides from 512 px (the smallest the released model is used at) to the
# largest served side, tuned for 768 px (the size most requests use), on a 64-pixel grid.
PROFILE_MIN_SIZE = 512
PROFILE_OPT_SIZE = 768
PROFILE_SIZE_STEP = 64


@dataclass(frozen=True)
class ProfileSettings:
    """Which requests the engines must serve: image sides in pixels, or one static size."""

    min_size: int = PROFILE_MIN_SIZE
    opt_size: int = PROFILE_OPT_SIZE
    max_size: int = MAX_IMAGE_SIZE
    size_step: int = PROFILE_SIZE_STEP
    static_size: tuple[int, int] | None = None  # (height, width) in pixels

    @classmethod
    def for_max_size(
        cls,
        max_size: int = MAX_IMAGE_SIZE,
        *,
        min_size: int | None = None,
        opt_size: int | None = None,
        size_step: int = PROFILE_SIZE_STEP,
        static_size: tuple[int, int] | None = None,
    ) -> ProfileSettings:
        """Settings up to `max_size`: the default minimum and optimum, lowered to `max_size` when it is
        smaller (a 640 px server gets 512 .. 640, optimum 640; a 256 px one 256 .. 256)."""
        low = min(PROFILE_MIN_SIZE, max_size) if min_size is None else min_size
        opt = min(PROFILE_OPT_SIZE, max_size) if opt_size is None else opt_size
        if opt_size is None and (opt - low) % size_step:
            opt = low + (opt - low) // size_step * size_step  # stay on the grid below the default
        return cls(
            min_size=low, opt_size=opt, max_size=max_size, size_step=size_step, static_size=static_size
        )

    def validate(self, size_multiple: int = PROFILE_SIZE_STEP) -> None:
        """Raise ValueError naming the setting when these sizes cannot make a profile.

        `size_multiple` is the checkpoint's image size unit (`ModelDims.size_multiple`; 64 for the
        released model): every side must be a multiple of it.
        """
        if self.size_step <= 0 or self.size_step % size_multiple:
            raise ValueError(
                f"size step {self.size_step} is not a multiple of {size_multiple} (the model's size unit)"
            )
        sides = self.static_size or (self.min_size, self.opt_size, self.max_size)
        for side in sides:
            if side <= 0 or side % size_multiple:
                raise ValueError(f"image side {side} is not a positive multiple of {size_multiple}")
        if self.static_size:
            return
        if not self.min_size <= self.opt_size <= self.max_size:
            raise ValueError(f"need min <= opt <= max, got {self.min_size}, {self.opt_size}, {self.max_size}")
        for side in (self.opt_size, self.max_size):
            if (side - self.min_size) % self.size_step:
                raise ValueError(f"image side {side} is not min {self.min_size} + k * step {self.size_step}")

    def image_sides(self) -> list[int]:
        """Every supported image side (pixels), for messages and warm-up choices."""
        if self.static_size:
            return sorted(set(self.static_size))
        return list(range(self.min_size, self.max_size + 1, self.size_step))

    def optimum(self) -> tuple[int, int]:
        """(height, width) the engines are tuned for (and warmed up at)."""
        return self.static_size or (self.opt_size, self.opt_size)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["static_size"] = list(self.static_size) if self.static_size else None
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ProfileSettings:
        static = values.get("static_size")
        return cls(
            min_size=int(values["min_size"]),
            opt_size=int(values["opt_size"]),
            max_size=int(values["max_size"]),
            size_step=int(values["size_step"]),
            static_size=(int(static[0]), int(static[1])) if static else None,
        )


def has_spatial_axes(spec: ModelSpec) -> bool:
    """Whether the model's inputs have image-size axes (the UNets, the MoVQ, image pre/post-processing)."""
    return any(symbol in SPATIAL_SYMBOLS for tensor in spec.inputs for symbol in tensor.shape)


def _symbols(dims: ModelDims, batch: int, height: int, width: int) -> dict[str, int]:
    return {
        **dims.as_symbols(),
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // dims.movq_scale_factor,
        "latent_width": width // dims.movq_scale_factor,
    }


def input_shapes(
    spec: ModelSpec, dims: ModelDims, batch: int, height: int, width: int
) -> dict[str, list[int]]:
    """Every input's full shape (batch first) for one batch and image size."""
    symbols = _symbols(dims, batch, height, width)
    return {t.name: list(t.resolve(symbols, keep_dynamic=False)) for t in spec.inputs}


def engine_profile(
    spec: ModelSpec, dims: ModelDims, settings: ProfileSettings
) -> dict[str, dict[str, list[int]]]:
    """{input: {"min": shape, "opt": shape, "max": shape}} for one component's optimisation profile."""
    settings.validate(dims.size_multiple)
    batches = (1, spec.rows_per_image, spec.max_batch_size)
    if settings.static_size:
        sizes = [settings.static_size] * 3
    else:
        sizes = [(s, s) for s in (settings.min_size, settings.opt_size, settings.max_size)]
    per_point = [input_shapes(spec, dims, b, h, w) for b, (h, w) in zip(batches, sizes, strict=True)]
    return {
        tensor.name: {
            which: shapes[tensor.name] for which, shapes in zip(("min", "opt", "max"), per_point, strict=True)
        }
        for tensor in spec.inputs
    }


def is_spatially_static(profile: Mapping[str, Mapping[str, Sequence[int]]]) -> bool:
    """True when only the batch axis varies: Triton can then capture a CUDA graph per batch size."""
    return all(list(p["min"][1:]) == list(p["max"][1:]) for p in profile.values())


def profile_shapes_option(profile: Mapping[str, Mapping[str, Sequence[int]]], which: str) -> str:
    """ONNX Runtime's TensorRT EP spelling of a profile: "name:1x4x64x64,other:1"."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def image_size_limits(
    size_multiple: int, max_image_size: int, settings: ProfileSettings | None = None
) -> dict:
    """The flavour-neutral size-limit parameter: {"min", "max", "static"} in pixels.

    Without an engine profile (CPU, ONNX Runtime's CUDA provider) every multiple of the checkpoint's size
    unit up to `max_image_size` is served; a profile narrows that to its own range, or to its one size.
    """
    if settings is None:
        return {"min": size_multiple, "max": max_image_size, "static": None}
    if settings.static_size:
        height, width = settings.static_size
        return {"min": min(height, width), "max": max(height, width), "static": [height, width]}
    return {
        "min": max(size_multiple, settings.min_size),
        "max": min(max_image_size, settings.max_size),
        "static": None,
    }


def intersect_size_limits(limits: Sequence[Mapping[str, Any]]) -> dict:
    """What every one of several engines accepts (the tensorrt flavour: one profile per engine)."""
    low = max(int(item["min"]) for item in limits)
    high = min(int(item["max"]) for item in limits)
    statics = {tuple(item["static"]) for item in limits if item.get("static")}
    if len(statics) > 1:
        raise ValueError(f"engines built for different static sizes {sorted(statics)}: rebuild them alike")
    static = list(next(iter(statics))) if statics else None
    if static and not all(low <= side <= high for side in static):
        raise ValueError(f"the static size {static} is outside [{low}, {high}] of the other engines")
    if low > high:
        raise ValueError(f"the engines' image sizes do not overlap: [{low}, {high}]")
    return {"min": low, "max": high, "static": static}
