"""The `timed` flavour: the tensorrt flavour's configuration, served on a CPU at modelled GPU step times.

Batching windows, preferred batch sizes, queue policies, instance counts, engine profiles, CUDA-graph
batch sizes and ensembles are properties of configuration and scheduling, not of kernels. This flavour
writes every network model exactly as the tensorrt flavour would for the engines `kandinsky-export
engines` builds by default (the same `configure_gpu_component` path, the same profiles through
`tensorrt_flavour.serve_profiles`), then swaps the backend: each network is a python model
(`python_models/timed.py`) that sleeps for the call's modelled GPU time (`gpu_costs.py`) and answers
zeros of the registry's shapes. So a CPU can measure what the GPU configuration costs around the kernels.

What differs from the real flavour, on purpose, and is labelled wherever results are reported:
- instances are KIND_CPU (a python model cannot take a GPU instance on a machine without one), with the
  tensorrt flavour's count; Triton accepts `instance_group { profile }` on TensorRT models only, so the
  profile list moves to the `tensorrt_profiles` parameter (for the reader), and every profile costs
  the same modelled time;
- each network call crosses a python-stub hop a C++ backend does not have: measure it with
  `--gpu none` (zero modelled time) and subtract it;
- every timed model holds one lock file while it sleeps, so the repository models ONE GPU (its networks
  never overlap); the outputs are zeros, so the pictures mean nothing (the timings are the point).
"""

from __future__ import annotations

from pathlib import Path

from kandinsky_core.components import ComponentSpec, ModelDims
from kandinsky_core.gpu_costs import DEFAULT_ARCHITECTURE, cost_record, load_costs
from kandinsky_core.profiles import ProfileSettings, engine_profiles
from tritonclient.grpc import model_config_pb2 as mc

from ..python_models.timed import COMPONENT_PARAMETER, COST_PARAMETER, DIMS_PARAMETER, LOCK_PARAMETER
from .configs import RepositoryOptions, set_parameters, write_python_entry_point
from .tensorrt_flavour import serve_profiles

ENTRY_POINT = "timed:TimedNetwork"
# The lock file every timed model of a repository shares (relative to the repository root, which Triton
# does not scan for models: only folders are models).
GPU_LOCK_FILE = "timed_gpu.lock"
# Where the tensorrt flavour's `instance_group { profile: [...] }` list is kept (see the module docstring).
TENSORRT_PROFILES_PARAMETER = "tensorrt_profiles"


def configure_timed(
    config: mc.ModelConfig,
    spec: ComponentSpec,
    dims: ModelDims,
    version_dir: Path,
    options: RepositoryOptions,
) -> tuple[list[dict[str, list[int]]], ProfileSettings]:
    """The tensorrt flavour's config of one network, served by a timed python model.

    Returns the warm-up shape sets (one per profile, as the tensorrt flavour) and the profile settings.
    """
    settings = ProfileSettings.for_max_size(options.max_image_size)
    warmups = serve_profiles(config, spec, dims, engine_profiles(spec, dims, settings), options)
    profiles = [list(group.profile) for group in config.instance_group]
    for group in config.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        del group.profile[:]  # Triton refuses the field outside TensorRT models
    config.backend = "python"
    write_python_entry_point(version_dir, ENTRY_POINT)
    costs = load_costs(options.gpu_costs or None)
    architecture = options.architecture or DEFAULT_ARCHITECTURE
    set_parameters(
        config,
        {
            COMPONENT_PARAMETER: spec.name,
            COST_PARAMETER: cost_record(spec.name, options.gpu, architecture, costs),
            DIMS_PARAMETER: dims.as_symbols(),
            LOCK_PARAMETER: GPU_LOCK_FILE,
            TENSORRT_PROFILES_PARAMETER: profiles[0] if profiles else [],
        },
    )
    return warmups, settings
