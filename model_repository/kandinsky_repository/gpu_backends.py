"""GPU flavours of the network models: Triton's `onnxruntime` and `tensorrt_plan` backends.

Only the backend section differs from the CPU flavour: inputs, outputs and batch limits come from the
same registry, and the pre/post-processing (python) models and the ensembles are shared. What each
GPU flavour adds:

- `onnxruntime`: the ONNX file of the chosen precision (the bundle's measured default per component,
  `--precision` to force one) on the CUDA execution provider; optionally ONNX Runtime's TensorRT
  execution accelerator, with the engine profile from the registry and an engine cache.
- `tensorrt`: the engine built by `kandinsky-export engines`; the batch limit, the static shapes of a
  static engine and the I/O types are checked against its sidecar. Engines whose only dynamic axis is
  the batch (static sizes, and the models without image axes) get CUDA graphs for every batch the
  traffic has (`add_cuda_graphs`).
- both: GPU instance groups, dynamic batching for the per-step models (prior, UNets), a warm-up request
  per model at the profile's optimum (one image's rows), so the first client does not pay for CUDA
  context set-up, cuDNN autotuning or engine deserialisation; and the image sizes each model accepts,
  which the generator turns into the flavour-neutral `image_sizes` parameter the client reads.

The python models (tokenizer, pre/post-processing) import `kandinsky_repository`: the Triton image must
have this package installed (see docker/Dockerfile).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kandinsky_client.components import DTYPES, ComponentSpec, ModelDims, TensorSpec
from kandinsky_client.profiles import (
    SPATIAL_SYMBOLS,
    ProfileSettings,
    engine_profile,
    has_spatial_axes,
    image_size_limits,
    is_spatially_static,
    profile_shapes_option,
)
from kandinsky_export.bundle import ENGINE_FILE, ONNX_FILE
from tritonclient.grpc import model_config_pb2 as mc

from .configs import RepositoryOptions, dtype_enum, place_file, set_parameters

# Dynamic batching window of the per-step models on a GPU (microseconds): long enough for concurrent
# generations' steps to meet, short against a UNet step (tens of milliseconds).
GPU_MAX_QUEUE_DELAY_US = 2000
_ORT_TRT_WORKSPACE = 8 * 2**30


def ort_trt_cache_dir(repository: Path, options: RepositoryOptions) -> Path:
    """ONNX Runtime's TensorRT engine cache: outside the repository, which is regenerated on every start."""
    if options.ort_trt_cache_dir:
        return Path(options.ort_trt_cache_dir)
    repository = Path(repository).resolve()
    return repository.with_name(f"{repository.name}.ort_trt_cache")


def configure_gpu_component(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    component_dir: Path,
    entry: Mapping[str, Any],
    version_dir: Path,
    options: RepositoryOptions,
) -> dict | None:
    """Turn the registry's config of one network into its GPU flavour and place its model file.

    Returns the image sizes this model accepts (`profiles.image_size_limits`), or None when it takes
    every size up to the repository's maximum.
    """
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=options.instances)
    if spec.called_per_step:
        delay = GPU_MAX_QUEUE_DELAY_US if options.max_queue_delay_us is None else options.max_queue_delay_us
        config.dynamic_batching.max_queue_delay_microseconds = delay
    if options.flavour == "onnxruntime":
        shapes, settings = _onnxruntime(config, spec, dims, Path(component_dir), entry, version_dir, options)
    elif options.flavour == "tensorrt":
        shapes, settings = _tensorrt(config, spec, dims, Path(component_dir), entry, version_dir, options)
    else:
        raise ValueError(f"not a GPU flavour: {options.flavour}")
    if options.warmup:
        add_warmup(config, spec, shapes)
    if settings is None or not has_spatial_axes(spec):
        return None
    return image_size_limits(dims.size_multiple, options.max_image_size, settings)


# --------------------------------------------------------------------------------------------------
# ONNX Runtime


def select_variant(entry: Mapping[str, Any], precision: str) -> tuple[str, list[str]]:
    """(precision, files relative to the component folder) of the ONNX variant to serve."""
    if precision == "default":
        precision = entry.get("default_precision", "fp32")
    if precision == "fp32":
        return "fp32", list(entry["files"])
    variant = entry.get("variants", {}).get(precision)
    if variant is None:
        raise FileNotFoundError(
            f"no {precision} variant in the bundle: run `kandinsky-export {precision}` first"
        )
    if not variant.get("passed", False):
        raise ValueError(
            f"the {precision} variant failed its error check; serve fp32 (or --precision default)"
        )
    return precision, list(variant["files"])


def _onnxruntime(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    component_dir: Path,
    entry: Mapping[str, Any],
    version_dir: Path,
    options: RepositoryOptions,
) -> tuple[dict[str, list[int]], ProfileSettings | None]:
    precision, files = select_variant(entry, options.precision)
    config.backend = "onnxruntime"
    config.default_model_filename = ONNX_FILE
    for relative in files:  # model.onnx (+ model.onnx_data), whichever folder the variant lives in
        place_file(component_dir / relative, version_dir / Path(relative).name)
    set_parameters(config, {"precision": precision})
    settings = ProfileSettings.for_max_size(options.max_image_size)
    profile = engine_profile(spec, dims, settings)
    if options.ort_tensorrt:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        cache = str(ort_trt_cache_dir(version_dir.parent.parent, options) / spec.name)
        parameters = {
            "precision_mode": "FP16" if precision == "fp16" else "FP32",
            "max_workspace_size_bytes": str(_ORT_TRT_WORKSPACE),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": cache,
            "trt_profile_min_shapes": profile_shapes_option(profile, "min"),
            "trt_profile_opt_shapes": profile_shapes_option(profile, "opt"),
            "trt_profile_max_shapes": profile_shapes_option(profile, "max"),
        }
        accelerator.parameters.update(parameters)
    # Without the accelerator the CUDA provider takes any size; the profile still gives the warm-up shapes.
    return {
        name: shapes["opt"] for name, shapes in profile.items()
    }, settings if options.ort_tensorrt else None


# --------------------------------------------------------------------------------------------------
# TensorRT


def _tensorrt(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    component_dir: Path,
    entry: Mapping[str, Any],
    version_dir: Path,
    options: RepositoryOptions,
) -> tuple[dict[str, list[int]], ProfileSettings]:
    record = entry.get("tensorrt")
    engine = component_dir / record["engine"] if record else None
    if engine is None or not engine.is_file():
        raise FileNotFoundError(
            f"{spec.name}: no TensorRT engine in the bundle ({component_dir}); build engines on the serving GPU "
            "with `kandinsky-export engines --bundle <bundle>`"
        )
    metadata = json.loads((component_dir / record["metadata"]).read_text())
    profile = metadata["profile"]["inputs"]
    check_engine(spec, metadata)
    config.platform = "tensorrt_plan"
    config.default_model_filename = ENGINE_FILE
    place_file(engine, version_dir / ENGINE_FILE)

    static = _static_symbols(spec, dims, profile)
    if static:
        _fix_dims(config.input, spec.inputs, static)
        _fix_dims(config.output, spec.outputs, static)
    if options.cuda_graphs and is_spatially_static(profile):
        add_cuda_graphs(config, spec, profile)
    set_parameters(
        config,
        {
            "precision": metadata["source"]["precision"],
            "tensorrt_profile": metadata["profile"]["settings"],
            "tensorrt_version": metadata["tensorrt_version"],
        },
    )
    settings = ProfileSettings.from_dict(metadata["profile"]["settings"])
    return {name: list(shapes["opt"]) for name, shapes in profile.items()}, settings


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
    """The engine must serve the registry's contract: same inputs, batch limit and I/O types."""
    profile = metadata["profile"]["inputs"]
    expected = {t.name for t in spec.inputs}
    if set(profile) != expected:
        raise ValueError(
            f"{spec.name}: engine inputs {sorted(profile)} != registry inputs {sorted(expected)}"
        )
    if metadata["profile"]["max_batch_size"] != spec.max_batch_size:
        raise ValueError(
            f"{spec.name}: engine built for batch {metadata['profile']['max_batch_size']}, the registry (and the "
            f"ensembles) need {spec.max_batch_size}: rebuild with `kandinsky-export engines`"
        )
    io_dtypes = metadata.get("io_dtypes", {})
    for tensor in (*spec.inputs, *spec.outputs):
        got = io_dtypes.get(tensor.name)
        if got is not None and got != DTYPES[tensor.dtype].tensorrt:
            raise ValueError(
                f"{spec.name}: engine tensor '{tensor.name}' is {got}, the registry says {tensor.dtype} "
                "(TensorRT before 10 turns INT64 inputs into INT32: build with TensorRT 10 or later)"
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


# --------------------------------------------------------------------------------------------------
# Warm-up


def add_warmup(config: mc.ModelConfig, spec: ComponentSpec, shapes: Mapping[str, Sequence[int]]) -> None:
    """One warm-up request at the profile's optimum shapes (batch included in `shapes`).

    Floats are random; integer and boolean inputs are zeros (token 0, timestep 0 and an all-false
    mask are valid, while random integers could index outside the vocabulary).
    """
    batch = int(next(iter(shapes.values()))[0])
    warmup = config.model_warmup.add(name=f"{spec.name}_warmup", batch_size=batch, count=1)
    by_name = {message.name: message for message in config.input}
    for tensor in spec.inputs:
        message = by_name[tensor.name]
        sample = warmup.inputs[tensor.name]
        sample.data_type = dtype_enum(tensor.dtype)
        per_item = list(shapes[tensor.name][1:])
        sample.dims.extend(per_item if per_item else list(message.dims))  # scalar per item: config's [1]
        if tensor.dtype.startswith("float"):
            sample.random_data = True
        else:
            sample.zero_data = True
