"""The client stays thin: importing every client module loads no torch, and it declares no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_client_modules_do_not_import_torch():
    modules = sorted(
        p.stem for p in (ROOT / "client" / "kandinsky_client").glob("*.py") if p.stem != "__init__"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('kandinsky_client.' + m)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_declares_only_light_dependencies():
    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    names = {d.split("[")[0].split(">")[0].split("=")[0].strip().lower() for d in project["dependencies"]}
    assert names <= {"kandinsky22-core", "numpy", "pillow", "tritonclient", "tqdm"}, names
    core = tomllib.loads((ROOT / "core" / "pyproject.toml").read_text())["project"]
    assert {d.split(">")[0].strip().lower() for d in core["dependencies"]} <= {"numpy", "pillow"}
