"""GPU flavours of the network models: Triton's `onnxruntime` and `tensorrt_plan` backends.

Only the backend section differs from the CPU flavour; inputs, outputs and batch limits come from the
same registry, and the pre/post-processing models and ensembles are shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kandinsky_client.components import ComponentSpec, ModelDims
from tritonclient.grpc import model_config_pb2 as mc

if TYPE_CHECKING:
    from .generate import RepositoryOptions


def configure_gpu_component(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    files: list[Path],
    version_dir: Path,
    options: RepositoryOptions,
) -> None:
    from .generate import place_file

    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=options.instances)
    if spec.called_per_step:
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    if options.flavour == "onnxruntime":
        config.backend = "onnxruntime"
        for source in files:
            place_file(source, version_dir / source.name)
    elif options.flavour == "tensorrt":
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
        plans = [f for f in files if f.suffix == ".plan"]
        if not plans:
            raise FileNotFoundError(
                f"{spec.name}: no TensorRT engine in the bundle; build engines with `kandinsky-export engines`"
            )
        place_file(plans[0], version_dir / "model.plan")
    else:
        raise ValueError(f"not a GPU flavour: {options.flavour}")
