"""Building real TensorRT engines: runs only where the `tensorrt` package and an NVIDIA GPU exist.

Elsewhere every test here is skipped with that reason (the profile, sidecar and rebuild logic is
tested without TensorRT in tests/test_tensorrt_engine.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


@pytest.fixture()
def bundle(tiny_bundle, tmp_path: Path) -> Path:
    from kandinsky_export.fp16 import convert_bundle

    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], target)
    convert_bundle(target, ["movq_decoder"])
    return target


def test_build_and_rebuild_decision(bundle: Path) -> None:
    from kandinsky_client.components import COMPONENTS
    from kandinsky_export.tensorrt_engine import ProfileSettings, build_engines

    settings = ProfileSettings(static_size=(512, 512))
    (first,) = build_engines(bundle, ["movq_decoder"], settings=settings)
    assert first.action == "built" and first.metadata["source"]["precision"] == "fp16"
    assert first.metadata["build"]["strongly_typed"]
    (second,) = build_engines(bundle, ["movq_decoder"], settings=settings)
    assert second.action == "up to date"
    (third,) = build_engines(bundle, ["movq_decoder"], settings=ProfileSettings())
    assert third.action == "built" and third.reason.startswith("profile")

    engine_dir = bundle / "movq_decoder" / "tensorrt"
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((engine_dir / "model.plan").read_bytes())
    assert engine is not None
    spec = COMPONENTS["movq_decoder"]
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {t.name for t in (*spec.inputs, *spec.outputs)}
    metadata = json.loads((engine_dir / "engine.json").read_text())
    assert metadata["tensorrt_version"] == trt.__version__
    assert (bundle / "tensorrt_timing.cache").stat().st_size > 0
