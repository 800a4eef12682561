#!/usr/bin/env bash
# Prepare what an offline GPU machine needs to run the benchmarks and GPU tests through a real ComfyUI:
#   .gpu/comfyui   the pinned ComfyUI tree (from .ci/setup_env.sh's cache), without tokenizers nothing here uses
#   .gpu/wheels    wheels for what such a machine (PyTorch + transformers + accelerate image) lacks: diffusers,
#                  bitsandbytes (only its CUDA 13.0 and CPU libraries, to stay small), torchao (quantization fp8),
#                  ComfyUI's server deps
# Both folders are git-ignored. On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl; export PYTHONPATH=/tmp/site
#   export ATELIER_COMFYUI=$PWD/.gpu/comfyui
# A machine with internet access needs none of this: `pip install -r requirements.txt` plus ComfyUI's requirements.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${ATELIER_CACHE:-$HOME/.cache/atelier}
out=${ATELIER_GPU_BUNDLE:-$here/.gpu}
grep -qx '/.gpu/' "$here/.git/info/exclude" 2>/dev/null || echo /.gpu/ >> "$here/.git/info/exclude"
rm -rf "$out/comfyui" "$out/wheels"
mkdir -p "$out/wheels"
cp -r "$cache/comfyui" "$out/comfyui"
(cd "$out/comfyui" && rm -rf .git tests tests-unit comfy/text_encoders/{llama,t5_pile,hydit_clip,ace_lyrics,byt5}_tokenizer \
   && find . -name __pycache__ -prune -exec rm -rf {} +)
pyver=3.12
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version $pyver --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$1" "${@:2}"
}
tmp=$(mktemp -d)
dl "$tmp" diffusers==0.42.1 bitsandbytes==0.50.2 peft==0.21.2 torchao==0.18.0 torchsde==0.2.6 trampoline==0.1.2 av==19.0.2 pydantic==2.14.3 \
  pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv typing-inspection annotated-types websocket-client
# bitsandbytes ships libraries for every CUDA/ROCm version (130 MB): keep CUDA 13.0's (the GPU image's torch) and CPU's
python3 - "$tmp" <<'PY'
import pathlib, sys, zipfile
d = pathlib.Path(sys.argv[1])
src = next(d.glob("bitsandbytes-*.whl"))
dst = src.with_suffix(".slim")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        name = item.filename
        if name.startswith("bitsandbytes/libbitsandbytes_") and not name.endswith(("_cuda130.so", "_cpu.so")):
            continue
        zout.writestr(item, zin.read(name))
dst.replace(src)
PY
mv "$tmp"/*.whl "$out/wheels/"
rm -rf "$tmp"
du -sh "$out/comfyui" "$out/wheels" >&2
