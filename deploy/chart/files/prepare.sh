#!/usr/bin/env bash
# The prepare Job: checkpoint -> ONNX bundle -> FP16 -> TensorRT engines -> model repository (-> ONNX
# Runtime's TensorRT engine cache, with build.ortTensorrt), once per checkpoint key and GPU model, into
# $KANDINSKY_VOLUME/$KANDINSKY_KEY/<gpu model>/ (`kandinsky-entrypoint prepare` of docker/entrypoint.sh,
# which checks the settings first and skips what is already done). Serving pods wait for the READY marker
# written last and never write to the volume. A second Job for the same folder waits for the first (flock).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gpu="$(gpu_key)"
dir="$(key_dir)/${gpu}"
mkdir -p "${dir}"
exec 9>"${dir}/.lock"
flock 9
if [[ -f "${dir}/READY" ]]; then
    log "already prepared: ${dir} ($(cat "${dir}/READY"))"
    exit 0
fi
# What the key stands for (the chart's sources, revisions, build settings and image), for people.
printf '%s\n' "${KANDINSKY_KEY_SOURCE:-"{}"}" > "$(key_dir)/source.json"

# Pinned hub revisions (values checkpoint.*Revision): part of the key, and passed by the entrypoint to
# `kandinsky-export onnx --prior-revision ...`. An image older than the revision flags has none and exports
# the default branches: say so.
for variable in KANDINSKY_PRIOR_REVISION KANDINSKY_DECODER_REVISION KANDINSKY_DECODER_INPAINT_REVISION \
    KANDINSKY_CONTROLNET_REVISION; do
    if [[ -n "${!variable:-}" ]] && ! kandinsky-export onnx --help 2>/dev/null | grep -q -- '--prior-revision'; then
        log "WARNING: ${variable}=${!variable} is set, but this image's kandinsky-export has no --prior-revision" \
            "(an image older than the revision flags): the hub repositories' default branch is what gets exported"
    fi
done

log "preparing ${dir} (GPU ${gpu}; key ${KANDINSKY_KEY})"
KANDINSKY_DATA="${dir}" kandinsky-entrypoint prepare
test -f "${dir}/model_repository/unet/config.pbtxt" || { log "no repository was written in ${dir}"; exit 1; }
date -u +"prepared %Y-%m-%dT%H:%M:%SZ on ${gpu}" > "${dir}/READY.partial"
mv "${dir}/READY.partial" "${dir}/READY"
log "done: ${dir}"
