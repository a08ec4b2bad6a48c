"""FP16 variants of the exported components: optimise the graph, convert to FP16, measure the error.

For each component of an export bundle this writes `<bundle>/<component>/fp16/model.onnx` and records
it in the manifest next to the FP32 file, with the fusions that applied, the operators kept in FP32, the
measured FP16-vs-FP32 error and the precision the GPU flavours should serve by default.

Order matters: the graph is optimised in FP32 first (ONNX Runtime's transformer optimizer), then
converted, so fused operators (LayerNormalization, GroupNorm) convert as one node whose kernels keep
their statistics in FP32, instead of a chain of FP16 reductions that can overflow.

Fusion sets:
- `portable` (default): only rewrites whose result is standard-domain ONNX (clean-ups, reshape and
  shape fusions, LayerNormalization). The TensorRT parser reads it, and every ONNX Runtime execution
  provider runs it, so its error can be measured on CPU.
- `cuda`: ONNX Runtime's stable-diffusion GPU fusions (GroupNorm, SkipGroupNorm, NhwcConv,
  BiasSplitGelu, SkipLayerNormalization, packed attention...). They are `com.microsoft` operators with
  CUDA kernels only: the TensorRT parser rejects them, and their check needs the CUDA execution
  provider (`providers=["CUDAExecutionProvider"]`, onnxruntime-gpu on a GPU). Written next to the
  portable variant, never over it (`<component>/fp16_cuda/`, manifest `variants.fp16_cuda`): the
  TensorRT engines and ONNX Runtime's TensorRT accelerator keep reading `variants.fp16`, the onnxruntime
  flavour on the CUDA provider serves this one where it passed. `default_precision` stays the portable
  variant's verdict.

Served inputs and outputs stay FP32 (`keep_io_types`): clients, ensembles and the python models see the
same tensors in every precision, and the Cast at each edge costs microseconds.

Error measurement. The FP32 ONNX graph is the reference. ONNX Runtime's CPU provider runs an FP16 graph
by inserting casts around operators without FP16 kernels and removes the FP32->FP16->FP32 cast pairs
between neighbours, so it never rounds (nor overflows) those intermediate tensors: it hides exactly the
hazard FP16 has on a GPU (the SDXL VAE's activations above 65504). The gate therefore runs a *storage
emulation* of the FP16 graph: the same graph in FP32 arithmetic with every tensor that is FP16 in the
converted graph rounded to FP16 where it is produced (graph optimisations off, so no cast pair is
removed). That is what a GPU computes with FP16 storage and FP32 accumulation (cuBLAS, cuDNN, TensorRT
kernels): rounding and overflow are reproduced, per-kernel accumulation differences are not. The FP16
graph itself also runs natively on the given providers, and both must pass. NaN or Inf always fails.
Every tensor must have a type after shape inference (an untyped one would escape the emulation).

What it is measured on. The inputs each component gets in a short real run of the bundle's own FP32
graphs (`calibration.py`: a text-to-image generation with a negative prompt, the generated image encoded,
an inpainting run), at the engines' optimum size for the largest side served (768 px by default): a
MoVQ decoder fed its UNet's latents, not N(0, 1) noise.

Normalisations are judged by what they reduce: one statistic sums x^2 over the elements it normalises,
which for Instance/GroupNorm grow with the image. The largest such sum, projected to the largest served
size, must fit FP16 (65504) unless the normalisations run in FP32; a kernel that keeps its statistics in
FP16 (TensorRT warns about strongly typed FP16 normalisations) would overflow there, whatever the error
at the checked size says.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from kandinsky_core import bundle as layout
from kandinsky_core.bundle import (
    EXTERNAL_DATA_NAME,
    EXTERNAL_DATA_THRESHOLD,
    FP16_CUDA_DIR,
    FP16_DIR,
    ONNX_FILE,
    onnx_digest,
    read_manifest,
)
from kandinsky_core.components import COMPONENTS, MAX_IMAGE_SIZE, ModelDims
from kandinsky_core.profiles import ProfileSettings, has_spatial_axes
from onnx import TensorProto, helper, numpy_helper
from tqdm.auto import tqdm

from . import calibration
from .calibration import RecordedRun, record_run
from .onnx_export import ParityReport, compare_outputs, onnx_session, run_session

logger = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)  # 65504

# Which of ONNX Runtime's transformer optimizers matches each component's graph.
MODEL_TYPES = {
    "text_encoder": "clip",
    "image_encoder": "clip",
    "prior": "clip",  # pre-LN transformer blocks like CLIP's; 'unet' matches fewer of its patterns
    "unet": "unet",
    "unet_inpaint": "unet",
    "unet_controlnet": "unet",
    "movq_encoder": "vae",
    "movq_decoder": "vae",
    "movq_encoder_inpaint": "vae",
    "movq_decoder_inpaint": "vae",
}

FUSION_SETS = ("portable", "cuda")
# Where each fusion set's variant lives: its folder in the component's folder and its manifest key.
VARIANT_DIRS = {"portable": FP16_DIR, "cuda": FP16_CUDA_DIR}
# The providers a fusion set's FP16 graph is checked on unless told: `cuda` graphs hold CUDA-only kernels.
DEFAULT_PROVIDERS = {"portable": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider",)}


class ProviderUnavailable(RuntimeError):
    """The FP16 check cannot run where it was asked to (a CUDA-fused graph without ONNX Runtime's CUDA)."""


def check_providers(fusion_set: str, providers: Sequence[str]) -> None:
    """Refuse, before any file is written, a check that cannot run: the `cuda` fusion set needs the CUDA
    provider, and every provider asked for must exist in this onnxruntime (it would otherwise fall back
    to the CPU with a warning, and the CUDA-only operators would not load)."""
    import onnxruntime

    if fusion_set == "cuda" and "CUDAExecutionProvider" not in providers:
        raise ProviderUnavailable(
            "the cuda fusion set holds CUDA-only operators: check it with --providers CUDAExecutionProvider "
            "(onnxruntime-gpu, on a GPU)"
        )
    missing = [p for p in providers if p not in onnxruntime.get_available_providers()]
    if missing:
        raise ProviderUnavailable(
            f"this onnxruntime ({onnxruntime.__version__}) has no {', '.join(missing)} "
            f"(it has {', '.join(onnxruntime.get_available_providers())}): the FP16 check cannot run here; "
            "the cuda fusion set needs onnxruntime-gpu on a GPU"
        )


# FusionOptions flags that create com.microsoft operators; `portable` turns them all off.
_CONTRIB_FUSION_FLAGS = (
    "enable_gelu",
    "enable_attention",
    "enable_skip_layer_norm",
    "enable_embed_layer_norm",
    "enable_bias_skip_layer_norm",
    "enable_bias_gelu",
    "enable_qordered_matmul",
    "enable_rotary_embeddings",
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)

# Operators the optimizer creates; new nodes of these types are the fusions that applied.
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "LayerNormalization",
    "SkipLayerNormalization",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "BiasSplitGelu",
    "GroupNorm",
    "SkipGroupNorm",
    "NhwcConv",
    "BiasAdd",
)

# Candidate FP32 block lists, tried in order until the measured error passes: nothing, then the
# normalisations (statistics over many values), then softmax and the remaining reductions.
NORMALISATIONS = (
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "GroupNorm",
    "SkipGroupNorm",
    "SkipLayerNormalization",
)
REDUCTIONS = ("Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp")
BLOCK_LADDER: tuple[tuple[str, ...], ...] = ((), NORMALISATIONS, NORMALISATIONS + REDUCTIONS)

# FP16 keeps 11 significant bits (unit roundoff 4.9e-4). Over these depths (up to 48 blocks) the
# measured error of a correct conversion stays below 5e-3 of the output's scale (see docs/gpu.md);
# 3e-2 leaves room for real weights while an overflow (Inf/NaN) or a wrongly converted op (errors of
# order 1) fails. For the MoVQ decoder, 3e-2 of [-1, 1] is about 4 levels of the 8-bit image.
FP16_TOLERANCE = 3e-2


@dataclass
class Fp16Attempt:
    op_block_list: list[str]
    max_rel_error: float
    finite: bool
    passed: bool


@dataclass
class Fp16Result:
    """What converting one component produced and measured; stored in the manifest."""

    component: str
    fusion_set: str
    model_type: str
    fused_ops: dict[str, int]  # fused operators the optimizer created (count of new nodes)
    nodes_before: int
    nodes_after: int
    op_block_list: list[str]  # operator types kept in FP32
    parity: list[ParityReport]
    attempts: list[Fp16Attempt]
    peak_activation: dict[str, Any]  # largest |value| stored in FP16 during the check
    image_levels: int | None  # MoVQ decoder: largest difference in 8-bit image levels
    standard_ops_only: bool
    source_sha256: str
    hazards: list[str] = field(default_factory=list)  # unsafe for FP16 although the error passed
    fp32_nodes: list[str] = field(default_factory=list)  # timestep-embedding nodes kept in FP32
    files: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.parity) and all(r.passed for r in self.parity) and not self.hazards

    @property
    def default_precision(self) -> str:
        return "fp16" if self.passed else "fp32"

    def manifest_entry(self) -> dict[str, Any]:
        entry = asdict(self)
        entry.pop("component")
        entry["path"] = f"{VARIANT_DIRS[self.fusion_set]}/{ONNX_FILE}"
        entry["precision"] = "fp16"
        entry["keep_io_types"] = True
        entry["passed"] = self.passed
        return entry

    def lines(self) -> list[str]:
        fused = ", ".join(f"{k} {v}" for k, v in self.fused_ops.items()) or "none"
        blocked = ", ".join(self.op_block_list) or "none"
        peak = self.peak_activation
        out = [
            f"{self.component}: fusions [{self.fusion_set}/{self.model_type}] {fused}; "
            f"nodes {self.nodes_before} -> {self.nodes_after}; kept in FP32: {blocked}"
            f"{f' + {len(self.fp32_nodes)} timestep-embedding nodes' if self.fp32_nodes else ''}; "
            f"peak |activation| {peak.get('value', float('nan')):.3g} at {peak.get('tensor', '?')} "
            f"({peak.get('op_type', '?')}), normalisation inputs {peak.get('normalisation_input', 0.0):.3g}, "
            f"saturated {len(peak.get('saturated', []))}; "
            f"default {self.default_precision}"
        ]
        out += [r.line() for r in self.parity]
        out += [f"{self.component:>14s} hazard: {h}" for h in self.hazards]
        if self.image_levels is not None:
            out.append(f"{self.component:>14s} 8-bit image: max {self.image_levels} level(s) from FP32")
        return out


# --------------------------------------------------------------------------------------------------
# Graph optimisation


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def non_standard_ops(model: onnx.ModelProto) -> set[str]:
    """Operators outside the ONNX domain: TensorRT's parser has no importer for them."""
    return {f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}


def fusion_options(model_type: str, fusion_set: str) -> Any:
    from onnxruntime.transformers.fusion_options import FusionOptions

    if fusion_set not in FUSION_SETS:
        raise ValueError(f"fusion set '{fusion_set}' is not one of {FUSION_SETS}")
    options = FusionOptions(model_type)
    if fusion_set == "portable":
        for flag in _CONTRIB_FUSION_FLAGS:
            if hasattr(options, flag):
                setattr(options, flag, False)
    return options


def optimize_graph(model_path: Path, component: str, fusion_set: str) -> tuple[Any, dict[str, int], int]:
    """ONNX Runtime's transformer optimizer on the FP32 graph (python fusions only, no session).

    Returns the optimised `OnnxModel`, the fused operators it created and the node count before.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[component]
    before = op_counts(onnx.load(str(model_path), load_external_data=False))
    with _quiet_optimizer():
        optimized = optimize_model(
            str(model_path),
            model_type=model_type,
            opt_level=0,
            optimization_options=fusion_options(model_type, fusion_set),
            use_gpu=True,
        )
    after = op_counts(optimized.model)
    fused = {op: after[op] - before[op] for op in FUSED_OPS if after[op] > before[op]}
    if fusion_set == "portable" and non_standard_ops(optimized.model):
        raise RuntimeError(
            f"{component}: the portable fusion set produced {sorted(non_standard_ops(optimized.model))}"
        )
    return optimized, fused, sum(before.values())


@contextlib.contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """The optimizer's modules log every pass at INFO under top-level names; keep warnings only."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


# --------------------------------------------------------------------------------------------------
# FP16 conversion and its storage emulation


def convert_to_fp16(
    optimized: Any, op_block_list: Sequence[str], node_block_list: Sequence[str] = ()
) -> onnx.ModelProto:
    """FP16 weights and activations; FP32 inputs/outputs; the blocked operators and nodes stay FP32.

    Uses onnxruntime.transformers' converter (onnxconverter-common's, extended to contrib operators and
    symbolic shape inference, which has no 2 GB limit).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(op_block_list))
    optimized.convert_float_to_float16(
        keep_io_types=True, op_block_list=blocked, node_block_list=list(node_block_list)
    )
    return optimized.model


def sinusoid_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes computing the arguments of Sin/Cos (the timestep embeddings), and Sin/Cos themselves.

    In FP16 a timestep near 1000 times a frequency is rounded to a multiple of 0.5 radian: the measured
    sin/cos error reaches 0.2 on the tiny UNet. diffusers computes `Timesteps` in FP32 and casts after;
    these nodes do the same. The walk goes back from each Sin/Cos to constants and integer inputs; a
    Sin/Cos that depends on a float graph input (an activation) is left alone.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    float_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type != TensorProto.INT64}
    selected: set[str] = set()
    for start in (n for n in graph.node if n.op_type in ("Sin", "Cos")):
        path, stack, seen = [start], [start], {start.name}
        touches_activation = False
        while stack:
            node = stack.pop()
            for name in node.input:
                touches_activation |= name in float_inputs
                producer = producers.get(name)
                if producer is None or producer.op_type in ("Shape", "Size"):
                    continue  # shape arithmetic reads sizes, not values
                if producer.name not in seen:
                    seen.add(producer.name)
                    path.append(producer)
                    stack.append(producer)
        if not touches_activation:
            selected.update(node.name for node in path)
    return sorted(selected)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {
        vi.name: vi.type.tensor_type.elem_type for vi in (*graph.value_info, *graph.input, *graph.output)
    }
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


class UntypedTensors(RuntimeError):
    """Shape inference left tensors without a type: the check cannot tell whether they are stored in FP16."""


def infer_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of `model`, after symbolic shape inference; raise UntypedTensors for
    any node output left without one (such a tensor would silently escape the FP16 emulation)."""
    from onnxruntime.transformers.shape_infer_helper import SymbolicShapeInferenceHelper

    graph = model.graph
    try:
        inferred = SymbolicShapeInferenceHelper(model).infer_shapes(
            model, auto_merge=True, guess_output_rank=False
        )
    except Exception as error:  # noqa: BLE001 - reported with the consequence, not swallowed
        raise UntypedTensors(
            f"symbolic shape inference failed ({error!r}); the FP16 check needs every tensor's type"
        ) from error
    if inferred is not None:
        known = {vi.name for vi in graph.value_info}
        for vi in inferred.graph.value_info:
            if vi.name not in known and vi.type.tensor_type.elem_type:
                graph.value_info.append(vi)
    types = _tensor_types(model)
    untyped = [out for node in graph.node for out in node.output if out and not types.get(out)]
    if untyped:
        raise UntypedTensors(
            f"{len(untyped)} tensors have no type after shape inference ({', '.join(untyped[:5])}"
            f"{', ...' if len(untyped) > 5 else ''}): the FP16 check cannot tell whether they are FP16"
        )
    return types


# Normalisations whose statistics the check measures, and what each reduces: the axes from `axis` on of
# its input (after a reshape to groups for GroupNormalization).
_NORM_STAT_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization")
# InstanceNormalization (GroupNorm as exported) and GroupNormalization reduce image axes; LayerNormalization
# reduces channels only (the trailing axes).
SPATIAL_NORMALISATIONS = frozenset({"InstanceNormalization", "GroupNormalization"})


def _norm_stat_nodes(
    node: onnx.NodeProto, index: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str, str]:
    """Nodes computing (largest sum of x^2 over one statistic, elements per statistic) of a normalisation.

    A kernel computing its statistics in FP16 accumulates exactly that sum: it overflows above 65504.
    """
    x = node.input[0]
    tag = f"{index}::{node.name or node.op_type}"
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    source = x
    if node.op_type == "GroupNormalization":
        groups = next(a.i for a in node.attribute if a.name == "num_groups")
        shape = numpy_helper.from_array(np.array([0, groups, -1], np.int64), f"normstat::{tag}::groups")
        initializers.append(shape)
        nodes.append(helper.make_node("Reshape", [x, shape.name], [f"normstat::{tag}::grouped"]))
        source, axis = f"normstat::{tag}::grouped", 2
    elif node.op_type == "InstanceNormalization":
        axis = 2
    else:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    flat = f"normstat::{tag}::flat"
    axes = numpy_helper.from_array(np.array([1], np.int64), f"normstat::{tag}::axes")
    index_one = numpy_helper.from_array(np.array(1, np.int64), f"normstat::{tag}::one")
    initializers += [axes, index_one]
    sums, count = f"normsumsq::{tag}", f"normcount::{tag}"
    nodes += [
        helper.make_node("Flatten", [source], [flat], axis=axis),
        helper.make_node("Mul", [flat, flat], [f"{flat}::sq"]),
        helper.make_node("ReduceSum", [f"{flat}::sq", axes.name], [f"{flat}::sums"], keepdims=0),
        helper.make_node("ReduceMax", [f"{flat}::sums"], [sums], keepdims=0),
        helper.make_node("Shape", [flat], [f"{flat}::shape"]),
        helper.make_node("Gather", [f"{flat}::shape", index_one.name], [count], axis=0),
    ]
    return nodes, initializers, sums, count


def emulate_fp16_storage(model16: onnx.ModelProto, *, record_peaks: bool = True) -> onnx.ModelProto:
    """An FP32 graph that rounds to FP16 exactly where `model16` stores FP16 tensors.

    Every FP16 initializer and constant becomes its (exact) FP32 value; every node output typed FP16
    is followed by Cast(FP16) -> Cast(FP32). With `record_peaks`, each such tensor also feeds an
    `absmax::<name>` output (max |value| before rounding) so the check can report the headroom to 65504,
    and each normalisation feeds `normsumsq::<node>` / `normcount::<node>` (the largest sum of squares
    one of its statistics accumulates, and over how many elements). Every tensor must have a type
    (UntypedTensors otherwise). Run it with graph optimisations disabled, or the cast pairs may be
    folded away.
    """
    model = copy.deepcopy(model16)
    graph = model.graph
    types = infer_types(model)

    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT16:
            tensor.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
            )

    new_nodes: list[onnx.NodeProto] = []
    peaks: list[str] = []
    stats: list[str] = []
    for index, node in enumerate(graph.node):
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise NotImplementedError(f"{node.name}: subgraphs are not emulated")
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                value = numpy_helper.to_array(attribute.t).astype(np.float32)
                attribute.t.CopyFrom(numpy_helper.from_array(value, attribute.t.name))
        if node.op_type == "Constant":
            new_nodes.append(node)  # constant values are exact in FP32; nothing to round
            continue
        if record_peaks and node.op_type in _NORM_STAT_OPS:
            extra, constants, sums, count = _norm_stat_nodes(node, index)
            new_nodes += extra
            graph.initializer.extend(constants)
            stats += [sums, count]
        produces_fp16 = (
            node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == TensorProto.FLOAT16
        )
        if node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                    attribute.i = TensorProto.FLOAT
        new_nodes.append(node)
        for out_index, name in enumerate(node.output):
            if not name or not (produces_fp16 or types.get(name) == TensorProto.FLOAT16):
                continue
            raw = f"{name}::fp32"
            node.output[out_index] = raw
            new_nodes.append(helper.make_node("Cast", [raw], [f"{name}::fp16"], to=TensorProto.FLOAT16))
            new_nodes.append(helper.make_node("Cast", [f"{name}::fp16"], [name], to=TensorProto.FLOAT))
            if record_peaks:
                peak = f"absmax::{name}"
                new_nodes.append(helper.make_node("Abs", [raw], [f"{name}::abs"]))
                new_nodes.append(helper.make_node("ReduceMax", [f"{name}::abs"], [peak], keepdims=0))
                peaks.append(peak)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # FP16 types are stale; ONNX Runtime infers the rest
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    graph.output.extend(helper.make_tensor_value_info(p, TensorProto.FLOAT, []) for p in peaks)
    graph.output.extend(
        helper.make_tensor_value_info(
            name, TensorProto.INT64 if name.startswith("normcount::") else TensorProto.FLOAT, []
        )
        for name in stats
    )
    return model


def normalisation_statistics(
    results: Mapping[str, np.ndarray], node_types: Mapping[str, str], area_ratio: float
) -> dict[str, Any]:
    """The normalisation whose statistics come nearest to FP16's range at the largest served size.

    Each statistic of a normalisation sums x^2 over the elements it reduces: over image axes for
    Instance/GroupNormalization (so the sum grows with the image area: `area_ratio` = largest served
    area / checked area), over channels for LayerNormalization. A kernel keeping that sum in FP16
    overflows above 65504, whatever the error at a small size said.
    """
    worst: dict[str, Any] = {}
    for name, value in results.items():
        if not name.startswith("normsumsq::"):
            continue
        tag = name.removeprefix("normsumsq::")
        op_type = node_types[tag]
        scale = area_ratio if op_type in SPATIAL_NORMALISATIONS else 1.0
        count = int(results[f"normcount::{tag}"])
        at_max = float(value) * scale
        if not worst or at_max > worst["sum_of_squares_at_max"]:
            worst = {
                "node": tag.split("::", 1)[1],
                "op_type": op_type,
                "elements": count,
                "elements_at_max": round(count * scale),
                "sum_of_squares": float(value),
                "sum_of_squares_at_max": at_max,
            }
    return worst


def peak_activation(peaks: dict[str, float], op_types: dict[str, str]) -> dict[str, Any]:
    """The largest finite |value| stored in FP16, and the tensors that do not fit FP16 at all.

    Attention masks legitimately saturate (-inf or finfo.min fills); anything else in `saturated`
    overflowed and shows up as Inf/NaN in the outputs, which fails the check.
    """
    finite = {name: value for name, value in peaks.items() if value < FP16_MAX}
    saturated = sorted(name for name in peaks if name not in finite)
    if not finite:
        return {"saturated": saturated}
    tensor = max(finite, key=finite.__getitem__)
    value = finite[tensor]
    return {
        "value": value,
        "tensor": tensor,
        "op_type": op_types.get(tensor, "?"),
        "headroom": FP16_MAX / value if value else float("inf"),
        "saturated": [f"{name} ({op_types.get(name, '?')})" for name in saturated],
    }


def normalisation_inputs(model16: onnx.ModelProto) -> set[str]:
    """The FP16 tensors normalisations read (through the Cast a blocked normalisation gets)."""
    producers = {out: node for node in model16.graph.node for out in node.output}
    names = set()
    for node in model16.graph.node:
        if node.op_type in NORMALISATIONS and node.input:
            name = node.input[0]
            producer = producers.get(name)
            while producer is not None and producer.op_type == "Cast":
                name = producer.input[0]
                producer = producers.get(name)
            names.add(name)
    return names


def _node_types_by_output(model16: onnx.ModelProto) -> dict[str, str]:
    return {out: node.op_type for node in model16.graph.node for out in node.output}


# --------------------------------------------------------------------------------------------------
# Measurement


def emulation_session(model: onnx.ModelProto | Path, providers: Sequence[str] | None = None) -> Any:
    """A session with graph optimisations off: the emulation's cast pairs must survive.

    Priority-based execution order: with the default order ONNX Runtime ran every `absmax` branch (a leaf
    feeding a graph output) last, keeping every raw activation alive until the end (8 GB instead of
    1 GB for the tiny MoVQ decoder at 768 px; released sizes would not fit). No arena either: the
    emulation allocates once per tensor size, and an arena only keeps the memory.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]))


def image_levels(reference: np.ndarray, candidate: np.ndarray) -> int:
    """Largest difference in 8-bit levels after the pipeline's postprocessing ([-1, 1] -> uint8)."""

    def to_uint8(x: np.ndarray) -> np.ndarray:
        return np.round(np.clip(x.astype(np.float64) * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.int64)

    if not np.isfinite(candidate).all():
        return 255
    return int(np.abs(to_uint8(reference) - to_uint8(candidate)).max())


@dataclass
class CheckInputs:
    """The inputs of one FP16 check, the FP32 graph's outputs for them, and the size they were made at."""

    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    size: tuple[int, int] = (0, 0)  # (height, width) of the recorded run
    max_size: int = 0  # the largest image side the engines will serve (normalisation statistics)

    @property
    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.inputs.items()}

    @property
    def area_ratio(self) -> float:
        """Largest served image area over the checked one: how much a spatial statistic's sum grows."""
        if not all(self.size) or not self.max_size:
            return 1.0
        return max(1.0, self.max_size**2 / (self.size[0] * self.size[1]))


def check_size_for(
    dims: ModelDims, size: tuple[int, int] | None, max_size: int | None
) -> tuple[tuple[int, int], int]:
    """(height, width) of the check and the largest served side: the engines' optimum unless told."""
    largest = max_size or MAX_IMAGE_SIZE
    settings = ProfileSettings.for_max_size(largest)
    height, width = size or settings.optimum()
    for side in (height, width, largest):
        if side <= 0 or side % dims.size_multiple:
            raise ValueError(f"image side {side} is not a positive multiple of {dims.size_multiple}")
    return (height, width), largest


def check_inputs(fp32_path: Path, component: str, run: RecordedRun, max_size: int = 0) -> CheckInputs:
    """The inputs `component` got in the recorded run, and the FP32 ONNX outputs for them."""
    inputs = calibration.check_inputs(run, component)
    reference = run_session(onnx_session(fp32_path), inputs)
    return CheckInputs(inputs, reference, run.size, max_size)


def measure_fp16(
    component: str,
    model16_path: Path,
    check: CheckInputs,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    tolerance: float = FP16_TOLERANCE,
) -> tuple[list[ParityReport], dict[str, Any], int | None]:
    """FP16-vs-FP32 reports: storage emulation (standard graphs) and native runs on `providers`."""
    spec = COMPONENTS[component]
    model16_path = Path(model16_path)
    model16 = onnx.load(str(model16_path))  # with its external data: the emulation needs the weights
    reports: list[ParityReport] = []
    peak: dict[str, Any] = {}
    output_names = [t.name for t in spec.outputs]
    candidates: dict[str, dict[str, np.ndarray]] = {}
    if not non_standard_ops(model16):
        # through a file: the FP32 emulation of a released-size UNet is over protobuf's 2 GB limit
        with tempfile.TemporaryDirectory(dir=model16_path.parent.parent) as tmp:
            emulated_path = Path(tmp) / "emulated" / "model.onnx"
            save_model(emulate_fp16_storage(model16), emulated_path)
            emulated = emulation_session(emulated_path)
            names = [o.name for o in emulated.get_outputs()]
            results = dict(zip(names, emulated.run(names, check.inputs), strict=True))
            del emulated
        candidates["fp16-storage"] = {n: results[n] for n in output_names}
        peaks = {n.removeprefix("absmax::"): float(v) for n, v in results.items() if n.startswith("absmax::")}
        peak = peak_activation(peaks, _node_types_by_output(model16))
        norm_types = {
            f"{i}::{n.name or n.op_type}": n.op_type
            for i, n in enumerate(model16.graph.node)
            if n.op_type in _NORM_STAT_OPS
        }
        area = check.area_ratio if has_spatial_axes(spec) else 1.0
        peak["normalisation_statistics"] = normalisation_statistics(results, norm_types, area)
        norm_peaks = [peaks[n] for n in normalisation_inputs(model16) if n in peaks]
        peak["normalisation_input"] = max(norm_peaks) if norm_peaks else 0.0
    for provider in providers:
        try:
            session = onnx_session(model16_path, providers=[provider])
        except Exception as error:  # noqa: BLE001 - a clear message is worth more than the ORT trace
            raise RuntimeError(
                f"{component}: the FP16 graph does not load on {provider} ({str(error).splitlines()[0]}); "
                "graphs with CUDA-only fusions must be checked with providers=['CUDAExecutionProvider']"
            ) from error
        if provider not in session.get_providers():  # ONNX Runtime fell back to another provider
            raise ProviderUnavailable(
                f"{component}: ONNX Runtime did not run the FP16 graph on {provider} "
                f"(it used {session.get_providers()}): not a check on {provider}"
            )
        label = (
            "fp16"
            if provider == "CPUExecutionProvider"
            else f"fp16-{provider.removesuffix('ExecutionProvider').lower()}"
        )
        candidates[label] = run_session(session, check.inputs)
    for label, outputs in candidates.items():
        reports += compare_outputs(component, label, check.reference, outputs, tolerance, check.shapes)
    levels = None
    if "image" in output_names and "height" in spec.output("image").shape:
        levels = max(image_levels(check.reference["image"], out["image"]) for out in candidates.values())
    return reports, peak, levels


# --------------------------------------------------------------------------------------------------
# One component, a whole bundle


def save_model(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write `model` to `path` (its folder is replaced), with one external-data file when over 2 GB."""
    if path.parent.exists():
        shutil.rmtree(path.parent)
    path.parent.mkdir(parents=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_NAME,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return sorted(p.name for p in path.parent.iterdir() if p.is_file())


def convert_component(
    bundle: Path,
    component: str,
    *,
    fusion_set: str = "portable",
    op_block_list: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    check_size: tuple[int, int] | None = None,
    max_size: int | None = None,
    tolerance: float = FP16_TOLERANCE,
    run: RecordedRun | None = None,
) -> Fp16Result:
    """Optimise, convert and check one component; writes `<bundle>/<component>/<variant>/model.onnx`
    (`VARIANT_DIRS[fusion_set]`: the portable and the CUDA-fused variants live side by side).

    `providers`: where the FP16 graph is checked natively (default `DEFAULT_PROVIDERS[fusion_set]`);
    a check that cannot run there is refused before anything is written (`check_providers`).

    The check runs on the inputs the component gets in a short real run of the bundle at `check_size`
    (default: the engines' optimum for `max_size`); `run` passes a recorded run to share between
    components. With `op_block_list=None`, the lists of `BLOCK_LADDER` are tried in order and the first
    that passes is kept (the last one when none passes; the result then reports `default_precision ==
    "fp32"`).
    """
    if fusion_set not in FUSION_SETS:
        raise ValueError(f"fusion set '{fusion_set}' is not one of {FUSION_SETS}")
    providers = tuple(providers or DEFAULT_PROVIDERS[fusion_set])
    check_providers(fusion_set, providers)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    dims = ModelDims.from_dict(manifest["dims"])
    size, largest = check_size_for(dims, check_size, max_size)
    fp32_path = bundle / component / ONNX_FILE
    variant_dir = VARIANT_DIRS[fusion_set]
    target = bundle / component / variant_dir / ONNX_FILE
    if run is None:
        run = record_run(bundle, size)
    check = check_inputs(fp32_path, component, run, largest)
    ladder = [tuple(op_block_list)] if op_block_list is not None else list(BLOCK_LADDER)

    with tempfile.TemporaryDirectory(dir=bundle / component) as tmp:
        optimized, fused, nodes_before = optimize_graph(fp32_path, component, fusion_set)
        optimized_path = Path(tmp) / "optimized.onnx"
        for index, node in enumerate(optimized.model.graph.node):  # node block lists need names
            node.name = node.name or f"{node.op_type}_{index}"
        fp32_nodes = sinusoid_nodes(optimized.model)
        save_model(optimized.model, optimized_path)
        del optimized
        attempts: list[Fp16Attempt] = []
        hazards: list[str] = []
        for block in ladder:
            from onnxruntime.transformers.onnx_model import OnnxModel

            with _quiet_optimizer():
                model16 = convert_to_fp16(OnnxModel(onnx.load(str(optimized_path))), block, fp32_nodes)
            files = save_model(model16, target)
            reports, peak, levels = measure_fp16(
                component, target, check, providers=providers, tolerance=tolerance
            )
            hazards = normalisation_hazards(peak, block)
            passed = all(r.passed for r in reports) and not hazards
            attempts.append(
                Fp16Attempt(
                    op_block_list=sorted(block),
                    max_rel_error=max(r.max_rel_error for r in reports),
                    finite=all(r.finite for r in reports),
                    passed=passed,
                )
            )
            logger.info(
                "%s: FP32 ops %s -> max rel error %.3e%s",
                component,
                sorted(block) or "none",
                attempts[-1].max_rel_error,
                f" ({hazards[0]})" if hazards else "",
            )
            if passed:
                break
    present = {n.op_type for n in model16.graph.node}
    return Fp16Result(
        component=component,
        fusion_set=fusion_set,
        model_type=MODEL_TYPES[component],
        fused_ops=fused,
        nodes_before=nodes_before,
        nodes_after=len(model16.graph.node),
        op_block_list=sorted(set(block) & present),
        parity=reports,
        attempts=attempts,
        peak_activation=peak,
        image_levels=levels,
        standard_ops_only=not non_standard_ops(model16),
        source_sha256=onnx_digest(fp32_path),
        hazards=hazards,
        fp32_nodes=fp32_nodes,
        files=[f"{variant_dir}/{f}" for f in files],
    )


def normalisation_hazards(peak: Mapping[str, Any], block: Sequence[str]) -> list[str]:
    """Why normalisations must stay in FP32 although the measured error passed (empty: they need not).

    Judged by what they reduce: the largest sum of squares one statistic accumulates at the largest
    served size (see `normalisation_statistics`) must fit FP16, unless the normalisations run in FP32.
    """
    stats = peak.get("normalisation_statistics") or {}
    if set(NORMALISATIONS) & set(block) or not stats or stats["sum_of_squares_at_max"] <= FP16_MAX:
        return []
    return [
        f"{stats['op_type']} {stats['node']} sums x^2 over {stats['elements_at_max']} elements per statistic "
        f"at the largest size: {stats['sum_of_squares_at_max']:.3g} > {FP16_MAX:.0f} (FP16 statistics would "
        "overflow); keep normalisations in FP32"
    ]


# Bumped when the check itself changes (what it feeds, what it judges): variants of an older check are
# converted again.
CHECK_VERSION = 2


def convert_bundle(
    bundle: Path,
    components: Sequence[str] | None = None,
    *,
    fusion_set: str = "portable",
    op_block_list: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    check_size: tuple[int, int] | None = None,
    max_size: int | None = None,
    tolerance: float = FP16_TOLERANCE,
    force: bool = False,
) -> list[Fp16Result]:
    """FP16 variants of the bundle's components (or `components`), recorded in its manifest.

    Each fusion set has its own variant (`VARIANT_DIRS`): `cuda` adds `variants.fp16_cuda` and leaves the
    portable `variants.fp16` and `default_precision`, which the TensorRT engines read, as they were.

    A component whose FP16 variant was made from the current FP32 file with the same settings is
    skipped unless `force`. The others are checked on one short real run of the bundle (`calibration`)
    at `check_size` (default: the engines' optimum for `max_size`, the largest side served). A component
    that fails its check is not an error: its manifest entry gets `default_precision: fp32`, and the GPU
    flavours serve FP32 for it. Returns the converted ones.
    """
    if fusion_set not in FUSION_SETS:
        raise ValueError(f"fusion set '{fusion_set}' is not one of {FUSION_SETS}")
    providers = tuple(providers or DEFAULT_PROVIDERS[fusion_set])
    check_providers(fusion_set, providers)
    variant_dir = VARIANT_DIRS[fusion_set]
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    dims = ModelDims.from_dict(manifest["dims"])
    wanted = list(components or manifest["components"])
    unknown = [c for c in wanted if c not in manifest["components"]]
    if unknown:
        raise KeyError(f"not in the bundle: {unknown}; exported: {sorted(manifest['components'])}")
    size, largest = check_size_for(dims, check_size, max_size)
    settings = {
        "check": CHECK_VERSION,
        "fusion_set": fusion_set,
        "op_block_list": sorted(op_block_list) if op_block_list is not None else None,
        "providers": list(providers),
        "check_size": list(size),
        "max_size": largest,
        "tolerance": tolerance,
    }
    todo = []
    for component in wanted:
        variant = manifest["components"][component].get("variants", {}).get(variant_dir)
        if not force and _is_current(bundle / component, variant, settings):
            logger.info(
                "%s: FP16 %s variant is current (same FP32 source and settings); skipped",
                component,
                variant_dir,
            )
        else:
            todo.append(component)
    if not todo:
        return []
    logger.info("recording a %dx%d run of the bundle for the FP16 check of %s", *size, ", ".join(todo))
    run = record_run(bundle, size)
    results = []
    for component in tqdm(todo, desc="FP16 conversion", unit="component"):
        result = convert_component(
            bundle,
            component,
            fusion_set=fusion_set,
            op_block_list=op_block_list,
            providers=providers,
            check_size=size,
            max_size=largest,
            tolerance=tolerance,
            run=run,
        )
        for line in result.lines():
            logger.info("%s", line)
        record: dict[str, Any] = {
            "variants": {variant_dir: {**result.manifest_entry(), "settings": settings}}
        }
        if fusion_set == "portable":  # the precision every GPU flavour serves by default follows it
            record["default_precision"] = result.default_precision
        layout.update_component(bundle, component, **record)
        results.append(result)
    return results


def _is_current(component_dir: Path, variant: dict[str, Any] | None, settings: dict[str, Any]) -> bool:
    if not variant or variant.get("settings") != settings:
        return False
    if not all((component_dir / f).is_file() for f in variant.get("files", [])):
        return False
    return variant.get("source_sha256") == onnx_digest(component_dir / ONNX_FILE)
