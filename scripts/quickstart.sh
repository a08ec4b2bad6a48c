#!/usr/bin/env bash
# One command: set up, build the model, serve it with Triton, write an image, stop the server.
#
#   bash scripts/quickstart.sh ["a prompt"]
#
# Environment:
#   PRESET=tiny|small|full         random-weight preset to build when no real checkpoint is given (tiny)
#   PRIOR=... DECODER=...          real checkpoint folders or hub ids (where a network exists), e.g.
#                                  kandinsky-community/kandinsky-2-2-prior, kandinsky-community/kandinsky-2-2-decoder
#   DECODER_INPAINT=...            the inpainting decoder (optional)
#   CONTROLNET=...                 the ControlNet-depth decoder (optional), e.g.
#                                  kandinsky-community/kandinsky-2-2-controlnet-depth
#   PRIOR_REVISION=... DECODER_REVISION=... DECODER_INPAINT_REVISION=... CONTROLNET_REVISION=...
#                                  hub revisions (commit ids pin them; default: each repo's default branch)
#   OUTPUT=outputs/quickstart.png  HEIGHT=256 WIDTH=256 SEED=0
#   PRIOR_STEPS=... STEPS=...      prior / decoder denoising steps (default: the client's defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-"a photo of a red fox in the snow, highly detailed"}
OUTPUT=${OUTPUT:-outputs/quickstart.png}
PRESET=${PRESET:-tiny}

bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

if [ -n "${PRIOR:-}" ]; then
  # One artifacts folder per source and revision: another revision is exported, not the old one served.
  NAME=checkpoint-$(echo "$PRIOR${PRIOR_REVISION:+-prior@$PRIOR_REVISION}${DECODER_REVISION:+-decoder@$DECODER_REVISION}${DECODER_INPAINT_REVISION:+-inpaint@$DECODER_INPAINT_REVISION}${CONTROLNET:+-controlnet@$CONTROLNET}${CONTROLNET_REVISION:+@$CONTROLNET_REVISION}" | tr '/:' '__')
  SOURCE=(--prior "$PRIOR" --decoder "${DECODER:?set DECODER with PRIOR}")
  [ -n "${DECODER_INPAINT:-}" ] && SOURCE+=(--decoder-inpaint "$DECODER_INPAINT")
  [ -n "${PRIOR_REVISION:-}" ] && SOURCE+=(--prior-revision "$PRIOR_REVISION")
  [ -n "${DECODER_REVISION:-}" ] && SOURCE+=(--decoder-revision "$DECODER_REVISION")
  [ -n "${DECODER_INPAINT_REVISION:-}" ] && SOURCE+=(--decoder-inpaint-revision "$DECODER_INPAINT_REVISION")
  [ -n "${CONTROLNET:-}" ] && SOURCE+=(--controlnet "$CONTROLNET")
  [ -n "${CONTROLNET_REVISION:-}" ] && SOURCE+=(--controlnet-revision "$CONTROLNET_REVISION")
else
  NAME=$PRESET
  SOURCE=(--checkpoint "artifacts/$NAME/checkpoint")
  [ -f "artifacts/$NAME/checkpoint/prior/model_index.json" ] ||
    kandinsky-export checkpoint --preset "$PRESET" --output "artifacts/$NAME/checkpoint"
fi
ART=artifacts/$NAME
[ -f "$ART/onnx/manifest.json" ] || kandinsky-export onnx "${SOURCE[@]}" --output "$ART/onnx"
kandinsky-repository --bundle "$ART/onnx" --output "$ART/model_repository"

# kandinsky-serve puts its gateway (nginx + njs) in front of Triton; setup.sh installed both where it could.
# Where it could not, serve without it (loopback only, as always here) and say what that means.
GATEWAY=()
if ! python -c 'from kandinsky_repository.gateway.nginx import find_nginx, njs_load_module
njs_load_module(find_nginx())' >/dev/null 2>&1; then
  echo "quickstart: WARNING: no nginx with its njs module here (Debian/Ubuntu: apt-get install nginx" \
    "libnginx-mod-http-js); serving without the gateway (--no-gateway): Triton takes requests unchecked," \
    "on 127.0.0.1 only" >&2
  GATEWAY=(--no-gateway)
fi

PORT=${PORT:-8001}
LOG=$ART/serve.out
kandinsky-serve --repository "$ART/model_repository" --grpc-port "$PORT" --http-port $((PORT + 100)) \
  --metrics-port $((PORT + 101)) --health-port $((PORT + 102)) --openai-port $((PORT + 103)) \
  --log-file "$ART/triton.log" "${GATEWAY[@]}" \
  >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until grep -q "Triton is serving" "$LOG"; do
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
cat "$LOG"

STEP_ARGS=()
[ -n "${PRIOR_STEPS:-}" ] && STEP_ARGS+=(--prior-num-inference-steps "$PRIOR_STEPS")
[ -n "${STEPS:-}" ] && STEP_ARGS+=(--num-inference-steps "$STEPS")
kandinsky-client generate "$PROMPT" --url "localhost:$PORT" --output "$OUTPUT" \
  --height "${HEIGHT:-256}" --width "${WIDTH:-256}" --seed "${SEED:-0}" "${STEP_ARGS[@]}"
