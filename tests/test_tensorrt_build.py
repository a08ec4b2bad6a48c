"""Building real TensorRT engines: runs only where the `tensorrt` package and an NVIDIA GPU exist.

Elsewhere every test here is skipped with that reason (the profile, sidecar, rebuild and engine-check
logic is tested without TensorRT in tests/test_tensorrt_engine.py and tests/test_tensorrt_profiles.py).
Sizes are small (128 .. 256 px) so the recorded runs of the engine check stay short.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="the tensorrt package is not installed (NGC image or GPU host)")


def _gpu_available() -> bool:
    from kandinsky_export.tensorrt_engine import gpu_identity

    try:
        gpu_identity()
    except RuntimeError:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _gpu_available(), reason="no NVIDIA GPU visible to nvidia-smi or torch.cuda"),
]

COMPONENT = "unet"  # its tiny FP16 variant passes its check (docs/gpu.md): a strongly typed FP16 build


@pytest.fixture()
def bundle(tiny_bundle, tmp_path: Path) -> Path:
    from kandinsky_export.fp16 import convert_bundle

    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], target)
    convert_bundle(target, [COMPONENT], check_size=(128, 128))
    return target


def _settings():
    from kandinsky_core.profiles import ProfileSettings

    return ProfileSettings.for_max_size(256, min_size=128, opt_sizes=(128, 256))


def test_build_several_profiles_check_them_and_decide_rebuilds(bundle: Path) -> None:
    from kandinsky_core.components import COMPONENTS
    from kandinsky_export.tensorrt_engine import ProfileSettings, build_engines

    manifest = json.loads((bundle / "manifest.json").read_text())
    precision = manifest["components"][COMPONENT].get("default_precision", "fp32")
    static = ProfileSettings.for_max_size(256, min_size=128, static_size=(256, 256))
    (first,) = build_engines(bundle, [COMPONENT], settings=static)
    assert first.action == "built" and first.metadata["source"]["precision"] == precision
    assert first.metadata["build"]["strongly_typed"] == (precision == "fp16")
    assert first.check_passed, first.metadata["check"]
    (second,) = build_engines(bundle, [COMPONENT], settings=static)
    assert second.action == "up to date"
    (third,) = build_engines(bundle, [COMPONENT], settings=_settings())
    assert third.action == "built" and third.reason.startswith("profile")

    engine_dir = bundle / COMPONENT / "tensorrt"
    metadata = json.loads((engine_dir / "engine.json").read_text())
    entries = metadata["profile"]["profiles"]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((engine_dir / "model.plan").read_bytes())
    assert engine is not None and engine.num_optimization_profiles == len(entries) == 2
    for index, entry in enumerate(entries):  # the engine's profiles are the sidecar's, in its order
        for name, shapes in entry["inputs"].items():
            low, opt, high = (list(s) for s in engine.get_tensor_profile_shape(name, index))
            assert [low, opt, high] == [shapes["min"], shapes["opt"], shapes["max"]], (index, name)
    spec = COMPONENTS[COMPONENT]
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {t.name for t in (*spec.inputs, *spec.outputs)}
    assert metadata["tensorrt_version"] == trt.__version__
    assert (bundle / "tensorrt_timing.cache").stat().st_size > 0
    # TensorRT's activation memory per profile: the larger profile needs at least as much
    activation = metadata["activation_bytes"]
    assert len(activation) == 2 and 0 < activation[0] <= activation[1]
    check = metadata["check"]
    assert check["passed"] and [p["size"] for p in check["profiles"]] == [[128, 128], [256, 256]]
    assert all(
        o["finite"] and o["max_rel_error"] <= check["tolerance"]
        for p in check["profiles"]
        for o in p["outputs"]
    )


def test_the_runner_runs_each_profile_and_refuses_shapes_outside_it(bundle: Path) -> None:
    from kandinsky_core.components import COMPONENTS, ModelDims
    from kandinsky_export.calibration import check_inputs, record_run
    from kandinsky_export.engine_check import ENGINE_TOLERANCE
    from kandinsky_export.onnx_export import onnx_session, run_session
    from kandinsky_export.tensorrt_engine import TensorRTRunner, build_engines

    build_engines(bundle, [COMPONENT], settings=_settings(), precision="fp32")
    dims = ModelDims.from_dict(json.loads((bundle / "manifest.json").read_text())["dims"])
    inputs = check_inputs(record_run(bundle, (256, 256)), COMPONENT)
    reference = run_session(onnx_session(bundle / COMPONENT / "model.onnx"), inputs)
    with TensorRTRunner(bundle / COMPONENT / "tensorrt" / "model.plan") as engine:
        assert engine.profile_count() == 2
        got = engine.run(1, inputs)  # 256 px: the second profile's optimum
        for output in COMPONENTS[COMPONENT].outputs:
            ref = reference[output.name]
            scale = max(1.0, float(np.abs(ref).max()))
            assert float(np.abs(got[output.name] - ref).max()) / scale <= ENGINE_TOLERANCE, output.name
        with pytest.raises(RuntimeError, match="does not take"):  # profile 0 ends at 192 px
            engine.run(0, inputs)
    assert inputs["sample"].shape[-1] == 256 // dims.movq_scale_factor
