"""TensorRT engines from the bundle's ONNX files, with optimisation profiles derived from the registry.

    <bundle>/<component>/tensorrt/model.plan     the serialized engine (Triton's `tensorrt_plan`)
    <bundle>/<component>/tensorrt/engine.json    what it was built from and for (the sidecar)
    <bundle>/tensorrt_timing.cache               TensorRT's timing cache, shared by every build

Profiles (batch 1 .. `max_batch_size`, optimum one image's rows; one profile per optimum in `opt_sizes`,
each from `min_size` to a ceiling halfway to the next, or one static size) come from
`kandinsky_core.profiles`, next to the registry, because the repository generator and the client need
them too and must not import this package. Every profile becomes one execution context per Triton
instance: after the build the sidecar records each profile's activation memory as TensorRT reports it
(`activation_bytes`), which the repository generator turns into the memory one instance holds.

Precision. The FP16 ONNX variant carries its precision (FP16 weights, FP32 islands where the measured
error demanded them, FP32 inputs/outputs), so it is parsed as a *strongly typed* network: TensorRT
keeps exactly those types. `fp32` builds the FP32 ONNX (TF32 allowed); `mixed` builds the FP32 ONNX
with the FP16 builder flag and lets TensorRT choose per layer (the TensorRT demo's way; no FP32
islands are guaranteed).

Rebuilds. The sidecar records the TensorRT version, the GPU (name and compute capability), the profiles,
the build settings and the sha256 of the source ONNX; an engine is rebuilt when any of them differs
from what the current build would record (engines are not portable across TensorRT versions or GPUs).

Check. Every built engine is compared with its FP32 ONNX at each profile's optimum (`engine_check.py`);
the result is recorded in the sidecar (`check`) and a failure fails the build (`EngineCheckError`),
also on later runs that keep the engine, until it is rebuilt (in FP32, or with `--force`).

`tensorrt` (and the CUDA runtime library, for the check's device buffers) is loaded only to build and
run engines: profiles, sidecars, rebuild decisions and the check's judgement are plain Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from kandinsky_core import bundle as layout
from kandinsky_core.bundle import ENGINE_DIR, ENGINE_FILE, ONNX_FILE, TIMING_CACHE
from kandinsky_core.components import COMPONENTS, DTYPES, ModelDims
from kandinsky_core.profiles import (
    ProfileSettings,
    engine_profile,
    engine_profiles,
    has_spatial_axes,
    instance_activation_memory,
    profile_ranges,
)
from tqdm.auto import tqdm

from .engine_check import ENGINE_TOLERANCE, EngineRunner, RecordedInputs, check_engine, worst_output

logger = logging.getLogger(__name__)

METADATA_FILE = layout.ENGINE_METADATA
METADATA_FORMAT = 2  # 2: several profiles, their activation memory, the engine-vs-ONNX check
PRECISIONS = ("default", "fp16", "fp32", "mixed")
# The sidecar fields that decide whether an engine is current; the rest is informational.
KEY_FIELDS = ("format", "component", "tensorrt_version", "gpu", "source", "build", "profile")

__all__ = [
    "ENGINE_DIR",
    "ENGINE_FILE",
    "METADATA_FILE",
    "PRECISIONS",
    "TIMING_CACHE",
    "BuildOptions",
    "EngineCheckError",
    "EngineResult",
    "ProfileSettings",
    "build_engine",
    "build_engines",
    "choose_source",
    "engine_metadata",
    "engine_profile",
    "engine_profiles",
    "gpu_identity",
    "plan_engines",
    "read_engine_metadata",
    "rebuild_reason",
    "record_engine",
    "tensorrt_version",
    "CudaRuntime",
    "TensorRTRunner",
]


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
        return ONNX_FILE, "mixed", {"strongly_typed": False, "fp16_flag": True}
    return ONNX_FILE, "fp32", {"strongly_typed": False, "fp16_flag": False}


def engine_metadata(
    component: str,
    *,
    tensorrt_version: str,
    gpu: Mapping[str, str],
    source_path: str,
    source_sha256: str,
    precision: str,
    build: Mapping[str, Any],
    profiles: Sequence[Mapping[str, Any]],
    settings: ProfileSettings,
) -> dict[str, Any]:
    """The sidecar content for an engine; `KEY_FIELDS` decide whether an existing engine is current.

    `profiles`: [{"optimum": [height, width] or None, "inputs": {input: {"min", "opt", "max"}}}], in the
    engine's profile order (Triton's `instance_group { profile: ["0", ...] }` names them by index).
    """
    return {
        "format": METADATA_FORMAT,
        "component": component,
        "tensorrt_version": tensorrt_version,
        "gpu": dict(gpu),
        "source": {"path": source_path, "sha256": source_sha256, "precision": precision},
        "build": dict(build),
        "profile": {
            "profiles": [
                {
                    "optimum": list(p["optimum"]) if p["optimum"] else None,
                    "inputs": {k: dict(v) for k, v in p["inputs"].items()},
                }
                for p in profiles
            ],
            "settings": settings.as_dict(),
            "max_batch_size": max(v["max"][0] for p in profiles for v in p["inputs"].values()),
        },
    }


def sidecar_profiles(component: str, dims: ModelDims, settings: ProfileSettings) -> list[dict[str, Any]]:
    """The sidecar's profile list for one component: each profile's optimum (pixels) and input ranges."""
    spec = COMPONENTS[component]
    shapes = engine_profiles(spec, dims, settings)
    optima = [opt if has_spatial_axes(spec) else None for _, opt, _ in profile_ranges(spec, settings)]
    return [{"optimum": opt, "inputs": inputs} for opt, inputs in zip(optima, shapes, strict=True)]


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
    engine_dir = Path(bundle) / component / ENGINE_DIR
    layout.write_json(engine_dir / METADATA_FILE, dict(metadata))
    point_manifest_at_engine(bundle, component, metadata)


def point_manifest_at_engine(bundle: Path, component: str, metadata: Mapping[str, Any]) -> None:
    """The manifest entry's `tensorrt` record (a re-export drops it; a current engine gets it back)."""
    layout.update_component(
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
    profiles: Sequence[Mapping[str, Mapping[str, Sequence[int]]]],
    *,
    strongly_typed: bool,
    fp16_flag: bool,
    options: BuildOptions,
) -> dict[str, str]:
    """Parse `onnx_path`, build one engine with one optimisation profile per entry of `profiles` (in that
    order: profile i is Triton's profile "i"), write it atomically.

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

    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for profile in profiles:
        optimisation_profile = builder.create_optimization_profile()
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


# Where the CUDA runtime library is looked for, in order: the CUDA 12 toolkit of the NGC/Triton images (on
# the loader's path, or in /usr/local/cuda); then `CudaRuntime._load` adds the nvidia-cuda-runtime wheel's.
CUDART_NAMES = ("libcudart.so.12", "libcudart.so", "/usr/local/cuda/lib64/libcudart.so.12")
_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind


class CudaRuntime:
    """The few CUDA runtime calls the engine check needs (allocate, copy, a stream), through ctypes.

    Why not torch or cuda-python: the prepare image's torch is the CPU wheel (docker/Dockerfile: it only
    exports ONNX), and cuda-python is not installed there; libcudart is in every image that runs
    TensorRT, so the check needs no package beyond the tensorrt bindings.
    """

    def __init__(self) -> None:
        self.lib = self._load()
        c_void_p, c_size_t, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        signatures = {
            "cudaMalloc": [ctypes.POINTER(c_void_p), c_size_t],
            "cudaFree": [c_void_p],
            "cudaMemcpy": [c_void_p, c_void_p, c_size_t, c_int],
            "cudaStreamCreate": [ctypes.POINTER(c_void_p)],
            "cudaStreamSynchronize": [c_void_p],
            "cudaStreamDestroy": [c_void_p],
        }
        for name, argtypes in signatures.items():
            getattr(self.lib, name).argtypes = argtypes
            getattr(self.lib, name).restype = c_int
        self.lib.cudaGetErrorString.argtypes = [c_int]
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    @staticmethod
    def _load() -> ctypes.CDLL:
        candidates = list(CUDART_NAMES)
        with contextlib.suppress(ImportError):
            import nvidia.cuda_runtime  # the pip wheel's copy

            candidates += [
                str(p) for p in Path(next(iter(nvidia.cuda_runtime.__path__))).glob("lib/libcudart.so*")
            ]
        for name in candidates:
            with contextlib.suppress(OSError):
                return ctypes.CDLL(name)
        raise RuntimeError(f"no CUDA runtime library found (tried {', '.join(candidates)})")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"CUDA {what} failed: {self.lib.cudaGetErrorString(status).decode()}")

    def malloc(self, size: int) -> int:
        pointer = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(pointer), max(1, size)), f"cudaMalloc({size})")
        return int(pointer.value or 0)

    def free(self, pointer: int) -> None:
        self.check(self.lib.cudaFree(ctypes.c_void_p(pointer)), "cudaFree")

    def to_device(self, pointer: int, host: np.ndarray) -> None:
        data = ctypes.c_void_p(host.ctypes.data)
        self.check(
            self.lib.cudaMemcpy(ctypes.c_void_p(pointer), data, host.nbytes, _HOST_TO_DEVICE), "copy in"
        )

    def to_host(self, host: np.ndarray, pointer: int) -> None:
        data = ctypes.c_void_p(host.ctypes.data)
        self.check(
            self.lib.cudaMemcpy(data, ctypes.c_void_p(pointer), host.nbytes, _DEVICE_TO_HOST), "copy out"
        )

    def stream(self) -> int:
        handle = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(handle)), "cudaStreamCreate")
        return int(handle.value or 0)

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def destroy(self, stream: int) -> None:
        self.check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")


class TensorRTRunner:
    """A built engine on the GPU, for the engine-vs-ONNX check (`engine_check.EngineRunner`).

    One execution context, switched to each profile in turn, on a stream of its own; device buffers
    through `CudaRuntime`. The copies (`cudaMemcpy`, on the legacy default stream) are ordered with the
    engine's blocking stream. Use as a context manager: leaving it frees the engine and its stream.
    """

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt

        self.cuda = CudaRuntime()
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {engine_path}; see its log above")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.synchronize(self.stream)
        del self.context, self.engine, self._runtime
        self.cuda.destroy(self.stream)

    def profile_count(self) -> int:
        return int(self.engine.num_optimization_profiles)

    def activation_bytes(self, profile: int) -> int:
        """TensorRT's figure for one context on `profile` (the V2 call from 10.1, the first before)."""
        if hasattr(self.engine, "get_device_memory_size_for_profile_v2"):
            return int(self.engine.get_device_memory_size_for_profile_v2(profile))
        return int(self.engine.get_device_memory_size_for_profile(profile))

    def run(self, profile: int, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.context.set_optimization_profile_async(profile, self.stream):
            raise RuntimeError(f"TensorRT refused optimisation profile {profile}")
        self.cuda.synchronize(self.stream)
        buffers: dict[str, int] = {}
        try:
            for name in self.inputs:
                host = np.ascontiguousarray(inputs[name], dtype=self._numpy_dtype(name))
                if not self.context.set_input_shape(name, tuple(host.shape)):
                    raise RuntimeError(f"profile {profile} does not take {name} of shape {list(host.shape)}")
                buffers[name] = self.cuda.malloc(host.nbytes)
                self.cuda.to_device(buffers[name], host)
            results = {}
            for name in self.outputs:
                results[name] = np.empty(tuple(self.context.get_tensor_shape(name)), self._numpy_dtype(name))
                buffers[name] = self.cuda.malloc(results[name].nbytes)
            for name, pointer in buffers.items():
                if not self.context.set_tensor_address(name, pointer):
                    raise RuntimeError(f"TensorRT refused the buffer of {name}")
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError(f"TensorRT failed to run profile {profile}; see its log above")
            self.cuda.synchronize(self.stream)
            for name, host in results.items():
                self.cuda.to_host(host, buffers[name])
            return results
        finally:
            for pointer in buffers.values():
                self.cuda.free(pointer)

    def _numpy_dtype(self, name: str) -> np.dtype:
        trt_name = str(self.engine.get_tensor_dtype(name)).rsplit(".", 1)[-1]
        by_trt = {d.tensorrt: d.name for d in DTYPES.values() if d.tensorrt}
        return np.dtype(by_trt[trt_name])


# --------------------------------------------------------------------------------------------------
# A whole bundle


class EngineCheckError(RuntimeError):
    """Some engines differ from their ONNX beyond the tolerance: they are recorded, and must not be served."""

    def __init__(self, results: Sequence[EngineResult]) -> None:
        self.results = list(results)
        lines = [f"{r.component}: {worst_output(r.metadata.get('check') or {})}" for r in self.results]
        names = " ".join(r.component for r in self.results)
        super().__init__(
            "engine-vs-ONNX check failed (the repository generator refuses these engines):\n  "
            + "\n  ".join(lines)
            + f"\nbuild them from the FP32 ONNX (`kandinsky-export engines --components {names} --precision "
            "fp32`), or rebuild with --force after changing what made them differ"
        )


@dataclass
class EngineResult:
    component: str
    action: str  # "built" or "up to date"
    reason: str | None
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def check_passed(self) -> bool:
        return bool((self.metadata.get("check") or {}).get("passed"))

    def line(self) -> str:
        source = self.metadata.get("source", {})
        why = f" ({self.reason})" if self.reason and self.action == "built" else ""
        check = self.metadata.get("check")
        verdict = "check ok" if self.check_passed else f"check FAILED: {worst_output(check or {})}"
        held = ""
        if self.metadata.get("activation_bytes"):
            memory = instance_activation_memory(self.metadata["activation_bytes"])
            count = len(memory["per_profile_bytes"])
            held = f"; activations {memory['per_instance_bytes'] / 2**30:.2f} GiB per instance"
            if count > 1:
                held += (
                    f" ({count} profiles; {memory['on_profile_change_bytes'] / 2**30:.2f} GiB where Triton "
                    "allocates per profile)"
                )
        return (
            f"{self.component:>14s}: {self.action}{why} [{source.get('precision')} from {source.get('path')}] "
            f"{self.seconds:.1f}s; {verdict}{held}"
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
    digest = digest or layout.onnx_digest
    bundle = Path(bundle)
    manifest = layout.read_manifest(bundle)
    dims = ModelDims.from_dict(manifest["dims"])
    wanted = list(components or manifest["components"])
    plans = []
    for component in wanted:
        entry = manifest["components"][component]
        source, engine_precision, flags = choose_source(entry, precision)
        expected = engine_metadata(
            component,
            tensorrt_version=trt_version,
            gpu=gpu,
            source_path=source,
            source_sha256=digest(bundle / component / source),
            precision=engine_precision,
            build={**flags, "builder_optimization_level": options.builder_optimization_level},
            profiles=sidecar_profiles(component, dims, settings),
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
    open_engine: Callable[[Path], EngineRunner] | None = None,
    tolerance: float = ENGINE_TOLERANCE,
) -> list[EngineResult]:
    """Build (or keep) one engine per component; rebuilds those whose sidecar no longer matches.

    Every engine built is checked against its FP32 ONNX (`engine_check`) through `open_engine` (default:
    `TensorRTRunner`), which also reports each profile's activation memory. Raises EngineCheckError,
    after recording every sidecar, when any engine's check failed (now, or when it was built).
    """
    bundle = Path(bundle)
    settings = settings or ProfileSettings()
    options = options or BuildOptions()
    open_engine = open_engine or TensorRTRunner
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
    check_inputs = RecordedInputs(bundle, settings.optimum())
    results = []
    for component, expected, reason in tqdm(plans, desc="TensorRT engines", unit="engine"):
        if reason is None and not force:
            recorded = read_engine_metadata(bundle / component) or dict(expected)
            point_manifest_at_engine(bundle, component, recorded)
            results.append(EngineResult(component, "up to date", None, 0.0, recorded))
            logger.info("%s", results[-1].line())
            continue
        start = time.monotonic()
        engine_dir = bundle / component / ENGINE_DIR
        (engine_dir / METADATA_FILE).unlink(missing_ok=True)  # never an old sidecar beside a new engine
        logger.info("building %s engine: %s", component, "forced" if reason is None else reason)
        profiles = expected["profile"]["profiles"]
        io = build_engine(
            bundle / component / expected["source"]["path"],
            engine_dir / ENGINE_FILE,
            [p["inputs"] for p in profiles],
            strongly_typed=expected["build"]["strongly_typed"],
            fp16_flag=expected["build"]["fp16_flag"],
            options=options,
        )
        with open_engine(engine_dir / ENGINE_FILE) as engine:
            if engine.profile_count() != len(profiles):
                raise RuntimeError(
                    f"{component}: the engine has {engine.profile_count()} profiles, {len(profiles)} were built"
                )
            activation = [engine.activation_bytes(i) for i in range(len(profiles))]
            check = check_engine(bundle, component, profiles, engine, check_inputs, tolerance)
        seconds = time.monotonic() - start
        metadata = {
            **expected,
            "io_dtypes": io,
            "activation_bytes": activation,
            "check": check,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(seconds, 1),
        }
        record_engine(bundle, component, metadata)
        results.append(EngineResult(component, "built", reason or "forced", seconds, metadata))
        logger.info("%s", results[-1].line())
    failed = [r for r in results if not r.check_passed]
    if failed:
        raise EngineCheckError(failed)
    return results
