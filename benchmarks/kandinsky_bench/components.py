"""Each exported component on its own: PyTorch eager vs ONNX Runtime on the very same inputs.

The PyTorch side is the wrapper the exporter traced (`modules.build_wrapper`), so both sides compute the
same function; the inputs come from `modules.sample_inputs` at the batch the text-to-image pipeline uses
(classifier-free guidance doubles the text encoder, prior and UNet batches).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from kandinsky_core.components import COMPONENTS, ComponentSpec

from .stats import speedup, summarize
from .timing import time_alternating

logger = logging.getLogger(__name__)

# Components whose batch is doubled by classifier-free guidance in text-to-image.
CFG_COMPONENTS = frozenset({"text_encoder", "prior", "unet", "unet_inpaint", "unet_controlnet"})

OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtVariant:
    """ONNX Runtime session settings under test; the defaults are what the served models use."""

    opt_level: str = "all"
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    allow_spinning: bool = True  # ONNX Runtime's default: idle pool threads spin before sleeping
    provider: str = "CPUExecutionProvider"

    @property
    def label(self) -> str:
        threads = self.intra_op_threads or "default"
        spin = "" if self.allow_spinning else ", no spin"
        provider = "" if self.provider == "CPUExecutionProvider" else f", {self.provider}"
        return f"ort[{self.opt_level}, threads {threads}{spin}{provider}]"


def ort_session(path: Path, variant: OrtVariant) -> Any:
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = levels[variant.opt_level]
    if variant.intra_op_threads:
        options.intra_op_num_threads = variant.intra_op_threads
    if not variant.allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=[variant.provider])


def component_batch(component: str, images: int) -> int:
    """The batch `component` sees when one request asks for `images` images (no negative prompt)."""
    return 2 * images if component in CFG_COMPONENTS else images


def input_shapes(inputs: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {name: list(value.shape) for name, value in inputs.items()}


def bench_component(
    checkpoint: Any,
    bundle: Path,
    component: str,
    *,
    images: int,
    height: int,
    width: int,
    warmup: int,
    repeats: int,
    variants: list[OrtVariant],
    torch_device: str = "cpu",
    torch_sweep_threads: tuple[int, ...] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Time one component in PyTorch eager and under each ONNX Runtime variant; check they agree.

    The runners take turns (one call each per round), so on a shared machine a change of load hits
    all of them alike. `torch_sweep_threads`: also time PyTorch with these thread counts.
    """
    import torch
    from kandinsky_export.modules import build_wrapper, sample_inputs, to_torch

    spec: ComponentSpec = COMPONENTS[component]
    batch = component_batch(component, images)
    vocab = checkpoint.config("text_encoder")["vocab_size"]
    inputs = sample_inputs(
        spec, checkpoint.dims, batch=batch, height=height, width=width, seed=0, vocab_size=vocab
    )
    wrapper = build_wrapper(component, checkpoint.load_component(component)).to(torch_device)
    torch_inputs = {k: v.to(torch_device) for k, v in to_torch(inputs).items()}
    default_threads = torch.get_num_threads()

    def torch_runner(threads: int) -> Callable[[], Any]:
        def run() -> Any:
            torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    out = wrapper(**torch_inputs)
                if torch_device == "cuda":
                    torch.cuda.synchronize()
                return out
            finally:
                torch.set_num_threads(default_threads)

        return run

    runners: dict[str, Callable[[], Any]] = {"torch": torch_runner(default_threads)}
    for threads in torch_sweep_threads:
        runners[f"torch-{threads}"] = torch_runner(threads)
    sessions = {}
    for variant in variants:
        session = ort_session(Path(bundle) / component / "model.onnx", variant)
        names = [o.name for o in session.get_outputs()]
        sessions[variant.label] = (variant, session, names)
        runners[variant.label] = lambda s=session, n=names: s.run(n, inputs)

    durations = time_alternating(runners, warmup=warmup, repeats=repeats, desc=component, progress=progress)

    out = runners["torch"]()
    reference = [o.float().cpu().numpy() for o in (out if isinstance(out, tuple) else (out,))]
    torch_p50 = summarize(durations["torch"])["p50"]
    result: dict[str, Any] = {
        "component": component,
        "batch": batch,
        "inputs": input_shapes(inputs),
        "torch": {
            "label": f"torch eager ({torch_device}, {default_threads} threads)",
            "threads": default_threads,
            **summarize(durations["torch"]),
        },
        "torch_sweep": [
            {
                "label": f"torch eager ({torch_device}, {threads} threads)",
                "threads": threads,
                **summarize(durations[f"torch-{threads}"]),
                "speedup_vs_torch": speedup(torch_p50, summarize(durations[f"torch-{threads}"])["p50"]),
            }
            for threads in torch_sweep_threads
        ],
        "onnxruntime": [],
    }
    for label, (variant, session, names) in sessions.items():
        outputs = session.run(names, inputs)
        diffs = [float(np.abs(o - r).max()) for o, r in zip(outputs, reference, strict=True)]
        scales = [max(1.0, float(np.abs(r).max())) for r in reference]
        summary = summarize(durations[label])
        result["onnxruntime"].append(
            {
                "label": label,
                "variant": asdict(variant),
                **summary,
                "speedup_vs_torch": speedup(torch_p50, summary["p50"]),
                "max_abs_diff": max(diffs),
                # relative to the output's scale, as the exporter's parity check measures it
                "max_rel_diff": max(d / scale for d, scale in zip(diffs, scales, strict=True)),
            }
        )
    logger.info(
        "%s: torch p50 %.4fs, %s",
        component,
        torch_p50,
        ", ".join(f"{r['label']} p50 {r['p50']:.4f}s" for r in result["onnxruntime"]),
    )
    return result


def ort_variants(sweep: bool, cores: int, cuda: bool) -> list[OrtVariant]:
    """The served settings first; with `sweep`, the settings the investigation compares."""
    variants = [OrtVariant()]
    if cuda:
        variants.append(OrtVariant(provider="CUDAExecutionProvider"))
    if sweep:
        variants += [OrtVariant(opt_level=level) for level in ("disable", "basic", "extended")]
        variants += [OrtVariant(intra_op_threads=1), OrtVariant(allow_spinning=False)]
        if cores > 2:
            variants.append(OrtVariant(intra_op_threads=cores))
    return variants
