"""GPU flavours of the network models: what every GPU flavour shares, and the dispatch to each backend.

Only the backend section differs from the CPU flavour: inputs, outputs and batch limits come from the
same registry, and the pre/post-processing (python) models and the ensembles are shared. Per backend:

- `onnxruntime` (`onnxruntime_flavour.py`): the ONNX file of the chosen precision on the CUDA execution
  provider, optionally with ONNX Runtime's TensorRT accelerator;
- `tensorrt` (`tensorrt_flavour.py`): the engines built by `kandinsky-export engines`.

Shared here: GPU instance groups, dynamic batching for the per-step models (prior, UNets), warm-up
requests at the profile's optimum (one image's rows), so the first client does not pay for CUDA context
set-up, cuDNN autotuning or engine deserialisation; and the image sizes each model accepts, which the
generator turns into the flavour-neutral `image_sizes` parameter the client reads.

The python models (tokenizer, pre/post-processing) import `kandinsky_repository`: the Triton image must
have this package installed (see docker/Dockerfile).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kandinsky_client.components import ComponentSpec, ModelDims
from kandinsky_client.profiles import has_spatial_axes, image_size_limits
from tritonclient.grpc import model_config_pb2 as mc

from .configs import RepositoryOptions, dtype_enum
from .onnxruntime_flavour import configure_onnxruntime
from .tensorrt_flavour import configure_tensorrt

# Dynamic batching window of the per-step models on a GPU (microseconds): long enough for concurrent
# generations' steps to meet, short against a UNet step (tens of milliseconds).
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
    if options.flavour == "onnxruntime":
        shapes, settings = configure_onnxruntime(
            config, spec, dims, Path(component_dir), entry, version_dir, options
        )
    elif options.flavour == "tensorrt":
        shapes, settings = configure_tensorrt(
            config, spec, dims, Path(component_dir), entry, version_dir, options
        )
    else:
        raise ValueError(f"not a GPU flavour: {options.flavour}")
    if options.warmup:
        add_warmup(config, spec, shapes)
    if settings is None or not has_spatial_axes(spec):
        return None
    return image_size_limits(dims.size_multiple, options.max_image_size, settings)


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
