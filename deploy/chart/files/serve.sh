#!/usr/bin/env bash
# A serving pod: wait until the prepare Job has made the repository for this checkpoint key and this
# pod's GPU model, then run kandinsky-serve on it (read-only volume). Arguments go to kandinsky-serve.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gpu="$(gpu_key)"
dir="$(key_dir)/${gpu}"
waited=0
until [[ -f "${dir}/READY" ]]; do
    if (( waited % 300 == 0 )); then
        log "waiting for ${dir}/READY: the prepare Job of key ${KANDINSKY_KEY} on a ${gpu}" \
            "(prepared so far for: $(prepared_gpus | tr '\n' ' ')); set gpu.product so that the Job and" \
            "the replicas run on the same GPU model"
    fi
    sleep 10
    waited=$((waited + 10))
done
log "serving ${dir}/model_repository"
# The gateway pods (kandinsky-gateway) are the way in: no gateway of its own in this pod.
KANDINSKY_GATEWAY=none exec kandinsky-serve --repository "${dir}/model_repository" "$@"
