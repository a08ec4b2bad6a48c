"""scripts/gpu-check.sh and scripts/gpu_check.py: the GPU measurements' plumbing, run here on the CPU with
the tiny preset (the numbers they exist for need a GPU: docs/gpu.md says which have run)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_measurements_run_end_to_end_on_the_cpu(
    tiny_checkpoint_root, tiny_bundle, tmp_path: Path
) -> None:
    from kandinsky_export.fp16 import convert_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], bundle)
    convert_bundle(bundle, ["prior"], check_size=(128, 128))
    argv = [
        "--checkpoint",
        str(tiny_checkpoint_root),
        "--bundle",
        str(bundle),
        "--out",
        str(tmp_path / "out"),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--size",
        "128",
        "--prior-steps",
        "2",
        "--decoder-steps",
        "2",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--e2e-repeats",
        "1",
        "--serve-flavour",
        "cpu",
    ]
    assert _module().main(argv) == 0
    result = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert {r["component"] for r in result["fp16"]} == {"prior"}
    measured = {r["component"] for r in result["components"]}
    assert {"text_encoder", "prior", "unet", "movq_decoder", "image_encoder", "movq_encoder"} <= measured
    assert all(r["ort_ms"] > 0 and r["torch_ms"] > 0 for r in result["components"])
    assert all(r["served_vs_fp32_rel_error"] < 3e-2 for r in result["components"])
    assert result["end_to_end"]["ours_s"] > 0 and result["end_to_end"]["diffusers_s"] > 0
    served = result["served"]
    assert served["client_loop_s"] > 0 and served["server_loop_s"] > 0
    assert served["loops_max_abs_difference"] == 0.0  # the same numbers on the CPU flavour
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert table.startswith("### CPU") and "| end to end (2 prior + 2 decoder steps) |" in table
    assert "| served, cpu flavour (2 + 2 steps, 128 px) | seconds per image |" in table


def test_the_script_refuses_a_machine_without_a_gpu(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    assert (
        subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--help"], check=False).returncode
        == 0
    )
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "no GPU" in result.stderr
