"""Which shapes the GPU engines serve: TensorRT optimisation profiles and image-size limits, from the registry.

Pure Python (no tensorrt, no torch): the engine builder (`kandinsky-export engines`), the repository
generator (ONNX Runtime's TensorRT accelerator, CUDA graphs, warm-up) and this client's size checks all
derive what they need from here, so an engine, its Triton config and the client cannot disagree.

Profiles. Every dynamic axis of the registry gets a [min, opt, max] range:
- batch: 1 .. the component's `max_batch_size` (MAX_IMAGES_PER_REQUEST images x its `rows_per_image`).
  The minimum is 1 because Triton's dynamic batcher may form any batch up to `max_batch_size`; the
  optimum is one image's rows (what one client at a time sends).
- image sides: `min_size` .. `max_size` pixels; latent axes divide by the checkpoint's MoVQ scale factor
  (8 for the released MoVQ).
- `static_size`: one image size, min = opt = max on the spatial axes (the batch stays dynamic).

One profile or several. ONNX Runtime's TensorRT accelerator takes one profile (`engine_profile`, tuned
for `opt_size`). The TensorRT engines get one profile per optimum in `opt_sizes` (`engine_profiles`;
default 512, 768 and 1024 px, clipped to the served sides), because a dynamic engine is slow far from
its optimum and Triton's TensorRT backend runs each request on the listed profile nearest its shapes.
Each profile spans `min_size` up to a ceiling halfway to the next optimum (`size_ranges`): height and
width vary independently, so every profile starts at the smallest side (512x1024 must find one), and a
ceiling at the midpoint keeps Triton's nearest-optimum choice while bounding each profile's activation
memory, which grows with its largest shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .components import MAX_IMAGE_SIZE, ModelDims, ModelSpec
from .request import DEFAULT_IMAGE_SIDE

SPATIAL_SYMBOLS = ("height", "width", "latent_height", "latent_width")

# TensorRT profile defaults: sides from 512 px (the smallest the released model is used at) to the
# largest served side, on a 64-pixel grid. A single profile is tuned for 768 px (the middle of that
# range); the engines get one profile per optimum in PROFILE_OPT_SIZES: the client's default size, 768
# and the largest side (clipped to what a server serves).
PROFILE_MIN_SIZE = 512
PROFILE_OPT_SIZE = 768
PROFILE_SIZE_STEP = 64
PROFILE_OPT_SIZES = (DEFAULT_IMAGE_SIDE, PROFILE_OPT_SIZE, MAX_IMAGE_SIZE)


@dataclass(frozen=True)
class ProfileSettings:
    """Which requests the engines must serve: image sides in pixels, or one static size.

    `opt_size` tunes the single profile (ONNX Runtime's accelerator) and is the size of the FP16 check;
    `opt_sizes` are the TensorRT engines' optima, one profile each (None: PROFILE_OPT_SIZES, clipped to
    [min_size, max_size] and to the size grid).
    """

    min_size: int = PROFILE_MIN_SIZE
    opt_size: int = PROFILE_OPT_SIZE
    max_size: int = MAX_IMAGE_SIZE
    size_step: int = PROFILE_SIZE_STEP
    static_size: tuple[int, int] | None = None  # (height, width) in pixels
    opt_sizes: tuple[int, ...] | None = None

    @classmethod
    def for_max_size(
        cls,
        max_size: int = MAX_IMAGE_SIZE,
        *,
        min_size: int | None = None,
        opt_size: int | None = None,
        opt_sizes: Sequence[int] | None = None,
        size_step: int = PROFILE_SIZE_STEP,
        static_size: tuple[int, int] | None = None,
    ) -> ProfileSettings:
        """Settings up to `max_size`: the default minimum and optimum, lowered to `max_size` when it is
        smaller (a 640 px server gets 512 .. 640, optimum 640; a 256 px one 256 .. 256). Given `opt_sizes`
        (the engines' optima), the single optimum is their middle one unless `opt_size` says otherwise."""
        low = min(PROFILE_MIN_SIZE, max_size) if min_size is None else min_size
        if opt_size is None and opt_sizes:
            opt_size = sorted(opt_sizes)[len(opt_sizes) // 2]
        opt = min(max(PROFILE_OPT_SIZE, low), max_size) if opt_size is None else opt_size
        if opt_size is None and (opt - low) % size_step:
            opt = low + (opt - low) // size_step * size_step  # stay on the grid below the default
        return cls(
            min_size=low,
            opt_size=opt,
            max_size=max_size,
            size_step=size_step,
            static_size=static_size,
            opt_sizes=tuple(opt_sizes) if opt_sizes else None,
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
        sides = self.static_size or (self.min_size, self.opt_size, self.max_size, *(self.opt_sizes or ()))
        for side in sides:
            if side <= 0 or side % size_multiple:
                raise ValueError(f"image side {side} is not a positive multiple of {size_multiple}")
        if self.static_size:
            return
        if not self.min_size <= self.opt_size <= self.max_size:
            raise ValueError(f"need min <= opt <= max, got {self.min_size}, {self.opt_size}, {self.max_size}")
        for side in (self.opt_size, self.max_size, *(self.opt_sizes or ())):
            if (side - self.min_size) % self.size_step:
                raise ValueError(f"image side {side} is not min {self.min_size} + k * step {self.size_step}")
        for side in self.opt_sizes or ():
            if not self.min_size <= side <= self.max_size:
                raise ValueError(f"profile optimum {side} is outside [{self.min_size}, {self.max_size}]")

    def image_sides(self) -> list[int]:
        """Every supported image side (pixels), for messages and warm-up choices."""
        if self.static_size:
            return sorted(set(self.static_size))
        return list(range(self.min_size, self.max_size + 1, self.size_step))

    def optimum(self) -> tuple[int, int]:
        """(height, width) the single profile is tuned for (and the FP16 check runs at)."""
        return self.static_size or (self.opt_size, self.opt_size)

    def profile_optima(self) -> list[int]:
        """The engines' optima (square sides, ascending): `opt_sizes`, or the defaults clipped to the
        served range and snapped down onto the size grid (duplicates dropped)."""
        if self.opt_sizes:
            return sorted(set(self.opt_sizes))
        clipped = {min(max(side, self.min_size), self.max_size) for side in PROFILE_OPT_SIZES}
        return sorted({self._on_grid(side) for side in clipped})

    def size_ranges(self) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """One (min, opt, max) of (height, width) per engine profile.

        A static size is one profile. Otherwise each optimum gets min_size .. a ceiling: halfway (on the
        grid, rounded down) to the next optimum, and max_size for the last. Triton picks, among the
        profiles that accept a request, the one whose optimum is nearest: a square side below a
        ceiling is nearest that profile's optimum anyway, so the ceiling changes no choice and keeps
        the profile's largest shapes, hence its activation memory, as small as it can be.
        """
        if self.static_size:
            return [(self.static_size, self.static_size, self.static_size)]
        optima = self.profile_optima()
        ceilings = [self._on_grid((low + high) // 2) for low, high in zip(optima, optima[1:], strict=False)]
        ceilings.append(self.max_size)
        low = (self.min_size, self.min_size)
        return [(low, (opt, opt), (top, top)) for opt, top in zip(optima, ceilings, strict=True)]

    def _on_grid(self, side: int) -> int:
        return self.min_size + (side - self.min_size) // self.size_step * self.size_step

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["static_size"] = list(self.static_size) if self.static_size else None
        out["opt_sizes"] = None if self.static_size else self.profile_optima()
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ProfileSettings:
        static = values.get("static_size")
        optima = values.get("opt_sizes")
        return cls(
            min_size=int(values["min_size"]),
            opt_size=int(values["opt_size"]),
            max_size=int(values["max_size"]),
            size_step=int(values["size_step"]),
            static_size=(int(static[0]), int(static[1])) if static else None,
            opt_sizes=tuple(int(side) for side in optima) if optima else None,
        )


def has_spatial_axes(spec: ModelSpec) -> bool:
    """Whether the model's inputs have image-size axes (the UNets, the MoVQ, image pre/post-processing)."""
    return any(symbol in SPATIAL_SYMBOLS for tensor in spec.inputs for symbol in tensor.shape)


def input_shapes(
    spec: ModelSpec, dims: ModelDims, batch: int, height: int, width: int
) -> dict[str, list[int]]:
    """Every input's full shape (batch first) for one batch and image size."""
    symbols = dims.size_symbols(batch, height, width)
    return {t.name: list(t.resolve(symbols, keep_dynamic=False)) for t in spec.inputs}


def _profile(
    spec: ModelSpec, dims: ModelDims, sizes: Sequence[tuple[int, int]]
) -> dict[str, dict[str, list[int]]]:
    """{input: {"min", "opt", "max"}} for the (height, width) of `sizes` at min, opt and max, at batch 1,
    one image's rows and `max_batch_size`."""
    batches = (1, spec.rows_per_image, spec.max_batch_size)
    per_point = [input_shapes(spec, dims, b, h, w) for b, (h, w) in zip(batches, sizes, strict=True)]
    return {
        tensor.name: {
            which: shapes[tensor.name] for which, shapes in zip(("min", "opt", "max"), per_point, strict=True)
        }
        for tensor in spec.inputs
    }


def engine_profile(
    spec: ModelSpec, dims: ModelDims, settings: ProfileSettings
) -> dict[str, dict[str, list[int]]]:
    """{input: {"min": shape, "opt": shape, "max": shape}}: one profile over every served size, tuned
    for `opt_size` (ONNX Runtime's TensorRT accelerator takes one)."""
    settings.validate(dims.size_multiple)
    if settings.static_size:
        return _profile(spec, dims, [settings.static_size] * 3)
    return _profile(spec, dims, [(s, s) for s in (settings.min_size, settings.opt_size, settings.max_size)])


def engine_profiles(
    spec: ModelSpec, dims: ModelDims, settings: ProfileSettings
) -> list[dict[str, dict[str, list[int]]]]:
    """The TensorRT engine's profiles, one per `settings.size_ranges()` (see the module docstring).

    A model without image axes gets one: its profiles would all be the same.
    """
    settings.validate(dims.size_multiple)
    return [_profile(spec, dims, sizes) for sizes in profile_ranges(spec, settings)]


def profile_ranges(
    spec: ModelSpec, settings: ProfileSettings
) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """`settings.size_ranges()` for this model: one range (any) for a model without image axes."""
    ranges = settings.size_ranges()
    return ranges if has_spatial_axes(spec) else ranges[:1]


def instance_activation_memory(per_profile: Sequence[int]) -> dict[str, Any]:
    """The activation memory one Triton instance of a TensorRT model holds, from each profile's figure
    (`activation_bytes` in the engine's sidecar).

    Triton's TensorRT backend creates one execution context per profile the instance group lists. With
    TensorRT's default allocation (STATIC) every context allocates the largest profile's memory; with
    ON_PROFILE_CHANGE each its own profile's. Backends without the `execution_context_allocation_strategy`
    parameter (r25.01, the serving image's, predates it) always allocate STATIC, so `per_instance_bytes`
    (the STATIC figure, never below the other) is what a memory budget must assume;
    `on_profile_change_bytes` is what a backend that honours the parameter holds.
    """
    figures = [int(b) for b in per_profile]
    if not figures:
        raise ValueError("no activation memory recorded: rebuild the engine with `kandinsky-export engines`")
    return {
        "per_profile_bytes": figures,
        "per_instance_bytes": len(figures) * max(figures),
        "on_profile_change_bytes": sum(figures),
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
    """What every one of several engines accepts (the tensorrt flavour: one size range per engine)."""
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
