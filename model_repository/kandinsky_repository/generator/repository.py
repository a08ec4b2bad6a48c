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
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from kandinsky_core import bundle as layout
from kandinsky_core.components import (
    COMPONENTS,
    INPAINT_MOVQ_COMPONENTS,
    MAX_IMAGE_SIZE,
    MAX_IMAGES_PER_REQUEST,
    MAX_INPUT_IMAGE_SIDE,
    MAX_PROMPT_BYTES,
    SERVED_MODELS,
    ComponentSpec,
    ModelDims,
    ModelSpec,
    ServedModelSpec,
    TensorSpec,
)
from kandinsky_core.memory import MemoryFit, MemoryPlan
from kandinsky_core.profiles import image_size_limits, intersect_size_limits
from kandinsky_core.server_info import (
    IMAGE_SIZES_PARAMETER,
    INPAINT_MOVQ_PARAMETER,
    REPOSITORY_FORMAT,
    REPOSITORY_FORMAT_PARAMETER,
)
from kandinsky_core.wire import MODEL_NAME
from tqdm.auto import tqdm
from tritonclient.grpc import model_config_pb2 as mc

from ..python_models.step_batching import STEP_BATCHING_MODES, STEP_BATCHING_PARAMETER
from .configs import (
    FLAVOURS,
    RepositoryOptions,
    base_config,
    dtype_enum,
    place_file,
    python_backend,
    read_config,
    set_parameters,
    write_config,
)
from .gpu_backends import configure_gpu_component
from .kandinsky_model_config import ENTRY_POINT as GENERATION_ENTRY_POINT
from .kandinsky_model_config import generation_config
from .tensorrt_flavour import ACTIVATION_MEMORY_PARAMETER

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_SIZE = MAX_IMAGE_SIZE  # the registry's; re-exported for the CLI and the gateway
# What the generator records about the repository it wrote (format, options, the /dev/shm it needs).
REPOSITORY_RECORD = "kandinsky_repository.json"
# The python backend's first shared-memory region per model instance (its shm-default-byte-size).
PYTHON_BACKEND_REGION_BYTES = 1 << 20

__all__ = [
    "DEFAULT_MAX_IMAGE_SIZE",
    "FLAVOURS",
    "REPOSITORY_RECORD",
    "RepositoryOptions",
    "base_config",
    "dtype_enum",
    "generate_repository",
    "place_file",
    "read_config",
    "set_parameters",
    "write_config",
]

# Python-backend models that are not exported networks: model name -> "module:class".
_PYTHON_MODELS = {
    "tokenizer": "tokenizer:TritonPythonModel",
    "prior_postprocess": "postprocess:PriorPostprocess",
    "postprocess_image": "postprocess:PostprocessImage",
    "preprocess_clip_image": "preprocess:PreprocessClipImage",
    "preprocess_movq_image": "preprocess:PreprocessMovqImage",
}
_ONNX_RUNNER = "onnx_runner:TritonPythonModel"


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


def limit_queue(config: mc.ModelConfig, spec: ModelSpec, options: RepositoryOptions) -> None:
    """A bounded queue with per-request timeouts for the models called once per image or request.

    Those models get `default_queue_policy`: at most `options.max_queue_size` requests wait (more are
    refused at once with UNAVAILABLE, which clients may retry), and a request may carry its own timeout
    (`allow_timeout_override`; the client's per-request timeout) after which it is rejected while still
    queued instead of computed for nobody. Triton applies an override only below the default timeout
    (`PolicyQueue::Enqueue`), so the default is the generation time limit rather than 0 (no timeout,
    which would ignore every override).

    The per-step models (prior, UNets: `called_per_step`) get no queue policy. Any policy turns off the
    dynamic batcher's prefetching of the next batch while the instance is busy (`support_prefetching_`
    in Triton's PriorityQueue); measured on the CPU flavour (one python-backend instance), each
    sequential step then waited 25-75 ms in the queue instead of 0.1 ms, doubling the latency of both
    loops (docs/benchmarks.md). Their queues are bounded by their callers instead: a generation has one
    step in flight (client loop), the server loop runs `max_concurrent_generations` at once, and a
    step's inputs are small (latents and embeddings: 2 MiB at 4 images of 1024 px).

    Python-backend models without dynamic batching get it too, with no batching delay: Triton's default
    scheduler has neither a queue bound nor timeouts, and only the dynamic batcher drops requests that
    were cancelled while they waited (`BatchingModel` checks `is_cancelled()` for the ones it receives).
    Merged requests are computed as one batch, which these models already do for the requests Triton
    hands them together. Ensembles have no queue of their own (their steps queue in the models above).
    GPU backends without dynamic batching (the once-per-image networks) keep Triton's default scheduler,
    and so do the timed flavour's python models standing in for them.
    """
    if config.platform == "ensemble":
        return
    stands_in_for_gpu_backend = options.flavour == "timed" and isinstance(spec, ComponentSpec)
    if (
        config.backend == "python"
        and not config.HasField("dynamic_batching")
        and not stands_in_for_gpu_backend
    ):
        config.dynamic_batching.SetInParent()
    if config.HasField("dynamic_batching") and not (isinstance(spec, ComponentSpec) and spec.called_per_step):
        policy = config.dynamic_batching.default_queue_policy
        policy.max_queue_size = options.max_queue_size
        policy.allow_timeout_override = True
        policy.default_timeout_microseconds = int(options.max_generation_seconds * 1e6)
        policy.timeout_action = mc.ModelQueuePolicy.REJECT


def component_parameters(name: str, manifest: dict, dims: ModelDims, options: RepositoryOptions) -> dict:
    """What the server-side checks and the client need to know about a network model."""
    spec = COMPONENTS[name]
    schedulers = manifest["schedulers"]
    parameters: dict[str, object] = {}
    limits = spatial_limits(spec, dims, options.max_image_size)
    if limits:
        parameters["spatial_limits"] = limits
    part = {
        "prior": "prior",
        "unet": "decoder",
        "unet_inpaint": "decoder_inpaint",
        "unet_controlnet": "controlnet",
    }.get(name)
    if part:
        parameters["scheduler_config"] = schedulers[part]
        parameters["num_train_timesteps"] = str(schedulers[part].get("num_train_timesteps", 1000))
    if name == "unet_inpaint":
        own_movq = all(movq in manifest["components"] for movq in INPAINT_MOVQ_COMPONENTS)
        parameters[INPAINT_MOVQ_PARAMETER] = "true" if own_movq else "false"
    if name == "text_encoder":
        parameters["vocab_size"] = str(manifest["vocab_size"])
    if name == "unet":
        parameters[REPOSITORY_FORMAT_PARAMETER] = str(REPOSITORY_FORMAT)
        parameters["kandinsky_dims"] = manifest["dims"]
        parameters["max_images_per_request"] = str(MAX_IMAGES_PER_REQUEST)
    return parameters


def generate_repository(bundle: Path, output: Path, options: RepositoryOptions | None = None) -> list[str]:
    """Write the repository for `options.flavour` into `output` (replaced); returns the model names.

    The bundle must have passed its export checks (`bundle.read_manifest` refuses it otherwise). Every
    flavour writes the same client-facing parameters into the `unet` config: the repository format, the
    checkpoint's dims and the image sizes every served model accepts (`image_sizes`).
    """
    options = options or RepositoryOptions()
    if options.flavour not in FLAVOURS:
        raise ValueError(f"flavour '{options.flavour}' is not one of {FLAVOURS}")
    bundle, output = Path(bundle), Path(output)
    manifest = layout.read_manifest(bundle)
    dims = ModelDims.from_dict(manifest["dims"])
    if options.max_image_size <= 0 or options.max_image_size % dims.size_multiple:
        raise ValueError(
            f"max image size {options.max_image_size} is not a positive multiple of {dims.size_multiple} "
            "(the checkpoint's image size unit)"
        )
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)

    models: dict[str, ModelSpec] = {}
    configs: dict[str, mc.ModelConfig] = {}
    fits: dict[str, MemoryFit] = {}
    weights: dict[str, int] = {}
    size_limits = [image_size_limits(dims.size_multiple, options.max_image_size)]
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
                config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us or 0
            for source in files:
                place_file(source, version_dir / source.name)
            fits[name] = recorded_fit(bundle, name, manifest["components"][name])
            weights[name] = sum(source.stat().st_size for source in files)
        else:
            limits = configure_gpu_component(
                config, spec, dims, bundle / name, manifest["components"][name], version_dir, options
            )
            if limits is not None:
                size_limits.append(limits)
        limit_queue(config, spec, options)
        configs[name] = config
    set_parameters(configs["unet"], {IMAGE_SIZES_PARAMETER: intersect_size_limits(size_limits)})
    memory = None
    if fits:
        memory = MemoryPlan.build(
            fits, weights, options.instances, options.max_image_size, options.memory_budget_bytes
        )
        for name, model_memory in memory.models.items():
            set_parameters(
                configs[name], {**model_memory.as_parameters(), "kandinsky_dims": manifest["dims"]}
            )
        log_memory_plan(memory)
    for name, config in configs.items():
        write_config(output / name, config)

    for name, entry_point in _PYTHON_MODELS.items():
        spec = SERVED_MODELS[name]
        models[name] = spec
        config = base_config(spec, dims)
        python_backend(config, output / name / "1", entry_point, options)
        set_parameters(config, python_model_limits(name, options))
        limit_queue(config, spec, options)
        write_config(output / name, config)
    shutil.copytree(bundle / layout.TOKENIZER_DIR, output / "tokenizer" / "1" / layout.TOKENIZER_DIR)
    clip_config = bundle / layout.IMAGE_PROCESSOR_CONFIG
    if not clip_config.is_file():
        raise FileNotFoundError(f"{clip_config} not found: re-run `kandinsky-export onnx` (writes it)")
    place_file(clip_config, output / "preprocess_clip_image" / "1" / layout.IMAGE_PROCESSOR_CONFIG)
    for constant in sorted((bundle / layout.CONSTANTS_DIR).glob("*.npy")):
        place_file(constant, output / "prior_postprocess" / "1" / constant.name)

    for spec in SERVED_MODELS.values():
        if spec.steps and all(step in models for step in spec.steps):
            models[spec.name] = spec
            write_config(output / spec.name, ensemble_config(spec, dims, models))
            (output / spec.name / "1").mkdir(exist_ok=True)
    write_generation_model(output, dims, options, memory)
    write_repository_record(output, dims, options, memory)
    names = sorted([*models, MODEL_NAME])
    logger.info("wrote %d models to %s", len(names), output)
    return names


def recorded_fit(bundle: Path, name: str, entry: dict) -> MemoryFit:
    """The memory fit `kandinsky-export` measured for a component (the CPU flavour's budget needs it)."""
    if "memory" not in entry:
        raise ValueError(
            f"the bundle's manifest records no memory measurement for {name} (an export before the memory "
            f"budget): run `python -m kandinsky_export.memory --bundle {bundle}`, or export again"
        )
    return MemoryFit.from_dict(entry["memory"]["fit"])


def log_memory_plan(memory: MemoryPlan) -> None:
    source = (
        f"{memory.record()['budget_fraction']:.0%} of {memory.machine_bytes / 2**30:.1f} GiB after "
        f"{memory.held_bytes / 2**30:.2f} GiB of weights"
        if memory.machine_bytes
        else "--memory-budget-gib"
    )
    logger.info(
        "memory budget %.2f GiB (%s); largest call per model: %s",
        memory.budget_bytes / 2**30,
        source,
        ", ".join(f"{name} {m.limit_bytes / 2**30:.2f} GiB" for name, m in memory.models.items()),
    )


def write_repository_record(
    output: Path, dims: ModelDims, options: RepositoryOptions, memory: MemoryPlan | None = None
) -> None:
    """`kandinsky_repository.json` at the repository's top (Triton reads only model folders): the format,
    flavour and options it was generated with, the /dev/shm its python-backend models may need, and the
    memory budget with each network model's share (cpu flavour) or the device memory the TensorRT engines
    reserve at load (tensorrt flavour)."""
    configs = {path.parent.name: read_config(path.parent) for path in output.glob("*/config.pbtxt")}
    device = device_memory(configs, output) if options.flavour == "tensorrt" else None
    if device:
        logger.info(
            "the TensorRT engines reserve %.2f GiB of device memory at load (weights and activations)",
            device["total_bytes"] / 2**30,
        )
    record = {
        "repository_format": REPOSITORY_FORMAT,
        "flavour": options.flavour,
        "options": asdict(options),
        "shared_memory_bytes": shared_memory_bytes(
            configs, dims, options.max_image_size, options.max_concurrent_generations
        ),
        "memory": memory.record() if memory else None,
        "device_memory": device,
    }
    layout.write_json(output / REPOSITORY_RECORD, record)


def device_memory(configs: dict[str, mc.ModelConfig], output: Path) -> dict:
    """The device memory the tensorrt flavour's engines hold from load on, per model and in all.

    On a GPU the memory budget is reserved, not granted per request: every execution context allocates
    its activation memory when Triton loads the engine (`tensorrt_activation_memory`: the STATIC figure,
    every profile at its largest shapes and batch, `profiles.instance_activation_memory`), so no request
    within the served sizes and batches takes more, and a GPU too small fails at load. Per instance:
    the engine file (its weights) and that activation memory.
    """
    models = {}
    for name, config in configs.items():
        if config.platform != "tensorrt_plan" or ACTIVATION_MEMORY_PARAMETER not in config.parameters:
            continue
        activation = json.loads(config.parameters[ACTIVATION_MEMORY_PARAMETER].string_value)
        instances = sum(group.count or 1 for group in config.instance_group) or 1
        engine = output / name / "1" / config.default_model_filename
        models[name] = {
            "instances": instances,
            "engine_bytes": engine.stat().st_size if engine.is_file() else 0,
            "activation_bytes": int(activation["per_instance_bytes"]),
        }
    total = sum(m["instances"] * (m["engine_bytes"] + m["activation_bytes"]) for m in models.values())
    return {"models": models, "total_bytes": total}


def _tensor_bytes(tensor: TensorSpec, batch: int, dims: ModelDims, side: int) -> int:
    shape = tensor.resolve(dims.size_symbols(batch, side, side), keep_dynamic=False)
    itemsize = MAX_PROMPT_BYTES + 4 if tensor.dtype == "bytes" else np.dtype(tensor.dtype).itemsize
    return math.prod(shape) * itemsize


def largest_exchange_bytes(spec: ModelSpec, dims: ModelDims, max_image_size: int) -> int:
    """Inputs plus outputs of the largest request `spec` takes (max batch, largest image sides).

    Images for CLIP pre-processing may be MAX_INPUT_IMAGE_SIDE (its output is CLIP's fixed crop).
    """
    batch = spec.max_batch_size
    in_side = MAX_INPUT_IMAGE_SIDE if spec.name == "preprocess_clip_image" else max_image_size
    return sum(_tensor_bytes(t, batch, dims, in_side) for t in spec.inputs) + sum(
        _tensor_bytes(t, batch, dims, max_image_size) for t in spec.outputs
    )


def shared_memory_bytes(
    configs: dict[str, mc.ModelConfig], dims: ModelDims, max_image_size: int, concurrent_generations: int
) -> int:
    """An upper bound of the /dev/shm the python backend uses for this repository.

    Every python-backend model instance has its own shared-memory region, which starts at 1 MiB and grows
    to the largest request it has seen (inputs and outputs travel through it). The bound: every instance
    at its largest request. The `kandinsky` generation model runs `concurrent_generations` generations
    at once in one stub, each holding the decoded float images of its request (the MoVQ decoder's output,
    read over BLS) and its own image output of the same size.
    """
    registry: dict[str, ModelSpec] = {**COMPONENTS, **SERVED_MODELS}
    total = 0
    for name, config in configs.items():
        if config.backend != "python":
            continue
        instances = sum(group.count or 1 for group in config.instance_group) or 1
        if name == MODEL_NAME:
            decoded = registry["movq_decoder"]
            largest = (
                concurrent_generations
                * 2
                * sum(_tensor_bytes(t, decoded.max_batch_size, dims, max_image_size) for t in decoded.outputs)
            )
        elif name in registry:
            largest = largest_exchange_bytes(registry[name], dims, max_image_size)
        else:
            continue
        total += instances * (PYTHON_BACKEND_REGION_BYTES + largest)
    return total


def write_generation_model(
    output: Path, dims: ModelDims, options: RepositoryOptions, memory: MemoryPlan | None = None
) -> None:
    """The `kandinsky` server-side generation model (see kandinsky_model_config.py); with a memory plan
    (cpu flavour), the budget its running generations share and every network model's part of it."""
    if options.step_batching not in STEP_BATCHING_MODES:
        raise ValueError(f"step batching '{options.step_batching}' is not one of {STEP_BATCHING_MODES}")
    configs = {path.parent.name: read_config(path.parent) for path in output.glob("*/config.pbtxt")}
    config = generation_config(configs, dims.embed_dim)
    set_parameters(
        config,
        {
            "max_concurrent_generations": str(options.max_concurrent_generations),
            "max_queued_generations": str(options.max_queued_generations),
            "max_generation_seconds": str(options.max_generation_seconds),
            "memory_budget_bytes": str(memory.budget_bytes if memory else 0),
            "memory_models": {
                name: m.as_parameters() for name, m in (memory.models.items() if memory else ())
            },
            STEP_BATCHING_PARAMETER: options.step_batching,
        },
    )
    python_backend(config, output / MODEL_NAME / "1", GENERATION_ENTRY_POINT, options)
    write_config(output / MODEL_NAME, config)
