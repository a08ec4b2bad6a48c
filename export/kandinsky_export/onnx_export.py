"""Export components to ONNX, check each against PyTorch, and write the export bundle (layout: bundle.py).

The bundle is everything the model-repository generator needs, and nothing that needs torch. Its
manifest is written last, and only when every component passed its parity check: a bundle without a
manifest is never converted, built or served (`bundle.read_manifest` refuses it). An export that fails
leaves `export_failed.json` saying what failed instead.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from kandinsky_core import bundle as layout
from kandinsky_core.bundle import EXTERNAL_DATA_NAME, EXTERNAL_DATA_THRESHOLD, ONNX_FILE
from kandinsky_core.components import COMPONENTS, INPAINT_MOVQ_COMPONENTS, UNET_CONTROLNET, ComponentSpec
from tqdm.auto import tqdm

from .checkpoint import Checkpoint
from .controlnet import check_controlnet_movq, check_controlnet_unet
from .inpaint_movq import movq_record, own_movq_components
from .memory import measure_bundle
from .modules import build_wrapper, sample_inputs, to_torch
from .tokenizer import tokenizer_bundle, write_tokenizer_bundle

logger = logging.getLogger(__name__)

ONNX_OPSET = 18

# FP32 ONNX Runtime vs PyTorch: both compute in float32 (eps 1.2e-7) and differ only by operator
# fusion and summation order. Errors grow with depth to ~1e-6 relative on these graphs; 1e-4 of the
# output's scale leaves headroom for the 48-layer encoders while a wrong op (errors of 1e-2 and up) fails.
FP32_TOLERANCE = 1e-4


@dataclass
class ParityReport:
    component: str
    precision: str
    output: str
    max_abs_error: float
    max_rel_error: float  # max |a-b| / max(1, max |reference|)
    tolerance: float
    shapes: dict[str, list[int]]
    finite: bool

    @property
    def passed(self) -> bool:
        return self.finite and self.max_rel_error <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (
            f"{self.component:>14s} [{self.precision}] {self.output:>26s}: max abs {self.max_abs_error:.3e}, "
            f"max rel {self.max_rel_error:.3e} (tolerance {self.tolerance:.0e}) {verdict}"
        )


def compare_outputs(
    component: str,
    precision: str,
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    tolerance: float,
    shapes: dict[str, list[int]],
) -> list[ParityReport]:
    """One report per output; NaN or Inf in the candidate always fails."""
    reports = []
    for name, ref in reference.items():
        got = candidate[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        if got.shape != ref64.shape:
            raise AssertionError(f"{component}.{name}: shape {got.shape} != reference {ref64.shape}")
        finite = bool(np.isfinite(got).all())
        diff = np.abs(got - ref64) if finite else np.array([np.inf])
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = max(1.0, float(np.abs(ref64).max()) if ref64.size else 1.0)
        reports.append(
            ParityReport(component, precision, name, max_abs, max_abs / scale, tolerance, shapes, finite)
        )
    return reports


def torch_reference(wrapper: torch.nn.Module, spec: ComponentSpec, inputs: dict[str, np.ndarray]) -> dict:
    with torch.inference_mode():
        out = wrapper(**to_torch(inputs))
    outs = out if isinstance(out, tuple) else (out,)
    return {t.name: o.detach().float().numpy() for t, o in zip(spec.outputs, outs, strict=True)}


def onnx_session(path: Path, providers: list[str] | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def run_session(session: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def save_onnx(model_path: Path) -> None:
    """Re-save an exported model: one file, or one external-data file when over the protobuf limit.

    The exporter's per-tensor data files next to it are removed; folders (the FP16 variant, the engine
    of a previous export) are left to their own steps, which see from the source digest that they are stale.
    """
    model = onnx.load(str(model_path), load_external_data=True)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    for stale in model_path.parent.iterdir():
        if stale != model_path and not stale.is_dir():
            stale.unlink()
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(model_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_NAME,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(model_path))
    for written in model_path.parent.iterdir():
        written.chmod(0o644)  # onnx writes external data 0600; a server running as another user must read it


def export_component(
    checkpoint: Checkpoint,
    component: str,
    out_dir: Path,
    *,
    export_size: tuple[int, int] | None = None,
    check_size: tuple[int, int] | None = None,
) -> list[ParityReport]:
    """Export one component to `<out_dir>/<component>/model.onnx` and check it against PyTorch.

    It is traced at one batch and size and checked at another, so the dynamic axes are exercised.
    """
    spec = COMPONENTS[component]
    dims = checkpoint.dims
    base = dims.size_multiple
    export_h, export_w = export_size or (2 * base, 2 * base)
    check_h, check_w = check_size or (2 * base, 3 * base)
    vocab = checkpoint.config("text_encoder")["vocab_size"]
    model = checkpoint.load_component(component)
    if component == UNET_CONTROLNET.name:
        check_controlnet_unet(dict(model.config), dims)
        check_controlnet_movq(checkpoint)
    wrapper = build_wrapper(component, model)

    trace_inputs = sample_inputs(
        spec, dims, batch=2, height=export_h, width=export_w, seed=0, vocab_size=vocab
    )
    target_dir = Path(out_dir) / component
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / ONNX_FILE
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        tmp_model = Path(tmp) / ONNX_FILE
        with torch.inference_mode(), warnings.catch_warnings():
            # Shape-dependent Python branches are traced as constants; the parity check below, at
            # another batch and size, is what shows the graph generalises.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper,
                tuple(to_torch(trace_inputs).values()),
                str(tmp_model),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes={t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs)},
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        for stale in target_dir.iterdir():
            if not stale.is_dir():
                stale.unlink()
        for produced in Path(tmp).iterdir():
            shutil.move(str(produced), target_dir / produced.name)
    save_onnx(target)

    check_inputs = sample_inputs(spec, dims, batch=3, height=check_h, width=check_w, seed=1, vocab_size=vocab)
    reference = torch_reference(wrapper, spec, check_inputs)
    got = run_session(onnx_session(target), check_inputs)
    shapes = {k: list(v.shape) for k, v in check_inputs.items()}
    del wrapper, model
    return compare_outputs(component, "fp32", reference, got, FP32_TOLERANCE, shapes)


def export_constants(checkpoint: Checkpoint, out_dir: Path) -> None:
    """The prior's un-normalisation constants and the negative image embedding of a zero image.

    diffusers recomputes `image_encoder(zeros)` on every call without a negative prompt; it depends only
    on the checkpoint, so it is computed once here and shipped with the repository.
    """
    target = Path(out_dir) / layout.CONSTANTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    prior = checkpoint.load_component("prior")
    np.save(target / "clip_mean.npy", prior.clip_mean.detach().float().numpy().reshape(-1))
    np.save(target / "clip_std.npy", prior.clip_std.detach().float().numpy().reshape(-1))
    del prior
    encoder = checkpoint.load_component("image_encoder")
    size = checkpoint.dims.image_size
    with torch.inference_mode():
        zero = encoder(pixel_values=torch.zeros(1, 3, size, size)).image_embeds
    np.save(target / "zero_image_embeds.npy", zero.float().numpy().reshape(-1))


def export_tokenizer(checkpoint: Checkpoint, out_dir: Path) -> None:
    """The served tokenizer's `tokenizer.json` + config, built from what the checkpoint holds.

    Written explicitly (tokenizer.py) rather than by a transformers re-save, which writes a
    `tokenizer.json` for slow-file checkpoints only in some versions.
    """
    tokenizer, config = tokenizer_bundle(
        lambda name: checkpoint.fetch("prior", f"{layout.TOKENIZER_DIR}/{name}", required=False),
        model_max_length=checkpoint.dims.text_seq_len,
    )
    write_tokenizer_bundle(Path(out_dir) / layout.TOKENIZER_DIR, tokenizer, config)


def export_image_processor(checkpoint: Checkpoint, out_dir: Path) -> None:
    """The prior's CLIPImageProcessor config, as the checkpoint holds it (read by `preprocess_clip_image`).

    Copied as JSON rather than re-saved through transformers, whose writer may add or rename keys.
    """
    target = Path(out_dir) / layout.IMAGE_PROCESSOR_CONFIG
    target.parent.mkdir(parents=True, exist_ok=True)
    config = checkpoint.read_json("prior", layout.IMAGE_PROCESSOR_CONFIG)
    target.write_text(json.dumps(config, indent=2) + "\n")


def export_bundle(
    checkpoint: Checkpoint,
    out_dir: Path,
    components: list[str] | None = None,
    allow_inpaint_movq_mismatch: bool = False,
    measure_memory: bool = True,
) -> list[ParityReport]:
    """Export every component the checkpoint has (or `components`), the constants and the manifest.

    The manifest is removed first and written last, only when every parity check passed; otherwise
    `export_failed.json` records the failures and RuntimeError is raised. An interrupted or failed export
    therefore never leaves a manifest that later steps (FP16, engines, the repository) would trust.
    Exporting a subset keeps the other components' entries of the previous manifest.
    The inpainting repo's own MoVQ is compared with the decoder's first (inpaint_movq.py): it is exported
    as `movq_*_inpaint` only where it differs (and not `allow_inpaint_movq_mismatch`), else shared.
    Each exported component's peak memory is measured at a few sizes (memory.py) for the CPU flavour's
    memory budget, unless not `measure_memory`.
    """
    movq = movq_record(checkpoint, allow_mismatch=allow_inpaint_movq_mismatch)
    own_movq = own_movq_components(movq)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_manifest(out_dir)
    layout.manifest_path(out_dir).unlink(missing_ok=True)
    (out_dir / layout.FAILED_EXPORT).unlink(missing_ok=True)
    wanted = components or [
        name
        for name, spec in COMPONENTS.items()
        if checkpoint.has(spec.checkpoint) and (name not in INPAINT_MOVQ_COMPONENTS or name in own_movq)
    ]
    reports: list[ParityReport] = []
    for component in tqdm(wanted, desc="exporting ONNX", unit="component"):
        component_reports = export_component(checkpoint, component, out_dir)
        for report in component_reports:
            logger.info("%s", report.line())
        reports += component_reports
    failed = [r for r in reports if not r.passed]
    if failed:
        layout.write_json(
            out_dir / layout.FAILED_EXPORT,
            {"failed": [r.line().strip() for r in failed], "reports": [asdict(r) for r in reports]},
        )
        raise RuntimeError(
            "ONNX parity failed (no manifest written):\n" + "\n".join(r.line() for r in failed)
        )
    export_constants(checkpoint, out_dir)
    export_tokenizer(checkpoint, out_dir)
    export_image_processor(checkpoint, out_dir)
    manifest = build_manifest(checkpoint, out_dir, wanted, reports, previous)
    if measure_memory:
        for component, entry in measure_bundle(out_dir, wanted, checkpoint.dims).items():
            manifest["components"][component]["memory"] = entry
    for stale in set(INPAINT_MOVQ_COMPONENTS) - set(own_movq) - set(wanted):
        manifest["components"].pop(stale, None)  # an earlier export's own MoVQ, now shared
    manifest["movq"] = movq
    layout.write_manifest(out_dir, manifest)
    return reports


def _previous_manifest(out_dir: Path) -> dict[str, Any]:
    """The components of an earlier successful export into the same folder (kept for subset exports)."""
    try:
        previous = layout.read_manifest(out_dir)
    except (FileNotFoundError, layout.BundleError, json.JSONDecodeError):
        return {"components": {}}
    return {"components": previous.get("components", {})}


def build_manifest(
    checkpoint: Checkpoint,
    out_dir: Path,
    components: list[str],
    reports: list[ParityReport],
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a passed export. Re-exported components lose their FP16 and engine records:
    those steps run again (and skip what their source digests say is still current)."""
    manifest: dict[str, Any] = {"components": dict((previous or {}).get("components", {}))}
    manifest["dims"] = asdict(checkpoint.dims)
    manifest["schedulers"] = {
        part: checkpoint.scheduler_config(part)
        for part in ("prior", "decoder", "decoder_inpaint", "controlnet")
        if checkpoint.has(part)
    }
    manifest["checkpoint"] = asdict(checkpoint)
    manifest["vocab_size"] = checkpoint.config("text_encoder")["vocab_size"]
    for component in components:
        files = sorted(
            p.name
            for p in (Path(out_dir) / component).iterdir()
            if p.is_file() and not p.name.startswith(".")
        )
        manifest["components"][component] = {
            "files": files,
            "precision": "fp32",
            "parity": [asdict(r) for r in reports if r.component == component],
        }
    return manifest
