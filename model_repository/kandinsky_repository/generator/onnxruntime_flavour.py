"""The `onnxruntime` GPU flavour: Triton's onnxruntime backend on the CUDA execution provider.

The ONNX file of the chosen precision (the bundle's measured default per component, `--precision` to
force one): on the CUDA provider, FP16 is the CUDA-fused variant where the bundle has one that passed its
check (`kandinsky-export fp16 --fusions cuda`: GroupNorm, SkipGroupNorm, NhwcConv... kernels), else the
portable one. Optionally ONNX Runtime's TensorRT execution accelerator, which takes the portable variant
(TensorRT parses standard ONNX operators only), with the engine profile from the registry and an engine
cache outside the regenerated repository, built once by `kandinsky-serve --build-ort-trt-cache`
(`ort_trt_cache.py`) in the prepare step.

cuDNN's convolution algorithms are chosen by heuristic, not by exhaustive search, and every network model
is warmed up at the shapes the traffic sends (`warmup_shapes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kandinsky_core.bundle import FP16_CUDA_DIR, FP16_DIR, ONNX_FILE
from kandinsky_core.components import ComponentSpec, ModelDims
from kandinsky_core.profiles import (
    ProfileSettings,
    engine_profile,
    has_spatial_axes,
    input_shapes,
    profile_shapes_option,
)
from tritonclient.grpc import model_config_pb2 as mc

from .configs import RepositoryOptions, place_file, set_parameters

logger = logging.getLogger(__name__)

_ORT_TRT_WORKSPACE = 8 * 2**30

# Triton's onnxruntime backend (r25.01, src/onnxruntime.cc) reads the model parameter
# `cudnn_conv_algo_search` as an integer and defaults to EXHAUSTIVE whenever a config has parameters
# (every generated one has).
CUDNN_CONV_ALGO_SEARCH = {"EXHAUSTIVE": 0, "HEURISTIC": 1, "DEFAULT": 2}
# EXHAUSTIVE benchmarks every algorithm (cudnnFindConvolutionForwardAlgorithmEx) the first time each
# convolution sees a new input shape: every new image size or batch that the dynamic batcher forms pays
# that search inside a live request. HEURISTIC asks cuDNN's heuristics (no benchmarking); the algorithm
# may be slower than the measured best, which a GPU benchmark has yet to quantify (docs/gpu.md).
CONV_ALGO_SEARCH = "HEURISTIC"

# The config parameter recording which bundle file is served (e.g. "fp16_cuda/model.onnx").
ONNX_SOURCE_PARAMETER = "onnx_source"


def ort_trt_cache_dir(repository: Path, options: RepositoryOptions) -> Path:
    """ONNX Runtime's TensorRT engine cache: outside the repository, which is regenerated on every start."""
    if options.ort_trt_cache_dir:
        return Path(options.ort_trt_cache_dir)
    repository = Path(repository).resolve()
    return repository.with_name(f"{repository.name}.ort_trt_cache")


def select_variant(
    entry: Mapping[str, Any], precision: str, *, cuda_fusions: bool = False
) -> tuple[str, list[str]]:
    """(precision, files relative to the component folder) of the ONNX variant to serve.

    `default` is the bundle's measured choice (`default_precision`, the portable FP16 variant's verdict).
    FP16 is the portable variant (`variants.fp16`), or with `cuda_fusions` (the CUDA provider without
    TensorRT) the CUDA-fused one (`variants.fp16_cuda`) where it passed its own check.
    """
    if precision == "default":
        precision = entry.get("default_precision", "fp32")
    if precision == "fp32":
        return "fp32", list(entry["files"])
    variants = entry.get("variants", {})
    fused = variants.get(FP16_CUDA_DIR) if cuda_fusions else None
    if fused is not None:
        if fused.get("passed", False):
            return precision, list(fused["files"])
        logger.warning("the CUDA-fused FP16 variant failed its error check; trying the portable one")
    variant = variants.get(FP16_DIR if precision == "fp16" else precision)
    if variant is None:
        raise FileNotFoundError(
            f"no {precision} variant in the bundle: run `kandinsky-export {precision}` first"
        )
    if not variant.get("passed", False):
        raise ValueError(
            f"the {precision} variant failed its error check; serve fp32 (or --precision default)"
        )
    return precision, list(variant["files"])


def warmup_shapes(
    spec: ComponentSpec, dims: ModelDims, settings: ProfileSettings
) -> list[dict[str, list[int]]]:
    """The input shapes the traffic sends, one warm-up request each (batch first).

    Image sides: the profile optima (`ProfileSettings.profile_optima`: the client's default side, 768 px
    and the largest side, the same sides the TensorRT engines are tuned for); one side for models without
    image axes. Batches: one image's rows (`rows_per_image`: what one generation sends at a time), and for
    the per-step models also the largest step the dynamic batcher forms from concurrent generations
    (`max_batch_size`). That is 6 requests for a UNet, 3 for a MoVQ model, 2 for the prior and 1 for the
    encoders: every shape whose first run would otherwise pay memory-arena growth, cuDNN plan selection
    or (with the TensorRT accelerator) engine set-up inside a request, for seconds more of load. The
    largest step at the largest side runs at load, so a GPU too small for it fails there, not under
    load; batches in between fit in what those allocated.
    """
    if settings.static_size:
        sides = [settings.static_size]
    elif has_spatial_axes(spec):
        sides = [(side, side) for side in settings.profile_optima()]
    else:
        sides = [settings.optimum()]
    batches = sorted(
        {spec.rows_per_image, spec.max_batch_size} if spec.called_per_step else {spec.rows_per_image}
    )
    return [input_shapes(spec, dims, batch, height, width) for height, width in sides for batch in batches]


def configure_onnxruntime(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    component_dir: Path,
    entry: Mapping[str, Any],
    version_dir: Path,
    options: RepositoryOptions,
) -> tuple[list[dict[str, list[int]]], ProfileSettings | None]:
    """The onnxruntime backend section of one network model and its ONNX file.

    Returns the warm-up shape sets (`warmup_shapes`) and the profile settings when the TensorRT
    accelerator narrows the sizes served (None: the CUDA provider takes every size).
    """
    precision, files = select_variant(entry, options.precision, cuda_fusions=not options.ort_tensorrt)
    config.backend = "onnxruntime"
    config.default_model_filename = ONNX_FILE
    for relative in files:  # model.onnx (+ model.onnx_data), whichever folder the variant lives in
        place_file(component_dir / relative, version_dir / Path(relative).name)
    set_parameters(
        config,
        {
            "precision": precision,
            ONNX_SOURCE_PARAMETER: files[0],
            "cudnn_conv_algo_search": str(CUDNN_CONV_ALGO_SEARCH[CONV_ALGO_SEARCH]),
        },
    )
    settings = ProfileSettings.for_max_size(options.max_image_size)
    if options.ort_tensorrt:
        profile = engine_profile(spec, dims, settings)
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        root = ort_trt_cache_dir(version_dir.parent.parent, options)
        # ONNX Runtime creates the model's own folder, but not its parents (std::filesystem::create_directory)
        root.mkdir(parents=True, exist_ok=True)
        cache = str(root / spec.name)
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
    # Without the accelerator the CUDA provider takes any size; the profile's sides still give the warm-up.
    return warmup_shapes(spec, dims, settings), settings if options.ort_tensorrt else None
