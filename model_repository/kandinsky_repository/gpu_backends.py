"""GPU flavours of the network models: Triton's `onnxruntime` and `tensorrt_plan` backends.

Only the backend section differs from the CPU flavour: inputs, outputs and batch limits come from the
same registry, and the pre/post-processing (python) models and the ensembles are shared. What each
GPU flavour adds:

- `onnxruntime`: the ONNX file of the chosen precision (the bundle's measured default per component,
  `--precision` to force one) on the CUDA execution provider; optionally ONNX Runtime's TensorRT
  execution accelerator, with the engine profile from the registry and an engine cache.
- `tensorrt`: the engine built by `kandinsky-export engines`; the batch limit, the static shapes of a
  static engine and the I/O types are checked against its sidecar. Static engines get CUDA graphs.
- both: GPU instance groups, dynamic batching for the per-step models (prior, UNets), and a warm-up
  request per model with the registry's input shapes, so the first client does not pay for CUDA
  context set-up, cuDNN autotuning or engine deserialisation.

The python models (tokenizer, pre/post-processing) import `kandinsky_repository`: the Triton image must
have this package installed (see docker/Dockerfile).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kandinsky_client.components import ComponentSpec, ModelDims, TensorSpec
from tritonclient.grpc import model_config_pb2 as mc

if TYPE_CHECKING:
    from .generate import RepositoryOptions

ENGINE_FILE = "model.plan"
ONNX_FILE = "model.onnx"
# TensorRT's names for the registry's dtypes, to check an engine's I/O against the config.
_TENSORRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}
_WARMUP_SIZE = 768  # image side of the warm-up request when no engine profile says otherwise
_ORT_TRT_WORKSPACE = 8 * 2**30


def configure_gpu_component(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    component_dir: Path,
    entry: Mapping[str, Any],
    version_dir: Path,
    options: RepositoryOptions,
) -> None:
    """Turn the registry's config of one network into its GPU flavour and place its model file."""
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=options.instances)
    if spec.called_per_step:
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    if options.flavour == "onnxruntime":
        shapes = _onnxruntime(config, spec, dims, Path(component_dir), entry, version_dir, options)
    elif options.flavour == "tensorrt":
        shapes = _tensorrt(config, spec, dims, Path(component_dir), entry, version_dir, options)
    else:
        raise ValueError(f"not a GPU flavour: {options.flavour}")
    if options.warmup:
        add_warmup(config, spec, shapes)


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
) -> dict[str, list[int]]:
    from kandinsky_export.tensorrt_engine import engine_profile, profile_shapes_option

    from .generate import place_file, set_parameters

    precision, files = select_variant(entry, options.precision)
    config.backend = "onnxruntime"
    config.default_model_filename = ONNX_FILE
    for relative in files:  # model.onnx (+ model.onnx_data), whichever folder the variant lives in
        place_file(component_dir / relative, version_dir / Path(relative).name)
    set_parameters(config, {"precision": precision})
    profile = engine_profile(spec, dims, _default_profile_settings(options))
    if options.ort_tensorrt:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        cache = options.ort_trt_cache_dir or str((version_dir.parent / "trt_cache").resolve())
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
    return {name: shapes["opt"] for name, shapes in profile.items()}


def _default_profile_settings(options: RepositoryOptions) -> Any:
    """Engine-profile settings for the onnxruntime flavour: up to the repository's largest image."""
    from kandinsky_export.tensorrt_engine import ProfileSettings

    defaults = ProfileSettings()
    largest = options.max_image_size
    return ProfileSettings(
        min_size=min(defaults.min_size, largest),
        opt_size=min(_WARMUP_SIZE, largest),
        max_size=largest,
        size_step=defaults.size_step,
    )


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
) -> dict[str, list[int]]:
    from .generate import place_file, set_parameters

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
        config.optimization.cuda.graphs = options.cuda_graphs
    set_parameters(
        config,
        {
            "precision": metadata["source"]["precision"],
            "tensorrt_profile": metadata["profile"]["settings"],
            "tensorrt_version": metadata["tensorrt_version"],
        },
    )
    return {name: list(shapes["opt"]) for name, shapes in profile.items()}


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
        if got is not None and got != _TENSORRT_DTYPES[tensor.dtype]:
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
            if symbol in ("height", "width", "latent_height", "latent_width"):
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
    from .generate import dtype_enum

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
