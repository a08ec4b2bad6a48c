"""The engine-vs-ONNX check: every engine `kandinsky-export engines` builds is run at each of its profiles'
optima and compared with the FP32 ONNX graph it came from, before anything serves it.

Why. The FP16 step measures the FP16 *ONNX* against FP32; the engine is another program: TensorRT fuses
layers, picks FP16 or TF32 kernels per layer (`mixed` lets it choose the precision too) and tunes each
profile separately, so an engine can differ where its ONNX did not. Nothing else compares the two.

What. Per profile, the inputs are those the component really gets in a short generation at that
profile's optimum size (`calibration.record_run`: the bundle's own FP32 graphs on ONNX Runtime; the
per-step models' first, middle and last step), the reference is the FP32 ONNX on ONNX Runtime's CPU
provider, and the error is the FP16 check's: max |engine - FP32| over max(1, max |FP32|), per output.
NaN or Inf never passes, and neither does a check that compared nothing. The record goes into the
engine's sidecar (`check`); the build fails when any engine fails, and the repository generator refuses
an engine whose record is missing or failed.

Where. This module is plain Python (numpy, ONNX Runtime): it takes the engine through `EngineRunner`,
which `tensorrt_engine.TensorRTRunner` implements on a GPU; the tests drive the judgement and the
recording with a stand-in runner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from kandinsky_core.bundle import ONNX_FILE
from kandinsky_core.components import COMPONENTS

from . import calibration
from .fp16 import FP16_TOLERANCE
from .onnx_export import compare_outputs, onnx_session, run_session

logger = logging.getLogger(__name__)

# An engine computes in FP16 (strongly typed FP16 ONNX, `mixed`) or TF32 (`fp32`): both keep 10-11
# significant bits, as the FP16 ONNX variant does, so its error against FP32 is of the FP16 check's
# order and is judged on the same scale with the same bound. An overflow or a wrong fusion (errors of
# order 1, NaN, Inf) fails.
ENGINE_TOLERANCE = FP16_TOLERANCE
REFERENCE_PROVIDER = "CPUExecutionProvider"
CHECK_INPUTS = "recorded run at the profile's optimum (calibration.record_run)"


class EngineRunner(Protocol):
    """A loaded engine: what the check and the activation-memory record need from TensorRT."""

    def profile_count(self) -> int: ...

    def activation_bytes(self, profile: int) -> int:
        """Device memory one execution context needs for its activations on `profile`."""
        ...

    def run(self, profile: int, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the engine for `inputs`, executed on optimisation profile `profile`."""
        ...


class RecordedInputs:
    """Real inputs per component and image size, from one recorded run per size (kept for the build).

    `default_size` is the run used for models without image axes when no run was recorded yet.
    """

    def __init__(self, bundle: Path, default_size: tuple[int, int]) -> None:
        self.bundle = Path(bundle)
        self.default_size = default_size
        self.runs: dict[tuple[int, int], calibration.RecordedRun] = {}

    def inputs(self, component: str, size: tuple[int, int] | None) -> dict[str, np.ndarray]:
        """The component's check batch at `size` (None: any recorded size; the model has no image axes)."""
        if size is None:
            size = next(iter(self.runs), self.default_size)
        size = (int(size[0]), int(size[1]))
        if size not in self.runs:
            logger.info("recording a %dx%d run of the bundle's FP32 graphs for the engine checks", *size)
            self.runs[size] = calibration.record_run(self.bundle, size)
        return calibration.check_inputs(self.runs[size], component)


def check_engine(
    bundle: Path,
    component: str,
    profiles: Sequence[Mapping[str, Any]],
    engine: EngineRunner,
    inputs: RecordedInputs,
    tolerance: float = ENGINE_TOLERANCE,
) -> dict[str, Any]:
    """Run `engine` on every profile of the sidecar's `profiles` and compare with the FP32 ONNX.

    Returns the sidecar's `check` record (see `check_record`).
    """
    session = onnx_session(Path(bundle) / component / ONNX_FILE, [REFERENCE_PROVIDER])
    output_names = {t.name for t in COMPONENTS[component].outputs}
    measured = []
    for index, profile in enumerate(profiles):
        optimum = profile.get("optimum")
        feed = inputs.inputs(component, tuple(optimum) if optimum else None)
        reference = run_session(session, feed)
        candidate = engine.run(index, feed)
        missing = output_names - set(candidate)
        if missing:
            raise RuntimeError(f"{component}: the engine returned no {sorted(missing)} on profile {index}")
        shapes = {name: list(value.shape) for name, value in feed.items()}
        reports = compare_outputs(
            component, f"engine profile {index}", reference, candidate, tolerance, shapes
        )
        for report in reports:
            logger.info("%s", report.line())
        measured.append(
            {
                "profile": index,
                "size": list(optimum) if optimum else None,
                "shapes": shapes,
                "outputs": [
                    {
                        "output": r.output,
                        "max_abs_error": r.max_abs_error,
                        "max_rel_error": r.max_rel_error,
                        "finite": r.finite,
                    }
                    for r in reports
                ],
            }
        )
    return check_record(measured, tolerance)


def check_record(measured: Sequence[Mapping[str, Any]], tolerance: float) -> dict[str, Any]:
    """The sidecar's `check`: the measurements with each output's and the whole verdict.

    An output passes when it is finite and its relative error is within `tolerance`; the engine passes
    when every output of every profile does and there was at least one (a check of nothing fails).
    Non-finite numbers are written as null (JSON has no NaN); `finite` says so.
    """
    profiles = []
    for entry in measured:
        outputs = []
        for output in entry["outputs"]:
            finite = bool(output["finite"]) and all(
                _finite(output[key]) for key in ("max_abs_error", "max_rel_error")
            )
            passed = finite and float(output["max_rel_error"]) <= tolerance
            outputs.append(
                {
                    **output,
                    "max_abs_error": _number(output["max_abs_error"]),
                    "max_rel_error": _number(output["max_rel_error"]),
                    "finite": finite,
                    "passed": passed,
                }
            )
        profiles.append({**entry, "outputs": outputs})
    verdicts = [o["passed"] for p in profiles for o in p["outputs"]]
    return {
        "reference": f"{ONNX_FILE} (FP32) on ONNX Runtime {REFERENCE_PROVIDER}",
        "inputs": CHECK_INPUTS,
        "tolerance": tolerance,
        "passed": bool(verdicts) and all(verdicts),
        "profiles": profiles,
    }


def worst_output(check: Mapping[str, Any]) -> str:
    """The failing (or else the largest) error of a check record, in words, for messages."""
    if not check:
        return "no engine-vs-ONNX check recorded"
    rows = [(p, o) for p in check.get("profiles", []) for o in p["outputs"]]
    if not rows:
        return "nothing was compared"
    failing = [(p, o) for p, o in rows if not o["passed"]] or rows
    profile, output = max(
        failing, key=lambda row: math.inf if row[1]["max_rel_error"] is None else row[1]["max_rel_error"]
    )
    size = "x".join(str(s) for s in profile["size"]) if profile.get("size") else "any size"
    error = "NaN/Inf" if not output["finite"] else f"max rel error {output['max_rel_error']:.3e}"
    return f"{output['output']} on profile {profile['profile']} ({size}): {error}, tolerance {check['tolerance']:.0e}"


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _number(value: Any) -> float | None:
    return float(value) if _finite(value) else None
