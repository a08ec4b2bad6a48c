"""GPU flavours of the network models: what every GPU flavour shares, and the dispatch to each backend.

Only the backend section differs from the CPU flavour: inputs, outputs and batch limits come from the
same registry, and the pre/post-processing (python) models and the ensembles are shared. Per backend:

- `onnxruntime` (`onnxruntime_flavour.py`): the ONNX file of the chosen precision on the CUDA execution
  provider, optionally with ONNX Runtime's TensorRT accelerator;
- `tensorrt` (`tensorrt_flavour.py`): the engines built by `kandinsky-export engines`, with one
  optimisation profile per optimum size;
- `timed` (`timed_flavour.py`): the tensorrt flavour's configuration with every network a python model
  sleeping its modelled GPU time, so a CPU can measure the GPU configuration's serving overhead.

Shared here: GPU instance groups; dynamic batching for the per-step models (prior, UNets), with every
batch a lone request sends as a preferred size (`prefer_lone_requests`); warm-up requests at the shapes
the traffic sends (each flavour says which), so the first client does not pay for CUDA context set-up,
cuDNN plan selection or engine deserialisation; and the image sizes each model accepts, which the
generator turns into the flavour-neutral `image_sizes` parameter the client reads.

The python models (tokenizer, pre/post-processing) import `kandinsky_repository`: the Triton image must
have this package installed (see docker/Dockerfile).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kandinsky_core.components import ComponentSpec, ModelDims
from kandinsky_core.profiles import has_spatial_axes, image_size_limits
from tritonclient.grpc import model_config_pb2 as mc

from .configs import RepositoryOptions, dtype_enum
from .onnxruntime_flavour import configure_onnxruntime
from .tensorrt_flavour import configure_tensorrt
from .timed_flavour import configure_timed

# Dynamic batching window of the per-step models on a GPU (microseconds): short against a UNet step (tens
# of milliseconds). Lone requests never wait for it (`prefer_lone_requests`); it only holds a pending batch
# that no single request could have sent (e.g. 5 rows) for a partner.
GPU_MAX_QUEUE_DELAY_US = 2000


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
    if options.flavour == "timed":
        shapes, settings = configure_timed(config, spec, dims, version_dir, options)
    elif options.flavour == "onnxruntime":
        shapes, settings = configure_onnxruntime(
            config, spec, dims, Path(component_dir), entry, version_dir, options
        )
    elif options.flavour == "tensorrt":
        shapes, settings = configure_tensorrt(
            config, spec, dims, Path(component_dir), entry, version_dir, options
        )
    else:
        raise ValueError(f"not a GPU flavour: {options.flavour}")
    if spec.called_per_step:
        prefer_lone_requests(config, spec)
    if options.warmup:
        add_warmup(config, spec, shapes)
    if settings is None or not has_spatial_axes(spec):
        return None
    return image_size_limits(dims.size_multiple, options.max_image_size, settings)


def prefer_lone_requests(config: mc.ModelConfig, spec: ComponentSpec) -> None:
    """Make every batch one request sends alone a preferred batch size (keeping those already set).

    Triton fills an empty `preferred_batch_size` with `max_batch_size` (model_config_utils.cc), and its
    dynamic batcher sends a pending batch at once only when it reaches a preferred size; otherwise it
    waits out `max_queue_delay_microseconds` (dynamic_batch_scheduler.cc). Without this, a lone
    generation's guided step (2 rows of the UNet's 8) slept the whole window at every step: +2 ms per
    UNet and prior step. The batcher still takes everything queued up to the largest preferred size, so
    concurrent generations' steps merge as before.
    """
    wanted = sorted({*config.dynamic_batching.preferred_batch_size, *spec.request_batch_sizes()})
    del config.dynamic_batching.preferred_batch_size[:]
    config.dynamic_batching.preferred_batch_size.extend(wanted)


# --------------------------------------------------------------------------------------------------
# Warm-up


def add_warmup(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    shapes: Mapping[str, Sequence[int]] | Sequence[Mapping[str, Sequence[int]]],
) -> None:
    """One warm-up request per shape set, in order: `shapes` is {input: full shape, batch first}, or a
    list of them (the flavour's choice of what the traffic sends, e.g. `onnxruntime_flavour.warmup_shapes`).

    Triton runs them while the model loads, so the first clients do not pay for CUDA context set-up,
    memory growth, cuDNN plan selection or engine builds and deserialisation. Floats are random; integer
    and boolean inputs are zeros (token 0, timestep 0 and an all-false mask are valid, while random
    integers could index outside the vocabulary).
    """
    shape_sets = [shapes] if isinstance(shapes, Mapping) else list(shapes)
    by_name = {message.name: message for message in config.input}
    for index, shape_set in enumerate(shape_sets):
        batch = int(shape_set[spec.inputs[0].name][0])
        warmup = config.model_warmup.add(name=f"{spec.name}_warmup_{index}", batch_size=batch, count=1)
        for tensor in spec.inputs:
            if int(shape_set[tensor.name][0]) != batch:
                raise ValueError(f"{spec.name} warm-up: inputs of different batches {dict(shape_set)}")
            message = by_name[tensor.name]
            sample = warmup.inputs[tensor.name]
            sample.data_type = dtype_enum(tensor.dtype)
            per_item = list(shape_set[tensor.name][1:])
            sample.dims.extend(per_item if per_item else list(message.dims))  # scalar per item: config's [1]
            if tensor.dtype.startswith("float"):
                sample.random_data = True
            else:
                sample.zero_data = True
