#!/usr/bin/env bash
# Create .venv and install the five packages (core, client, repository, export, benchmarks; editable), the
# CPU Triton server and the test tools; and nginx with its njs module, the gateway kandinsky-serve runs in
# front of Triton by default, when they are missing and this machine can install them.
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

# The gateway: the Debian/Ubuntu packages, as root or with password-less sudo (never a prompt). RUNLEVEL=1
# keeps the package from starting a system nginx on port 80 where no policy-rc.d does.
gateway_ready() {
  .venv/bin/python -c 'from kandinsky_repository.gateway.nginx import find_nginx, njs_load_module
njs_load_module(find_nginx())' >/dev/null 2>&1
}
if ! gateway_ready; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "installing nginx and its njs module (the gateway kandinsky-serve runs in front of Triton)"
    $SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get update -qq >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq nginx libnginx-mod-http-js >/dev/null
  fi
fi
if gateway_ready; then
  echo "gateway ready: $(nginx -v 2>&1) with its njs module"
else
  echo "setup: nginx with its njs module is missing and could not be installed here (Debian/Ubuntu:" \
    "apt-get install nginx libnginx-mod-http-js); kandinsky-serve needs it, or --no-gateway (Triton then" \
    "takes requests unchecked: trusted clients only)" >&2
fi
