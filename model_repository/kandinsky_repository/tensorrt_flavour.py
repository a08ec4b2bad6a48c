"""The `tensorrt` GPU flavour: Triton's tensorrt_plan backend on the engines `kandinsky-export engines` built.

The batch limit, the static shapes of a static engine and the I/O types are checked against the engine's
sidecar. Engines whose only dynamic axis is the batch (static sizes, and the models without image axes)
get CUDA graphs for every batch the traffic has (`add_cuda_graphs`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kandinsky_client.components import DTYPES, ComponentSpec, ModelDims, TensorSpec
from kandinsky_client.profiles import SPATIAL_SYMBOLS, ProfileSettings, is_spatially_static
from kandinsky_export.bundle import ENGINE_FILE
from tritonclient.grpc import model_config_pb2 as mc

from .configs import RepositoryOptions, place_file, set_parameters


def configure_tensorrt(
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
