"""Writes a Triton model repository from an export bundle. Configs are generated, never hand-edited.

Every `config.pbtxt` is built as Triton's `ModelConfig` protobuf (the message definitions ship with
tritonclient) from the component registry and the checkpoint's dims, then written in text format.

Flavours, one generator:
- `cpu`: every network is a python-backend model running ONNX Runtime (the Triton server of the
  nvidia-pytriton wheel has only the python backend);
- `onnxruntime` and `tensorrt`: the GPU backends of the NGC Triton image (see `gpu_backends.py`).
Pre/post-processing models and ensembles are the same in every flavour.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from kandinsky_client.components import (
    COMPONENTS,
    MAX_IMAGES_PER_REQUEST,
    MAX_INPUT_IMAGE_SIDE,
    MAX_PROMPT_BYTES,
    SERVED_MODELS,
    ModelDims,
    ModelSpec,
    ServedModelSpec,
    TensorSpec,
)
from kandinsky_client.wire import MODEL_NAME
from tqdm.auto import tqdm
from tritonclient.grpc import model_config_pb2 as mc

from .generation_config import ENTRY_POINT as GENERATION_ENTRY_POINT
from .generation_config import generation_config
from .settings import DEFAULTS

logger = logging.getLogger(__name__)

FLAVOURS = ("cpu", "onnxruntime", "tensorrt")
DEFAULT_MAX_IMAGE_SIZE = 1024
MANIFEST = "manifest.json"

_DTYPES = {
    "float32": mc.TYPE_FP32,
    "float16": mc.TYPE_FP16,
    "int64": mc.TYPE_INT64,
    "int32": mc.TYPE_INT32,
    "bool": mc.TYPE_BOOL,
    "uint8": mc.TYPE_UINT8,
    "bytes": mc.TYPE_STRING,
}

# Python-backend models that are not exported networks: model name -> "module:class".
_PYTHON_MODELS = {
    "tokenizer": "tokenizer:TritonPythonModel",
    "prior_postprocess": "postprocess:PriorPostprocess",
    "postprocess_image": "postprocess:PostprocessImage",
    "preprocess_clip_image": "preprocess:PreprocessClipImage",
    "preprocess_movq_image": "preprocess:PreprocessMovqImage",
}
_ONNX_RUNNER = "onnx_runner:TritonPythonModel"


@dataclass(frozen=True)
class RepositoryOptions:
    flavour: str = "cpu"
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    instances: int = 1
    intra_op_threads: int = 0  # cpu flavour: ONNX Runtime threads per model (0: its default)
    max_queue_delay_us: int = 0  # dynamic batching window for the per-step models
    max_queue_size: int = DEFAULTS.max_queue_size  # requests waiting per model (see limit_queue)
    # GPU flavours (see gpu_backends.py):
    precision: str = "default"  # onnxruntime: ONNX variant served (default: the bundle's measured choice)
    ort_tensorrt: bool = False  # onnxruntime: add ONNX Runtime's TensorRT execution accelerator
    ort_trt_cache_dir: str = ""  # its engine cache ("": <repository>/<model>/trt_cache)
    warmup: bool = True  # one warm-up request per network model at load
    cuda_graphs: bool = True  # tensorrt: CUDA graphs for engines with static image sizes
    # The server-side generation model (`kandinsky`; see settings.py)
    max_concurrent_generations: int = DEFAULTS.max_concurrent_generations
    max_queued_generations: int = DEFAULTS.max_queued_generations
    max_generation_seconds: float = DEFAULTS.max_generation_seconds


def dtype_enum(dtype: str) -> int:
    return _DTYPES[dtype]


def _tensor(message_cls: type, spec: TensorSpec, dims: ModelDims) -> object:
    shape = spec.resolve(dims.as_symbols())[1:]  # Triton's dims exclude the batch axis
    if not shape:
        # A per-item scalar (the timestep): Triton needs one dim; the model sees [batch].
        return message_cls(
            name=spec.name,
            data_type=dtype_enum(spec.dtype),
            dims=[1],
            reshape=mc.ModelTensorReshape(shape=[]),
        )
    return message_cls(name=spec.name, data_type=dtype_enum(spec.dtype), dims=list(shape))


def base_config(spec: ModelSpec, dims: ModelDims) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    config.input.extend(_tensor(mc.ModelInput, t, dims) for t in spec.inputs)
    config.output.extend(_tensor(mc.ModelOutput, t, dims) for t in spec.outputs)
    return config


def set_parameters(config: mc.ModelConfig, parameters: dict[str, object]) -> None:
    for key, value in parameters.items():
        text = value if isinstance(value, str) else json.dumps(value)
        config.parameters[key].string_value = text


def python_backend(
    config: mc.ModelConfig, version_dir: Path, entry_point: str, options: RepositoryOptions
) -> None:
    """A python-backend model: CPU instances, and a model.py importing `entry_point` ("module:Class")."""
    config.backend = "python"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.instances)
    write_python_entry_point(version_dir, entry_point)


def ensemble_config(spec: ServedModelSpec, dims: ModelDims, models: dict[str, ModelSpec]) -> mc.ModelConfig:
    """Chain `spec.steps`, wiring tensors by name: each step reads ensemble inputs or earlier outputs."""
    config = base_config(spec, dims)
    config.platform = "ensemble"
    available = {t.name for t in spec.inputs}
    for step_name in spec.steps:
        step_spec = models[step_name]
        step = config.ensemble_scheduling.step.add(model_name=step_name, model_version=-1)
        for tensor in step_spec.inputs:
            if tensor.name not in available:
                raise ValueError(f"ensemble {spec.name}: step {step_name} needs '{tensor.name}'")
            step.input_map[tensor.name] = tensor.name
        for tensor in step_spec.outputs:
            step.output_map[tensor.name] = tensor.name
            available.add(tensor.name)
    missing = {t.name for t in spec.outputs} - available
    if missing:
        raise ValueError(f"ensemble {spec.name}: no step produces {sorted(missing)}")
    return config


def spatial_limits(spec: ModelSpec, dims: ModelDims, max_image_size: int) -> dict[str, list[int]]:
    """[multiple, max] for the last two axes of every image-like input, in that input's own units."""
    limits = {}
    for tensor in spec.inputs:
        if "latent_height" in tensor.shape:
            scale = dims.movq_scale_factor
            limits[tensor.name] = [dims.size_multiple // scale, max_image_size // scale]
        elif "height" in tensor.shape:
            limits[tensor.name] = [dims.size_multiple, max_image_size]
    return limits


def python_model_limits(name: str, options: RepositoryOptions) -> dict[str, object]:
    """Size limits of the pre/post-processing models, as config parameters (checked on declared shapes).

    Images for the MoVQ encoder and images out of the MoVQ decoder are at most the largest generation
    size (the client resizes to the generation size before sending); images for CLIP pre-processing at
    most MAX_INPUT_IMAGE_SIDE (the processor shrinks them to its crop anyway); prompts at most
    MAX_PROMPT_BYTES of UTF-8.
    """
    limits: dict[str, dict[str, object]] = {
        "preprocess_movq_image": {"max_image_size": str(options.max_image_size)},
        "postprocess_image": {"max_image_size": str(options.max_image_size)},
        "preprocess_clip_image": {"max_input_side": str(MAX_INPUT_IMAGE_SIDE)},
        "tokenizer": {"max_prompt_bytes": str(MAX_PROMPT_BYTES)},
    }
    return limits.get(name, {})


def limit_queue(config: mc.ModelConfig, options: RepositoryOptions) -> None:
    """A bounded queue with per-request timeouts for every model that queues requests itself.

    Every model with dynamic batching gets `default_queue_policy`: at most `options.max_queue_size`
    requests wait (more are refused at once with UNAVAILABLE, which clients may retry), and a request may
    carry its own timeout (`allow_timeout_override`; the client's per-request timeout) after which it is
    rejected while still queued instead of computed for nobody.

    Python-backend models without dynamic batching get it too, with no batching delay: Triton's default
    scheduler has neither a queue bound nor timeouts, and only the dynamic batcher drops requests that
    were cancelled while they waited (`BatchingModel` checks `is_cancelled()` for the ones it receives).
    Merged requests are computed as one batch, which these models already do for the requests Triton
    hands them together. Ensembles have no queue of their own (their steps queue in the models above).
    GPU backends without dynamic batching (the once-per-image networks) keep Triton's default scheduler.
    """
    if config.platform == "ensemble":
        return
    if config.backend == "python" and not config.HasField("dynamic_batching"):
        config.dynamic_batching.SetInParent()
    if config.HasField("dynamic_batching"):
        policy = config.dynamic_batching.default_queue_policy
        policy.max_queue_size = options.max_queue_size
        policy.allow_timeout_override = True
        policy.timeout_action = mc.ModelQueuePolicy.REJECT


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(
        "# Generated by kandinsky-repository; edit the generator, not this file.\n"
        + text_format.MessageToString(config)
    )


def write_python_entry_point(version_dir: Path, entry_point: str) -> None:
    module, cls = entry_point.split(":")
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.py").write_text(
        "# Generated by kandinsky-repository: the logic lives in the installed kandinsky_repository package.\n"
        f"from kandinsky_repository.python_models.{module} import {cls} as TritonPythonModel  # noqa: F401\n"
    )


def place_file(source: Path, target: Path) -> None:
    """Hard-link when possible (large ONNX files), copy otherwise."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def component_parameters(name: str, manifest: dict, dims: ModelDims, options: RepositoryOptions) -> dict:
    """What the server-side checks and the client need to know about a network model."""
    spec = COMPONENTS[name]
    schedulers = manifest["schedulers"]
    parameters: dict[str, object] = {}
    limits = spatial_limits(spec, dims, options.max_image_size)
    if limits:
        parameters["spatial_limits"] = limits
    part = {"prior": "prior", "unet": "decoder", "unet_inpaint": "decoder_inpaint"}.get(name)
    if part:
        parameters["scheduler_config"] = schedulers[part]
        parameters["num_train_timesteps"] = str(schedulers[part].get("num_train_timesteps", 1000))
    if name == "text_encoder":
        parameters["vocab_size"] = str(manifest["vocab_size"])
    if name == "unet":
        parameters["kandinsky_dims"] = manifest["dims"]
        parameters["max_image_size"] = str(options.max_image_size)
        parameters["max_images_per_request"] = str(MAX_IMAGES_PER_REQUEST)
    return parameters


def generate_repository(bundle: Path, output: Path, options: RepositoryOptions | None = None) -> list[str]:
    """Write the repository for `options.flavour` into `output` (replaced); returns the model names."""
    from .gpu_backends import configure_gpu_component

    options = options or RepositoryOptions()
    if options.flavour not in FLAVOURS:
        raise ValueError(f"flavour '{options.flavour}' is not one of {FLAVOURS}")
    bundle, output = Path(bundle), Path(output)
    manifest = json.loads((bundle / MANIFEST).read_text())
    dims = ModelDims.from_dict(manifest["dims"])
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)

    models: dict[str, ModelSpec] = {}
    for name in tqdm(manifest["components"], desc=f"writing {options.flavour} repository", unit="model"):
        spec = COMPONENTS[name]
        models[name] = spec
        config = base_config(spec, dims)
        set_parameters(config, component_parameters(name, manifest, dims, options))
        version_dir = output / name / "1"
        files = [bundle / name / f for f in manifest["components"][name]["files"]]
        if options.flavour == "cpu":
            python_backend(config, version_dir, _ONNX_RUNNER, options)
            if options.intra_op_threads:
                set_parameters(config, {"intra_op_threads": str(options.intra_op_threads)})
            if spec.called_per_step:
                config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
            for source in files:
                place_file(source, version_dir / source.name)
        else:
            configure_gpu_component(
                config, spec, dims, bundle / name, manifest["components"][name], version_dir, options
            )
        limit_queue(config, options)
        write_config(output / name, config)

    for name, entry_point in _PYTHON_MODELS.items():
        spec = SERVED_MODELS[name]
        models[name] = spec
        config = base_config(spec, dims)
        python_backend(config, output / name / "1", entry_point, options)
        set_parameters(config, python_model_limits(name, options))
        limit_queue(config, options)
        write_config(output / name, config)
    shutil.copytree(bundle / "tokenizer", output / "tokenizer" / "1" / "tokenizer")
    clip_config = bundle / "image_processor" / "preprocessor_config.json"
    if not clip_config.is_file():
        raise FileNotFoundError(f"{clip_config} not found: re-run `kandinsky-export onnx` (writes it)")
    place_file(clip_config, output / "preprocess_clip_image" / "1" / "image_processor" / clip_config.name)
    for constant in sorted((bundle / "prior_postprocess").glob("*.npy")):
        place_file(constant, output / "prior_postprocess" / "1" / constant.name)

    for spec in SERVED_MODELS.values():
        if spec.steps and all(step in models for step in spec.steps):
            models[spec.name] = spec
            write_config(output / spec.name, ensemble_config(spec, dims, models))
            (output / spec.name / "1").mkdir(exist_ok=True)
    write_generation_model(output, dims, options)
    names = sorted([*models, MODEL_NAME])
    logger.info("wrote %d models to %s", len(names), output)
    return names


def write_generation_model(output: Path, dims: ModelDims, options: RepositoryOptions) -> None:
    """The `kandinsky` server-side generation model (see generation_config.py)."""
    configs = {path.parent.name: read_config(path.parent) for path in output.glob("*/config.pbtxt")}
    config = generation_config(configs, dims.embed_dim)
    set_parameters(
        config,
        {
            "max_concurrent_generations": str(options.max_concurrent_generations),
            "max_queued_generations": str(options.max_queued_generations),
            "max_generation_seconds": str(options.max_generation_seconds),
        },
    )
    python_backend(config, output / MODEL_NAME / "1", GENERATION_ENTRY_POINT, options)
    write_config(output / MODEL_NAME, config)


def read_config(model_dir: Path) -> mc.ModelConfig:
    """Parse a generated config.pbtxt back into Triton's ModelConfig message."""
    return text_format.Parse((Path(model_dir) / "config.pbtxt").read_text(), mc.ModelConfig())
