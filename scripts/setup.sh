#!/usr/bin/env bash
# Create .venv and install the five packages (core, client, repository, export, benchmarks; editable), the
# CPU Triton server and the test tools.
# torch is pinned to the CPU wheel in requirements/cpu.txt: an unpinned torch downloads a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements/cpu.txt
.venv/bin/python -m pip install --quiet -e ./core -e ./client -e "./model_repository[cpu-server]" -e ./export \
    -e ./benchmarks
.venv/bin/python -m pip check >/dev/null || .venv/bin/python -m pip check
echo "environment ready: $(.venv/bin/python -c 'import torch, diffusers, onnxruntime; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, onnxruntime {onnxruntime.__version__}")')"
