#!/usr/bin/env bash
# A gateway pod: wait until the repository of this checkpoint key exists (for any GPU model: the gateway
# reads only the config.pbtxt files, for its size limits and field types), then run kandinsky-gateway.
# Arguments go to kandinsky-gateway.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

waited=0
until gpu="$(prepared_gpus | head -n 1)" && [[ -n "${gpu}" ]]; do
    if (( waited % 300 == 0 )); then
        log "waiting for the prepare Job of key ${KANDINSKY_KEY} ($(key_dir)/<gpu>/READY)"
    fi
    sleep 10
    waited=$((waited + 10))
done
exec kandinsky-gateway --repository "$(key_dir)/${gpu}/model_repository" "$@"
