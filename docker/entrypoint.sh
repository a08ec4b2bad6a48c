#!/usr/bin/env bash
# First start: checkpoint -> ONNX bundle -> FP16 variants -> TensorRT engines -> model repository.
# Every start: the steps that are already done are skipped (the bundle's manifest, the FP16 variants'
# source hashes and the engines' sidecars say so), then `kandinsky-serve` serves: Triton under its
# supervisor (restarts after a crash or a dead python-backend stub), deep health on port 8003, the
# restricted APIs keyed by $KANDINSKY_DATA/admin.key (or $KANDINSKY_ADMIN_KEY). Inside the container it
# listens on every interface (--host 0.0.0.0): compose decides what the host publishes.
# Everything lives in $KANDINSKY_DATA.
#
# Environment (defaults in brackets; see docs/gpu.md):
#   KANDINSKY_PRIOR            [kandinsky-community/kandinsky-2-2-prior]  hub id or folder
#   KANDINSKY_DECODER          [kandinsky-community/kandinsky-2-2-decoder]
#   KANDINSKY_DECODER_INPAINT  [kandinsky-community/kandinsky-2-2-decoder-inpaint]  empty: no inpainting
#   KANDINSKY_PRESET           []  tiny|small: random weights instead of the hub (smoke test)
#   KANDINSKY_FLAVOUR          [tensorrt]  tensorrt | onnxruntime
#   KANDINSKY_PRECISION        [default]  default (measured per component) | fp16 | fp32 (| mixed: engines)
#   KANDINSKY_STATIC_SIZE      []  e.g. 768x768: engines for this size only (faster, CUDA graphs)
#   KANDINSKY_MAX_IMAGE_SIZE   [1024]
#   KANDINSKY_ORT_TENSORRT     [0]  onnxruntime flavour: 1 adds ONNX Runtime's TensorRT accelerator
#   KANDINSKY_INSTANCES        [1]  instances per network model
#   KANDINSKY_MAX_QUEUE_DELAY_US [2000]  dynamic batching window of the prior and UNet models
#   KANDINSKY_ADMIN_KEY        []  key of Triton's restricted APIs (default: $KANDINSKY_DATA/admin.key)
#   KANDINSKY_SERVE_ARGS       []  extra kandinsky-serve arguments (e.g. --gateway --gateway-token ...)
# Arguments given to the container replace the final `kandinsky-serve` command (e.g. `bash`).
set -euo pipefail

DATA="${KANDINSKY_DATA:-/data}"
BUNDLE="${DATA}/bundle"
REPOSITORY="${DATA}/model_repository"
FLAVOUR="${KANDINSKY_FLAVOUR:-tensorrt}"
PRECISION="${KANDINSKY_PRECISION:-default}"
MAX_IMAGE_SIZE="${KANDINSKY_MAX_IMAGE_SIZE:-1024}"
mkdir -p "${DATA}"

log() { echo "[kandinsky] $*" >&2; }

if [[ ! -f "${BUNDLE}/manifest.json" ]]; then
    if [[ -n "${KANDINSKY_PRESET:-}" ]]; then
        log "writing the random-weight '${KANDINSKY_PRESET}' preset"
        kandinsky-export checkpoint --preset "${KANDINSKY_PRESET}" --output "${DATA}/checkpoint"
        source_args=(--checkpoint "${DATA}/checkpoint")
    else
        source_args=(
            --prior "${KANDINSKY_PRIOR:-kandinsky-community/kandinsky-2-2-prior}"
            --decoder "${KANDINSKY_DECODER:-kandinsky-community/kandinsky-2-2-decoder}"
        )
        inpaint="${KANDINSKY_DECODER_INPAINT-kandinsky-community/kandinsky-2-2-decoder-inpaint}"
        [[ -n "${inpaint}" ]] && source_args+=(--decoder-inpaint "${inpaint}")
    fi
    log "exporting ONNX to ${BUNDLE} (CPU; about 20 GB of RAM for the released sizes)"
    kandinsky-export onnx "${source_args[@]}" --output "${BUNDLE}"
fi

if [[ "${PRECISION}" != "fp32" ]]; then
    log "FP16 variants (skipped where current)"
    kandinsky-export fp16 --bundle "${BUNDLE}"
fi

repository_args=(
    --bundle "${BUNDLE}" --output "${REPOSITORY}" --flavour "${FLAVOUR}"
    --max-image-size "${MAX_IMAGE_SIZE}"
    --instances "${KANDINSKY_INSTANCES:-1}"
    --max-queue-delay-us "${KANDINSKY_MAX_QUEUE_DELAY_US:-2000}"
)
case "${FLAVOUR}" in
    tensorrt)
        engine_args=(--bundle "${BUNDLE}" --precision "${PRECISION}" --max-size "${MAX_IMAGE_SIZE}")
        [[ -n "${KANDINSKY_STATIC_SIZE:-}" ]] && engine_args+=(--static "${KANDINSKY_STATIC_SIZE}")
        log "TensorRT engines (rebuilt only when TensorRT, the GPU, the profile or the ONNX changed)"
        kandinsky-export engines "${engine_args[@]}"
        ;;
    onnxruntime)
        [[ "${PRECISION}" == "mixed" ]] && { log "precision 'mixed' is for engines only"; exit 2; }
        repository_args+=(--precision "${PRECISION}")
        [[ "${KANDINSKY_ORT_TENSORRT:-0}" == "1" ]] && repository_args+=(--ort-tensorrt)
        ;;
    *)
        log "KANDINSKY_FLAVOUR must be tensorrt or onnxruntime, not '${FLAVOUR}'"
        exit 2
        ;;
esac

log "writing the ${FLAVOUR} repository to ${REPOSITORY}"
kandinsky-repository "${repository_args[@]}"

if [[ $# -gt 0 ]]; then
    exec "$@"
fi
# shellcheck disable=SC2086  # KANDINSKY_SERVE_ARGS is a list of arguments
exec kandinsky-serve \
    --repository "${REPOSITORY}" \
    --host 0.0.0.0 --health-host 0.0.0.0 \
    --admin-key-file "${DATA}/admin.key" \
    ${KANDINSKY_SERVE_ARGS:-}
