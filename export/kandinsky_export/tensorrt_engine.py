"""TensorRT engines from the bundle's ONNX files, with optimisation profiles derived from the registry.

    <bundle>/<component>/tensorrt/model.plan     the serialized engine (Triton's `tensorrt_plan`)
    <bundle>/<component>/tensorrt/engine.json    what it was built from and for (the sidecar)
    <bundle>/tensorrt_timing.cache               TensorRT's timing cache, shared by every build

Profiles. Every dynamic axis of the registry gets a [min, opt, max] range:
- batch: 1 .. the registry's `max_batch_size` (MAX_IMAGES_PER_REQUEST images, times the component's
  batch per image: 2 for classifier-free guidance on the UNet, 4 prompts per image for the text
  encoder and prior). The minimum is 1 because Triton's dynamic batcher may form any batch up to
  `max_batch_size`; the optimum is one image's batch.
- image sides: 512 .. 1024 pixels in steps of 64 (optimum 768); latent axes divide by the checkpoint's
  MoVQ scale factor (8 for the released MoVQ: 64 .. 128 latents).
- `static_size`: one image size, min = opt = max on the spatial axes (batch stays dynamic). Faster
  kernels, and Triton can capture CUDA graphs for every batch size.

Precision. The FP16 ONNX variant carries its precision (FP16 weights, FP32 islands where the measured
error demanded them, FP32 inputs/outputs), so it is parsed as a *strongly typed* network: TensorRT
keeps exactly those types. `fp32` builds the FP32 ONNX (TF32 allowed); `mixed` builds the FP32 ONNX
with the FP16 builder flag and lets TensorRT choose per layer (the TensorRT demo's way; no FP32
islands are guaranteed).

Rebuilds. The sidecar records the TensorRT version, the GPU (name and compute capability), the profile,
the build settings and the sha256 of the source ONNX; an engine is rebuilt when any of them differs
from what the current build would record (engines are not portable across TensorRT versions or GPUs).

`tensorrt` is imported only to build: profiles, sidecars and rebuild decisions are plain Python.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kandinsky_client.components import COMPONENTS, MAX_IMAGES_PER_REQUEST, ComponentSpec, ModelDims
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

ENGINE_DIR = "tensorrt"
ENGINE_FILE = "model.plan"
METADATA_FILE = "engine.json"
TIMING_CACHE = "tensorrt_timing.cache"
METADATA_FORMAT = 1
PRECISIONS = ("default", "fp16", "fp32", "mixed")
# The sidecar fields that decide whether an engine is current; the rest is informational.
KEY_FIELDS = ("format", "component", "tensorrt_version", "gpu", "source", "build", "profile")

_SPATIAL = {"height": 1, "width": 1, "latent_height": 0, "latent_width": 0}  # 1: pixels, 0: latents


# --------------------------------------------------------------------------------------------------
# Profiles (pure Python)


@dataclass(frozen=True)
class ProfileSettings:
    """Which requests the engines must serve: image sides in pixels, or one static size."""

    min_size: int = 512
    opt_size: int = 768
    max_size: int = 1024
    size_step: int = 64
    static_size: tuple[int, int] | None = None  # (height, width) in pixels

    def validate(self, dims: ModelDims) -> None:
        multiple = dims.size_multiple
        if self.size_step % multiple:
            raise ValueError(
                f"size step {self.size_step} is not a multiple of {multiple} (the model's size unit)"
            )
        sizes = self.static_size or (self.min_size, self.opt_size, self.max_size)
        for size in sizes:
            if size <= 0 or size % multiple:
                raise ValueError(f"image side {size} is not a positive multiple of {multiple}")
        if not self.static_size:
            if not self.min_size <= self.opt_size <= self.max_size:
                raise ValueError(
                    f"need min <= opt <= max, got {self.min_size}, {self.opt_size}, {self.max_size}"
                )
            for size in (self.opt_size, self.max_size):
                if (size - self.min_size) % self.size_step:
                    raise ValueError(
                        f"image side {size} is not min {self.min_size} + k * step {self.size_step}"
                    )

    def image_sides(self) -> list[int]:
        """Every supported image side (pixels), for validation messages and warm-up choices."""
        if self.static_size:
            return sorted(set(self.static_size))
        return list(range(self.min_size, self.max_size + 1, self.size_step))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["static_size"] = list(self.static_size) if self.static_size else None
        return out


def batch_per_image(spec: ComponentSpec) -> int:
    """How many batch rows one image costs this component, from the registry's batch semantics."""
    return max(1, spec.max_batch_size // MAX_IMAGES_PER_REQUEST)


def _symbols(dims: ModelDims, batch: int, height: int, width: int) -> dict[str, int]:
    return {
        **dims.as_symbols(),
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // dims.movq_scale_factor,
        "latent_width": width // dims.movq_scale_factor,
    }


def engine_profile(
    spec: ComponentSpec, dims: ModelDims, settings: ProfileSettings
) -> dict[str, dict[str, list[int]]]:
    """{input: {"min": shape, "opt": shape, "max": shape}} for one component's optimisation profile."""
    settings.validate(dims)
    per_image = batch_per_image(spec)
    batches = (1, per_image, spec.max_batch_size)
    if settings.static_size:
        sizes = [settings.static_size] * 3
    else:
        sizes = [(s, s) for s in (settings.min_size, settings.opt_size, settings.max_size)]
    profile: dict[str, dict[str, list[int]]] = {}
    for tensor in spec.inputs:
        shapes = [
            list(tensor.resolve(_symbols(dims, batch, h, w), keep_dynamic=False))
            for batch, (h, w) in zip(batches, sizes, strict=True)
        ]
        profile[tensor.name] = dict(zip(("min", "opt", "max"), shapes, strict=True))
    return profile


def is_spatially_static(profile: Mapping[str, Mapping[str, Sequence[int]]]) -> bool:
    """True when only the batch axis varies: Triton can then capture CUDA graphs per batch size."""
    return all(list(p["min"][1:]) == list(p["max"][1:]) for p in profile.values())


def profile_shapes_option(profile: Mapping[str, Mapping[str, Sequence[int]]], which: str) -> str:
    """ONNX Runtime's TensorRT EP spelling of a profile: "name:1x4x64x64,other:1"."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


# --------------------------------------------------------------------------------------------------
# Sidecar metadata and the rebuild decision (pure Python)


def choose_source(entry: Mapping[str, Any], precision: str) -> tuple[str, str, dict[str, Any]]:
    """(relative ONNX path, precision of the engine, build flags) for a manifest component entry.

    `default` follows the entry's `default_precision` (FP32 when no FP16 variant passed its check).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {PRECISIONS}")
    if precision == "default":
        precision = entry.get("default_precision", "fp32")
    if precision == "fp16":
        variant = entry.get("variants", {}).get("fp16")
        if variant is None:
            raise FileNotFoundError("no FP16 variant in the bundle: run `kandinsky-export fp16` first")
        if not variant.get("standard_ops_only", False):
            raise ValueError(
                "the FP16 variant holds ONNX Runtime contrib operators, which TensorRT cannot parse: "
                "re-run `kandinsky-export fp16 --fusions portable`"
            )
        if not variant.get("passed", False):
            raise ValueError("the FP16 variant failed its error check; build fp32 or mixed instead")
        return variant["path"], "fp16", {"strongly_typed": True, "fp16_flag": False}
    if precision == "mixed":
        return "model.onnx", "mixed", {"strongly_typed": False, "fp16_flag": True}
    return "model.onnx", "fp32", {"strongly_typed": False, "fp16_flag": False}


def engine_metadata(
    component: str,
    *,
    tensorrt_version: str,
    gpu: Mapping[str, str],
    source_path: str,
    source_sha256: str,
    precision: str,
    build: Mapping[str, Any],
    profile: Mapping[str, Any],
    settings: ProfileSettings,
) -> dict[str, Any]:
    """The sidecar content for an engine; `KEY_FIELDS` decide whether an existing engine is current."""
    return {
        "format": METADATA_FORMAT,
        "component": component,
        "tensorrt_version": tensorrt_version,
        "gpu": dict(gpu),
        "source": {"path": source_path, "sha256": source_sha256, "precision": precision},
        "build": dict(build),
        "profile": {
            "inputs": {k: dict(v) for k, v in profile.items()},
            "settings": settings.as_dict(),
            "max_batch_size": max(v["max"][0] for v in profile.values()),
        },
    }


def rebuild_reason(engine_dir: Path, expected: Mapping[str, Any]) -> str | None:
    """Why the engine in `engine_dir` must be (re)built, or None when it matches `expected`."""
    engine_dir = Path(engine_dir)
    if not (engine_dir / ENGINE_FILE).is_file():
        return "no engine"
    sidecar = engine_dir / METADATA_FILE
    if not sidecar.is_file():
        return "no metadata sidecar"
    try:
        recorded = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, OSError) as error:
        return f"unreadable metadata ({error})"
    changes = []
    for key in KEY_FIELDS:
        old, new = recorded.get(key), expected.get(key)
        if _canonical(old) != _canonical(new):
            changes.append(f"{key}: {_short(old)} -> {_short(new)}")
    return "; ".join(changes) or None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_engine_metadata(component_dir: Path) -> dict[str, Any] | None:
    path = Path(component_dir) / ENGINE_DIR / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def record_engine(bundle: Path, component: str, metadata: Mapping[str, Any]) -> None:
    """Write the sidecar next to the engine and point the manifest entry at both."""
    from .onnx_export import write_manifest_entry

    engine_dir = Path(bundle) / component / ENGINE_DIR
    (engine_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    write_manifest_entry(
        bundle,
        component,
        tensorrt={
            "engine": f"{ENGINE_DIR}/{ENGINE_FILE}",
            "metadata": f"{ENGINE_DIR}/{METADATA_FILE}",
            "precision": metadata["source"]["precision"],
            "tensorrt_version": metadata["tensorrt_version"],
            "gpu": metadata["gpu"],
        },
    )


# --------------------------------------------------------------------------------------------------
# The GPU and TensorRT (imported lazily)


def gpu_identity(device: int = 0) -> dict[str, str]:
    """Name and compute capability of the GPU engines are built for (nvidia-smi, else torch.cuda)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()
            name, capability = (part.strip() for part in out.splitlines()[0].rsplit(",", 1))
            return {"name": name, "compute_capability": capability}
        except (subprocess.SubprocessError, ValueError, IndexError) as error:
            logger.warning("nvidia-smi gave no GPU identity (%s); trying torch.cuda", error)
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    raise RuntimeError(
        "no NVIDIA GPU visible (neither nvidia-smi nor torch.cuda found one): engines need one"
    )


def tensorrt_version() -> str:
    try:
        import tensorrt as trt
    except ImportError as error:
        raise RuntimeError(
            "the tensorrt package is not installed: build engines in the docker image (docker/Dockerfile) "
            "or on a GPU host with the tensorrt wheel matching its Triton release"
        ) from error
    return trt.__version__


@dataclass
class BuildOptions:
    builder_optimization_level: int = 3
    workspace_gib: float | None = None  # None: TensorRT's default (the device's memory)
    timing_cache: Path | None = None


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: Mapping[str, Mapping[str, Sequence[int]]],
    *,
    strongly_typed: bool,
    fp16_flag: bool,
    options: BuildOptions,
) -> dict[str, str]:
    """Parse `onnx_path`, build one engine with one optimisation profile, write it atomically.

    Returns the engine's input/output dtypes (TensorRT names), which the Triton config must match.
    """
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):  # external data is read relative to the file
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    config.builder_optimization_level = options.builder_optimization_level
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    cache_bytes = (
        options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    )
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning(
            "timing cache %s is from another GPU or TensorRT; starting a new one", options.timing_cache
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    optimisation_profile = builder.create_optimization_profile()
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, shapes in profile.items():
        if name not in names:
            raise KeyError(f"{onnx_path}: the network has no input '{name}' (inputs: {sorted(names)})")
        optimisation_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(optimisation_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see its log above")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_suffix(".plan.tmp")
    with tmp.open("wb") as handle:
        handle.write(serialized)
    os.replace(tmp, engine_path)
    if options.timing_cache:
        options.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    return {t.name: str(t.dtype).rsplit(".", 1)[-1] for t in tensors}


# --------------------------------------------------------------------------------------------------
# A whole bundle


@dataclass
class EngineResult:
    component: str
    action: str  # "built" or "up to date"
    reason: str | None
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        source = self.metadata.get("source", {})
        why = f" ({self.reason})" if self.reason and self.action == "built" else ""
        return (
            f"{self.component:>14s}: {self.action}{why} [{source.get('precision')} from {source.get('path')}] "
            f"{self.seconds:.1f}s"
        )


def plan_engines(
    bundle: Path,
    components: Sequence[str] | None,
    *,
    settings: ProfileSettings,
    precision: str,
    trt_version: str,
    gpu: Mapping[str, str],
    options: BuildOptions,
    digest: Callable[[Path], str] | None = None,
) -> list[tuple[str, dict[str, Any], str | None]]:
    """[(component, expected sidecar, rebuild reason or None)] without touching TensorRT.

    Split from `build_engines` so the rebuild decision over a whole bundle is testable without a GPU.
    """
    from .onnx_export import onnx_digest, read_manifest

    digest = digest or onnx_digest
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    dims = ModelDims.from_dict(manifest["dims"])
    wanted = list(components or manifest["components"])
    plans = []
    for component in wanted:
        entry = manifest["components"][component]
        source, engine_precision, flags = choose_source(entry, precision)
        spec = COMPONENTS[component]
        expected = engine_metadata(
            component,
            tensorrt_version=trt_version,
            gpu=gpu,
            source_path=source,
            source_sha256=digest(bundle / component / source),
            precision=engine_precision,
            build={**flags, "builder_optimization_level": options.builder_optimization_level},
            profile=engine_profile(spec, dims, settings),
            settings=settings,
        )
        plans.append((component, expected, rebuild_reason(bundle / component / ENGINE_DIR, expected)))
    return plans


def build_engines(
    bundle: Path,
    components: Sequence[str] | None = None,
    *,
    settings: ProfileSettings | None = None,
    precision: str = "default",
    options: BuildOptions | None = None,
    force: bool = False,
) -> list[EngineResult]:
    """Build (or keep) one engine per component; rebuilds those whose sidecar no longer matches."""
    bundle = Path(bundle)
    settings = settings or ProfileSettings()
    options = options or BuildOptions()
    if options.timing_cache is None:
        options.timing_cache = bundle / TIMING_CACHE
    plans = plan_engines(
        bundle,
        components,
        settings=settings,
        precision=precision,
        trt_version=tensorrt_version(),
        gpu=gpu_identity(),
        options=options,
    )
    results = []
    for component, expected, reason in tqdm(plans, desc="TensorRT engines", unit="engine"):
        if reason is None and not force:
            results.append(EngineResult(component, "up to date", None, 0.0, expected))
            logger.info("%s", results[-1].line())
            continue
        start = time.monotonic()
        engine_dir = bundle / component / ENGINE_DIR
        logger.info("building %s engine: %s", component, "forced" if reason is None else reason)
        io = build_engine(
            bundle / component / expected["source"]["path"],
            engine_dir / ENGINE_FILE,
            expected["profile"]["inputs"],
            strongly_typed=expected["build"]["strongly_typed"],
            fp16_flag=expected["build"]["fp16_flag"],
            options=options,
        )
        seconds = time.monotonic() - start
        metadata = {
            **expected,
            "io_dtypes": io,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(seconds, 1),
        }
        record_engine(bundle, component, metadata)
        results.append(EngineResult(component, "built", reason or "forced", seconds, metadata))
        logger.info("%s", results[-1].line())
    return results
