"""The `onnxruntime` GPU flavour: Triton's onnxruntime backend on the CUDA execution provider.

The ONNX file of the chosen precision (the bundle's measured default per component, `--precision` to
force one); optionally ONNX Runtime's TensorRT execution accelerator, with the engine profile from the
registry and an engine cache outside the regenerated repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kandinsky_client.components import ComponentSpec, ModelDims
from kandinsky_client.profiles import ProfileSettings, engine_profile, profile_shapes_option
from kandinsky_export.bundle import ONNX_FILE
from tritonclient.grpc import model_config_pb2 as mc

from .configs import RepositoryOptions, place_file, set_parameters

_ORT_TRT_WORKSPACE = 8 * 2**30


def ort_trt_cache_dir(repository: Path, options: RepositoryOptions) -> Path:
    """ONNX Runtime's TensorRT engine cache: outside the repository, which is regenerated on every start."""
    if options.ort_trt_cache_dir:
        return Path(options.ort_trt_cache_dir)
    repository = Path(repository).resolve()
    return repository.with_name(f"{repository.name}.ort_trt_cache")


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


def configure_onnxruntime(
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
