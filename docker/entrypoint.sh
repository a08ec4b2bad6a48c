#!/usr/bin/env bash
# kandinsky-entrypoint [prepare | serve [kandinsky-serve arguments] | COMMAND...]   (see docs/gpu.md)
#
# Runs after NGC's own entrypoint (/opt/nvidia/nvidia_entrypoint.sh: driver and GPU checks), in $KANDINSKY_DATA.
#
#   prepare  the one-time steps, in the prepare image (docker compose's `prepare` service, the Helm chart's
#            prepare Job): checkpoint -> ONNX bundle -> FP16 variants -> TensorRT engines -> model repository
#            (-> ONNX Runtime's TensorRT engine cache, with KANDINSKY_ORT_TENSORRT=1).
#            Every step skips what is current: the bundle's manifest (written only when every parity check
#            passed), the FP16 variants' and engines' source digests (cached, not re-hashed), the engines'
#            sidecars, the engine cache's entries (ONNX Runtime reuses what is valid). Settings are checked
#            before anything is downloaded; a bad one stops here, once.
#   serve    (default) kandinsky-serve on the prepared repository: Triton under its supervisor, deep health,
#            the restricted APIs keyed by $KANDINSKY_DATA/admin.key (or $KANDINSKY_ADMIN_KEY), listening on
#            every interface of the container (compose decides what the host publishes). It first checks that
#            /dev/shm holds what the repository's python models may need (`docker run --shm-size`).
#   COMMAND  anything else is run as it is (e.g. `bash`).
#
# Environment (empty or unset: the project's default, from its Python settings and registry):
#   KANDINSKY_PRIOR            [kandinsky-community/kandinsky-2-2-prior]  hub id or folder
#   KANDINSKY_DECODER          [kandinsky-community/kandinsky-2-2-decoder]
#   KANDINSKY_DECODER_INPAINT  [kandinsky-community/kandinsky-2-2-decoder-inpaint]  set empty: no inpainting
#   KANDINSKY_PRIOR_REVISION   hub revision (a commit id pins it) of KANDINSKY_PRIOR; empty: the default branch
#   KANDINSKY_DECODER_REVISION  of KANDINSKY_DECODER
#   KANDINSKY_DECODER_INPAINT_REVISION  of KANDINSKY_DECODER_INPAINT
#   KANDINSKY_CONTROLNET       [empty: no ControlNet modes]  e.g. kandinsky-community/kandinsky-2-2-controlnet-depth
#   KANDINSKY_CONTROLNET_REVISION  of KANDINSKY_CONTROLNET. A bundle exported from other sources or
#                              revisions than these is exported again (the manifest records what it came from)
#   KANDINSKY_PRESET           tiny|small: random weights instead of the hub (a smoke test of the whole path)
#   KANDINSKY_FLAVOUR          [tensorrt]  tensorrt | onnxruntime
#   KANDINSKY_PRECISION        [default]  default (measured per component) | fp16 | fp32 | mixed (engines only)
#   KANDINSKY_STATIC_SIZE      e.g. 768x768: engines for this one size
#   KANDINSKY_MAX_IMAGE_SIZE   largest image side served (the registry's MAX_IMAGE_SIZE)
#   KANDINSKY_ORT_TENSORRT     1: onnxruntime flavour with ONNX Runtime's TensorRT accelerator
#   KANDINSKY_INSTANCES        instances per network model (kandinsky-repository's default)
#   KANDINSKY_MAX_QUEUE_DELAY_US  dynamic batching window of the per-step models (kandinsky-repository's)
#   KANDINSKY_STEP_BATCHING    [off]  on: the server loop sends one request per step of every generation
#   KANDINSKY_ADMIN_KEY        key of Triton's restricted APIs (default: a random one kept in admin.key)
#   KANDINSKY_SERVE_ARGS       extra kandinsky-serve arguments (e.g. --gateway --log-verbose 1)
#   HF_TOKEN                   only if your hub access needs one
set -euo pipefail

DATA="${KANDINSKY_DATA:-/data}"
BUNDLE="${DATA}/bundle"
REPOSITORY="${DATA}/model_repository"
FLAVOUR="${KANDINSKY_FLAVOUR:-tensorrt}"
PRECISION="${KANDINSKY_PRECISION:-default}"
MAX_IMAGE_SIZE="${KANDINSKY_MAX_IMAGE_SIZE:-}"
STATIC_SIZE="${KANDINSKY_STATIC_SIZE:-}"
ORT_TENSORRT="${KANDINSKY_ORT_TENSORRT:-0}"
RECORD="kandinsky_repository.json"  # what kandinsky-repository writes at the repository's top

log() { echo "[kandinsky] $*" >&2; }
fail() { log "$*"; exit 2; }

# The settings, checked before the first download or export: a wrong one is reported once, not after an
# hour of export and in a restart loop.
check_settings() {
    case "${FLAVOUR}" in
        tensorrt | onnxruntime) ;;
        *) fail "KANDINSKY_FLAVOUR must be tensorrt or onnxruntime, not '${FLAVOUR}'" ;;
    esac
    case "${PRECISION}" in
        default | fp16 | fp32) ;;
        mixed) [[ "${FLAVOUR}" == "tensorrt" ]] || fail "KANDINSKY_PRECISION=mixed is for TensorRT engines only" ;;
        *) fail "KANDINSKY_PRECISION must be default, fp16, fp32 or mixed, not '${PRECISION}'" ;;
    esac
    local profile_args=()
    [[ -n "${MAX_IMAGE_SIZE}" ]] && profile_args+=(--max-size "${MAX_IMAGE_SIZE}")
    [[ -n "${STATIC_SIZE}" ]] && profile_args+=(--static "${STATIC_SIZE}")
    local profile
    profile="$(kandinsky-export profile "${profile_args[@]}")" \
        || fail "KANDINSKY_MAX_IMAGE_SIZE='${MAX_IMAGE_SIZE}' / KANDINSKY_STATIC_SIZE='${STATIC_SIZE}' cannot be served (above)"
    log "image sizes: ${profile}"
}

# Whether the bundle's manifest records these hub sources and revisions (PRIOR DECODER INPAINT CONTROLNET
# and their four revisions; empty: none). A manifest without a checkpoint record (an older exporter) matches.
bundle_matches() {
    python3 - "${BUNDLE}/manifest.json" "$@" <<'PYTHON'
import json, sys
manifest, prior, decoder, inpaint, controlnet, *revisions = sys.argv[1:]
recorded = json.load(open(manifest)).get("checkpoint")
if recorded is None:  # an older exporter: nothing to compare
    sys.exit(0)
parts = {"prior": prior, "decoder": decoder, "decoder_inpaint": inpaint or None, "controlnet": controlnet or None}
wanted = {part: revision for part, revision in zip(parts, revisions) if revision and parts[part]}
same = all(recorded.get(part) == source for part, source in parts.items())
same = same and (recorded.get("revisions") or {}) == wanted
if not same:
    print(f"[kandinsky] the bundle was exported from {recorded}; exporting {parts} at {wanted}", file=sys.stderr)
sys.exit(0 if same else 1)
PYTHON
}

prepare() {
    check_settings
    mkdir -p "${DATA}"
    local size_args=()
    [[ -n "${MAX_IMAGE_SIZE}" ]] && size_args+=(--max-size "${MAX_IMAGE_SIZE}")

    # The hub sources and their pinned revisions (unused with a preset).
    local prior="${KANDINSKY_PRIOR:-kandinsky-community/kandinsky-2-2-prior}"
    local decoder="${KANDINSKY_DECODER:-kandinsky-community/kandinsky-2-2-decoder}"
    local inpaint="${KANDINSKY_DECODER_INPAINT-kandinsky-community/kandinsky-2-2-decoder-inpaint}"
    local prior_revision="${KANDINSKY_PRIOR_REVISION:-}" decoder_revision="${KANDINSKY_DECODER_REVISION:-}"
    local inpaint_revision="${KANDINSKY_DECODER_INPAINT_REVISION:-}"
    local controlnet="${KANDINSKY_CONTROLNET:-}" controlnet_revision="${KANDINSKY_CONTROLNET_REVISION:-}"

    # no manifest: never exported, or the export failed; or exported from other hub sources or revisions
    if [[ ! -f "${BUNDLE}/manifest.json" ]] || { [[ -z "${KANDINSKY_PRESET:-}" ]] && ! bundle_matches \
        "${prior}" "${decoder}" "${inpaint}" "${controlnet}" \
        "${prior_revision}" "${decoder_revision}" "${inpaint_revision}" "${controlnet_revision}"; }; then
        local source_args
        if [[ -n "${KANDINSKY_PRESET:-}" ]]; then
            log "writing the random-weight '${KANDINSKY_PRESET}' preset"
            [[ -z "${prior_revision}${decoder_revision}${inpaint_revision}${controlnet_revision}" ]] \
                || log "KANDINSKY_*_REVISION pin hub sources; the preset ignores them"
            kandinsky-export checkpoint --preset "${KANDINSKY_PRESET}" --output "${DATA}/checkpoint"
            source_args=(--checkpoint "${DATA}/checkpoint")
        else
            source_args=(--prior "${prior}" --decoder "${decoder}")
            [[ -n "${inpaint}" ]] && source_args+=(--decoder-inpaint "${inpaint}")
            [[ -n "${prior_revision}" ]] && source_args+=(--prior-revision "${prior_revision}")
            [[ -n "${decoder_revision}" ]] && source_args+=(--decoder-revision "${decoder_revision}")
            [[ -n "${inpaint}" && -n "${inpaint_revision}" ]] && source_args+=(--decoder-inpaint-revision "${inpaint_revision}")
            [[ -n "${controlnet}" ]] && source_args+=(--controlnet "${controlnet}")
            [[ -n "${controlnet}" && -n "${controlnet_revision}" ]] && source_args+=(--controlnet-revision "${controlnet_revision}")
        fi
        log "exporting ONNX to ${BUNDLE} (CPU; about 20 GB of RAM for the released sizes)"
        kandinsky-export onnx "${source_args[@]}" --output "${BUNDLE}"
    fi

    if [[ "${PRECISION}" != "fp32" ]]; then
        log "FP16 variants (skipped where current)"
        kandinsky-export fp16 --bundle "${BUNDLE}" "${size_args[@]}"
        # ONNX Runtime's CUDA-only fusions (GroupNorm, NhwcConv...), served by the onnxruntime flavour on the
        # CUDA provider (TensorRT, and ONNX Runtime's TensorRT accelerator, take the portable variant). Their
        # check runs on the GPU, with an onnxruntime that has the CUDA provider.
        if [[ "${FLAVOUR}" == "onnxruntime" && "${ORT_TENSORRT}" != "1" ]]; then
            if python3 -c 'import sys, onnxruntime; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())' 2>/dev/null; then
                log "FP16 variants with ONNX Runtime's CUDA fusions (skipped where current)"
                kandinsky-export fp16 --bundle "${BUNDLE}" --fusions cuda "${size_args[@]}"
            else
                log "this image's onnxruntime has no CUDA provider to check CUDA-fused FP16 graphs:" \
                    "the portable FP16 variants are served (docs/gpu.md)"
            fi
        fi
    fi

    local repository_args=(--bundle "${BUNDLE}" --output "${REPOSITORY}" --flavour "${FLAVOUR}")
    [[ -n "${MAX_IMAGE_SIZE}" ]] && repository_args+=(--max-image-size "${MAX_IMAGE_SIZE}")
    [[ -n "${KANDINSKY_INSTANCES:-}" ]] && repository_args+=(--instances "${KANDINSKY_INSTANCES}")
    [[ -n "${KANDINSKY_MAX_QUEUE_DELAY_US:-}" ]] && repository_args+=(--max-queue-delay-us "${KANDINSKY_MAX_QUEUE_DELAY_US}")
    [[ -n "${KANDINSKY_STEP_BATCHING:-}" ]] && repository_args+=(--step-batching "${KANDINSKY_STEP_BATCHING}")
    if [[ "${FLAVOUR}" == "tensorrt" ]]; then
        local engine_args=(--bundle "${BUNDLE}" --precision "${PRECISION}" "${size_args[@]}")
        [[ -n "${STATIC_SIZE}" ]] && engine_args+=(--static "${STATIC_SIZE}")
        log "TensorRT engines (rebuilt only when TensorRT, the GPU, the profile or the ONNX changed)"
        kandinsky-export engines "${engine_args[@]}"
    else
        repository_args+=(--precision "${PRECISION}")
        [[ "${ORT_TENSORRT}" == "1" ]] && repository_args+=(--ort-tensorrt)
    fi

    # Seconds; ONNX Runtime's TensorRT engine cache lives next to it (model_repository.ort_trt_cache), kept.
    log "writing the ${FLAVOUR} repository to ${REPOSITORY}"
    kandinsky-repository "${repository_args[@]}"

    if [[ "${FLAVOUR}" == "onnxruntime" && "${ORT_TENSORRT}" == "1" ]]; then
        # ONNX Runtime builds its TensorRT engines while Triton loads the models: here, with no time limit
        # and on this volume, so that serving starts load them instead of building them (kandinsky-serve
        # would give up after its ready timeout, with nothing cached, and be restarted).
        log "ONNX Runtime's TensorRT engine cache (entries still valid are reused)"
        kandinsky-serve --build-ort-trt-cache --repository "${REPOSITORY}"
    fi
}

# The python backend moves every tensor of its models through /dev/shm; Docker gives 64 MB unless told.
check_shared_memory() {
    local needed available
    needed="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["shared_memory_bytes"])' \
        "${REPOSITORY}/${RECORD}")"
    available="$(( $(df -k --output=size /dev/shm | tail -n 1) << 10 ))"  # KiB to bytes
    if (( available < needed )); then
        fail "/dev/shm holds $(( available >> 20 )) MiB; this repository's python models may need" \
            "$(( needed >> 20 )) MiB (four images at the largest size). Give the container more:" \
            "docker run --shm-size=$(( (needed >> 30) + 1 ))g, or shm_size in compose (docker/compose.yaml)"
    fi
}

serve() {
    [[ -f "${REPOSITORY}/${RECORD}" ]] \
        || fail "no model repository in ${REPOSITORY}: run the prepare step first (docker compose up runs it;" \
            "or: docker run ... IMAGE-prepare prepare)"
    check_shared_memory
    # The gateway is a service of its own here (compose's `gateway`: kandinsky-gateway), so kandinsky-serve
    # runs none in this container (KANDINSKY_SERVE_ARGS=--gateway would add one).
    # shellcheck disable=SC2086  # KANDINSKY_SERVE_ARGS is a list of arguments
    KANDINSKY_GATEWAY=none exec kandinsky-serve \
        --repository "${REPOSITORY}" \
        --host 0.0.0.0 --health-host 0.0.0.0 --openai-host 0.0.0.0 \
        --admin-key-file "${DATA}/admin.key" \
        ${KANDINSKY_SERVE_ARGS:-} "$@"
}

mode="${1:-serve}"
case "${mode}" in
    prepare) prepare ;;
    serve) shift $(( $# > 0 ? 1 : 0 )); serve "$@" ;;
    *) exec "$@" ;;
esac
