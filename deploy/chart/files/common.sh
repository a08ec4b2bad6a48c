# Shared by prepare.sh, serve.sh and gateway.sh (sourced). Environment from the chart:
#   KANDINSKY_VOLUME  the shared volume's mount point
#   KANDINSKY_KEY     the checkpoint key: a hash of the sources, revisions, build settings and image
#                     (templates/_helpers.tpl "kandinsky22.key"); deploy/README.md "The volume"
#   KANDINSKY_GPU_KEY optional: overrides the GPU model read from nvidia-smi (tests, CPU smoke runs)

log() { echo "[kandinsky] $*" >&2; }

# The GPU model of this pod's GPU, as a folder name: "NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3".
gpu_key() {
    local name="${KANDINSKY_GPU_KEY:-}"
    if [[ -z "${name}" ]]; then
        name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    fi
    if [[ -z "${name}" ]]; then
        log "no GPU visible to nvidia-smi: this pod needs one (resources: nvidia.com/gpu)"
        return 1
    fi
    printf '%s' "${name}" | tr -cs 'A-Za-z0-9._-' '-' | sed 's/-*$//'
}

key_dir() { printf '%s/%s' "${KANDINSKY_VOLUME:?}" "${KANDINSKY_KEY:?}"; }

# Every GPU model this key has been prepared for (folders with a READY marker).
prepared_gpus() {
    local marker
    for marker in "$(key_dir)"/*/READY; do
        [[ -f "${marker}" ]] && basename "$(dirname "${marker}")"
    done
    return 0
}
