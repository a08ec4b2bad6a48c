#!/usr/bin/env bash
# One command for a bare GPU machine (NVIDIA driver, Python with PyTorch for CUDA, no network): the FP16 vs
# FP32 error per component on the GPU, latency per component and end to end against diffusers FP16 on the
# same GPU, written as a table headed by the card's name (docs/gpu.md, "GPU check").
#
#   bash scripts/gpu-check.sh --wheels /path/to/wheels [--out artifacts/gpu-check] [--preset full]
#                             [--size 768] [--prior-steps 25] [--decoder-steps 50] [--python python3]
#
# --wheels: a folder with what the machine lacks, brought along (no index is contacted): onnxruntime-gpu
#   (the CUDA build for the machine's CUDA), diffusers, and the rest of this project's dependencies the
#   machine does not have (`pip download -d wheels -r <(...)` on a machine with network). Without
#   --wheels the environment must already have them.
# Steps (each skipped when its output exists, so a second run only measures):
#   1. install this checkout (client, exporter, repository) into the Python given, offline
#   2. kandinsky-export checkpoint --preset PRESET          (random weights of the released architecture)
#   3. kandinsky-export onnx                                 (FP32 ONNX, parity vs PyTorch)
#   4. kandinsky-export fp16 --providers CUDAExecutionProvider   (the error measured on the GPU too)
#   5. where a GPU Triton is present (the NGC image: tritonserver on PATH with its GPU backends): the
#      served flavour, tensorrt when the tensorrt module and backend exist (engines built here), else
#      onnxruntime; gpu_check.py then also runs both loops (client, server) through that Triton
#   6. scripts/gpu_check.py: latency per component and end to end, served, the table
# Also: the `gpu` pytest marker (tests/test_gpu_end_to_end.py) where a GPU Triton (NGC image) is present.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS=""
OUT="${ROOT}/artifacts/gpu-check"
PRESET="full"
PYTHON="python3"
MEASURE_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --preset) PRESET="$2"; shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        --size | --prior-steps | --decoder-steps | --repeats | --e2e-repeats | --device)
            MEASURE_ARGS+=("$1" "$2"); shift 2 ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "[gpu-check] $*" >&2; }

if ! nvidia-smi >/dev/null 2>&1; then
    log "nvidia-smi finds no GPU: this check measures a GPU (see docs/gpu.md)"
    [[ " ${MEASURE_ARGS[*]-} " == *" --device cpu "* ]] || exit 2
fi
log "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"

# 1. this checkout, offline. onnxruntime-gpu replaces the CPU onnxruntime (both install the same module).
if [[ -n "${WHEELS}" ]]; then
    log "installing from ${WHEELS} (no index)"
    if "${PYTHON}" -m pip show onnxruntime >/dev/null 2>&1 && ls "${WHEELS}"/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
        "${PYTHON}" -m pip uninstall -y onnxruntime
    fi
    "${PYTHON}" -m pip install --no-index --find-links "${WHEELS}" "${WHEELS}"/*.whl
fi
"${PYTHON}" -m pip install --no-index --no-build-isolation --no-deps "${ROOT}/core" "${ROOT}/client" "${ROOT}/benchmarks" \
    "${ROOT}/model_repository" "${ROOT}/export"
"${PYTHON}" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tokenizers", "tritonclient")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu-check: missing {missing}: bring their wheels with --wheels")
import onnxruntime, torch
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), onnxruntime {onnxruntime.__version__}: "
      f"{onnxruntime.get_available_providers()}", file=sys.stderr)
EOF

export_cmd=("${PYTHON}" -c 'import sys; from kandinsky_export.cli import main; sys.exit(main(sys.argv[1:]))')
CHECKPOINT="${OUT}/${PRESET}/checkpoint"
BUNDLE="${OUT}/${PRESET}/bundle"
mkdir -p "${OUT}/${PRESET}"

# 2-3. checkpoint and ONNX (the export runs on the CPU, as in the Docker image)
[[ -d "${CHECKPOINT}" ]] || "${export_cmd[@]}" checkpoint --preset "${PRESET}" --output "${CHECKPOINT}"
[[ -f "${BUNDLE}/manifest.json" ]] || "${export_cmd[@]}" onnx --checkpoint "${CHECKPOINT}" --output "${BUNDLE}"

# 4. FP16, checked natively on the GPU as well as by the storage emulation (skipped when current)
providers=(CUDAExecutionProvider)
[[ " ${MEASURE_ARGS[*]-} " == *" --device cpu "* ]] && providers=(CPUExecutionProvider)
"${export_cmd[@]}" fp16 --bundle "${BUNDLE}" --providers "${providers[@]}"

# 5. a GPU Triton to serve it with (the NGC image), in the flavour it supports
SERVE_FLAVOUR="none"
if command -v tritonserver >/dev/null 2>&1; then
    backends="$(dirname "$(dirname "$(command -v tritonserver)")")/backends"
    if [[ -d "${backends}/tensorrt" ]] && "${PYTHON}" -c "import tensorrt" >/dev/null 2>&1; then
        SERVE_FLAVOUR="tensorrt"
        "${export_cmd[@]}" engines --bundle "${BUNDLE}"
    elif [[ -d "${backends}/onnxruntime" ]]; then
        SERVE_FLAVOUR="onnxruntime"
    fi
    log "Triton at $(command -v tritonserver): serving the ${SERVE_FLAVOUR} flavour"
else
    log "no tritonserver on PATH (not the NGC image): the served step is skipped"
fi

# 6. the measurements and the table
"${PYTHON}" "${ROOT}/scripts/gpu_check.py" --checkpoint "${CHECKPOINT}" --bundle "${BUNDLE}" \
    --out "${OUT}/${PRESET}" --preset "${PRESET}" --serve-flavour "${SERVE_FLAVOUR}" "${MEASURE_ARGS[@]}"
log "table: ${OUT}/${PRESET}/gpu-check.md (put it in docs/gpu.md with the date and the card)"
