"""The `tensorrt` GPU flavour: Triton's tensorrt_plan backend on the engines `kandinsky-export engines` built.

The batch limit, the static shapes of a static engine and the I/O types are checked against the engine's
sidecar, and an engine whose engine-vs-ONNX check failed (or is missing) is refused. Engines whose only
dynamic axis is the batch (static sizes, and the models without image axes) get CUDA graphs for every
batch the traffic has (`add_cuda_graphs`).

Profiles. An engine with several optimisation profiles (one per optimum size: 512, 768, 1024 px by
default) has them all listed in `instance_group { profile: [...] }`: Triton's TensorRT backend then
creates one execution context per listed profile and runs each request on the one whose optimum is
nearest its shapes (`GetMostOptimizedProfile` in the backend's instance_state.cc); unlisted, only
profile 0 would run. Each context holds its own activation memory: `execution_context_allocation_strategy:
ON_PROFILE_CHANGE` asks backends that read it (from April 2025) to allocate each context its own
profile's, and the `tensorrt_activation_memory` parameter gives what one instance holds at most
(`profiles.instance_activation_memory`), for a memory budget to read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kandinsky_core.bundle import ENGINE_FILE
from kandinsky_core.components import DTYPES, ComponentSpec, ModelDims, TensorSpec
from kandinsky_core.profiles import (
    SPATIAL_SYMBOLS,
    ProfileSettings,
    instance_activation_memory,
    is_spatially_static,
)
from tritonclient.grpc import model_config_pb2 as mc

from .configs import RepositoryOptions, place_file, set_parameters

# Triton's TensorRT backend parameter (tensorrt_backend PR #108); earlier backends ignore it.
ALLOCATION_PARAMETER = "execution_context_allocation_strategy"
ALLOCATION_PER_PROFILE = "ON_PROFILE_CHANGE"
ACTIVATION_MEMORY_PARAMETER = "tensorrt_activation_memory"


def configure_tensorrt(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    component_dir: Path,
    entry: Mapping[str, Any],
    version_dir: Path,
    options: RepositoryOptions,
) -> tuple[list[dict[str, list[int]]], ProfileSettings]:
    """Serve the component's engine; returns the warm-up shape sets (one per profile) and its settings."""
    record = entry.get("tensorrt")
    engine = component_dir / record["engine"] if record else None
    if engine is None or not engine.is_file():
        raise FileNotFoundError(
            f"{spec.name}: no TensorRT engine in the bundle ({component_dir}); build engines on the serving GPU "
            "with `kandinsky-export engines --bundle <bundle>`"
        )
    metadata = json.loads((component_dir / record["metadata"]).read_text())
    check_engine(spec, metadata)
    profiles = [p["inputs"] for p in metadata["profile"]["profiles"]]
    config.platform = "tensorrt_plan"
    config.default_model_filename = ENGINE_FILE
    place_file(engine, version_dir / ENGINE_FILE)

    warmups = serve_profiles(config, spec, dims, profiles, options)
    memory = instance_activation_memory(metadata["activation_bytes"])
    parameters: dict[str, object] = {
        "precision": metadata["source"]["precision"],
        "tensorrt_profile": metadata["profile"]["settings"],
        "tensorrt_version": metadata["tensorrt_version"],
        ACTIVATION_MEMORY_PARAMETER: memory,
    }
    if len(profiles) > 1:
        parameters[ALLOCATION_PARAMETER] = ALLOCATION_PER_PROFILE
    set_parameters(config, parameters)
    return warmups, ProfileSettings.from_dict(metadata["profile"]["settings"])


def serve_profiles(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    profiles: Sequence[Mapping[str, Mapping[str, Sequence[int]]]],
    options: RepositoryOptions,
) -> list[dict[str, list[int]]]:
    """What an engine's profiles decide in its Triton config; returns the warm-up shape sets.

    Every profile listed in the instance groups; a single static profile fixes the spatial dims and gets
    CUDA graphs. One warm-up per profile, at its optimum: Triton runs each on that profile's context
    (distance 0), so no context meets its first request cold (CUDA loads kernels lazily, on first use).
    Shared with the timed flavour, which serves the profiles `kandinsky-export engines` would build.
    """
    names = [str(index) for index in range(len(profiles))]
    for group in config.instance_group:
        del group.profile[:]
        group.profile.extend(names)
    single = profiles[0] if len(profiles) == 1 else None
    static = _static_symbols(spec, dims, single) if single else {}
    if static:
        _fix_dims(config.input, spec.inputs, static)
        _fix_dims(config.output, spec.outputs, static)
    if options.cuda_graphs and single and is_spatially_static(single):
        add_cuda_graphs(config, spec, single)
    return [{name: list(shapes["opt"]) for name, shapes in profile.items()} for profile in profiles]


def add_cuda_graphs(
    config: mc.ModelConfig, spec: ComponentSpec, profile: Mapping[str, Mapping[str, Sequence[int]]]
) -> None:
    """CUDA graphs for every batch the traffic has (`spec.batch_sizes()`), and preferred batch sizes to match.

    Only for engines whose one dynamic axis is the batch (a static-size engine, or a model without image
    axes: text encoder, image encoder, prior). Without `graph_spec`, Triton r25.01's TensorRT backend
    captures batch 1, the preferred batch sizes and max_batch_size at the profile's optimum, and runs a
    graph only on an exact match: guidance sends the UNet 2, 4, 6, 8 rows and the prior 2 .. 16. Each spec
    gives every input's per-item shape (the engine's, static); the batch is prepended by the backend.
    The dynamic batcher's preferred sizes are the same list, so the batches it forms have a graph.
    """
    config.optimization.cuda.graphs = True
    for batch in spec.batch_sizes():
        graph = config.optimization.cuda.graph_spec.add(batch_size=batch)
        for tensor in spec.inputs:
            graph.input[tensor.name].dim.extend(list(profile[tensor.name]["opt"][1:]))
    if config.HasField("dynamic_batching"):
        del config.dynamic_batching.preferred_batch_size[:]
        config.dynamic_batching.preferred_batch_size.extend(spec.batch_sizes())


def check_engine(spec: ComponentSpec, metadata: Mapping[str, Any]) -> None:
    """The engine must serve the registry's contract (inputs, batch limit, I/O types) and have passed
    its engine-vs-ONNX check; a sidecar from before several profiles is refused (rebuild)."""
    rebuild = f"rebuild it with `kandinsky-export engines --components {spec.name}`"
    if "profiles" not in metadata.get("profile", {}) or "activation_bytes" not in metadata:
        raise ValueError(
            f"{spec.name}: the engine was built by an older kandinsky-export (one profile, no activation "
            f"memory or engine-vs-ONNX check in its sidecar): {rebuild}"
        )
    expected = {t.name for t in spec.inputs}
    for index, entry in enumerate(metadata["profile"]["profiles"]):
        if set(entry["inputs"]) != expected:
            raise ValueError(
                f"{spec.name}: engine profile {index} inputs {sorted(entry['inputs'])} != registry inputs "
                f"{sorted(expected)}"
            )
    if metadata["profile"]["max_batch_size"] != spec.max_batch_size:
        raise ValueError(
            f"{spec.name}: engine built for batch {metadata['profile']['max_batch_size']}, the registry (and the "
            f"ensembles) need {spec.max_batch_size}: rebuild with `kandinsky-export engines`"
        )
    if len(metadata["activation_bytes"]) != len(metadata["profile"]["profiles"]):
        raise ValueError(
            f"{spec.name}: the sidecar's activation memory does not cover every profile: {rebuild}"
        )
    io_dtypes = metadata.get("io_dtypes", {})
    for tensor in (*spec.inputs, *spec.outputs):
        got = io_dtypes.get(tensor.name)
        if got is not None and got != DTYPES[tensor.dtype].tensorrt:
            raise ValueError(
                f"{spec.name}: engine tensor '{tensor.name}' is {got}, the registry says {tensor.dtype} "
                "(TensorRT before 10 turns INT64 inputs into INT32: build with TensorRT 10 or later)"
            )
    check = metadata.get("check")
    if not check:
        raise ValueError(f"{spec.name}: the engine has no engine-vs-ONNX check in its sidecar: {rebuild}")
    if not check.get("passed"):
        failing = [
            f"{o['output']} on profile {p['profile']}: "
            + ("NaN/Inf" if not o["finite"] else f"max rel error {o['max_rel_error']:.3e}")
            for p in check.get("profiles", [])
            for o in p["outputs"]
            if not o["passed"]
        ]
        raise ValueError(
            f"{spec.name}: the engine failed its engine-vs-ONNX check ({'; '.join(failing) or 'nothing compared'}"
            f", tolerance {check.get('tolerance')}): it is not served. Build it from the FP32 ONNX "
            f"(`kandinsky-export engines --components {spec.name} --precision fp32`)"
        )


def _static_symbols(
    spec: ComponentSpec, dims: ModelDims, profile: Mapping[str, Mapping[str, Sequence[int]]]
) -> dict[str, int]:
    """Spatial symbols fixed by a static engine ({} when any spatial axis is dynamic or absent)."""
    fixed: dict[str, int] = {}
    for tensor in spec.inputs:
        shapes = profile[tensor.name]
        for axis, symbol in enumerate(tensor.shape):
            if symbol in SPATIAL_SYMBOLS:
                if shapes["min"][axis] != shapes["max"][axis]:
                    return {}
                fixed[str(symbol)] = int(shapes["min"][axis])
    scale = dims.movq_scale_factor
    for pixels, latent in (("height", "latent_height"), ("width", "latent_width")):
        if latent in fixed:
            fixed.setdefault(pixels, fixed[latent] * scale)
        if pixels in fixed:
            fixed.setdefault(latent, fixed[pixels] // scale)
    return fixed


def _fix_dims(messages: Sequence[Any], tensors: Sequence[TensorSpec], static: Mapping[str, int]) -> None:
    """Replace the -1 of each spatial axis by the static engine's size."""
    for message, tensor in zip(messages, tensors, strict=True):
        per_item = tensor.shape[1:]
        if not any(isinstance(d, str) and d in static for d in per_item):
            continue
        fixed = [
            static.get(d, old) if isinstance(d, str) else old
            for d, old in zip(per_item, message.dims, strict=True)
        ]
        del message.dims[:]
        message.dims.extend(fixed)
