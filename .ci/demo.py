"""The main job: boot ComfyUI headless with Atelier and run workflows/api/flux_fill_inpaint.json through its API.

    bash .ci/demo                                   # models: $ATELIER_MODELS (a ComfyUI models folder), if set
    bash .ci/demo --models /path/to/ComfyUI/models --steps 28 --out out/

With no FLUX.1 Fill model on disk it generates small RANDOM demo weights and says so: the picture it writes is
then noise, which proves every stage is wired (upload → LoadImage → loader → FLUX Fill → SaveImage → /view).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness.comfy_server import ComfyClient, ComfyServer, cache_dir  # noqa: E402

log = logging.getLogger("atelier.demo")
WORKFLOW = REPO / "workflows" / "api" / "flux_fill_inpaint.json"
DEMO_MODEL = "atelier-demo-RANDOM-weights"


def example_image(w: int = 768, h: int = 512) -> bytes:
    """A synthetic scene (sky, ground, sun) with a transparent rectangle: the area to repaint."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    rgb = np.zeros((h, w, 3), np.float32)
    sky = y < h * 0.6
    rgb[sky] = np.stack([0.45 + 0.3 * (y[sky] / h), 0.6 + 0.2 * (y[sky] / h), np.full(sky.sum(), 0.95)], -1)
    rgb[~sky] = np.stack([0.35 + 0.1 * (x[~sky] / w), 0.25 + 0.05 * (y[~sky] / h), np.full((~sky).sum(), 0.18)], -1)
    sun = (x - w * 0.8) ** 2 + (y - h * 0.2) ** 2 < (h * 0.08) ** 2
    rgb[sun] = [1.0, 0.9, 0.6]
    alpha = np.full((h, w), 255, np.uint8)
    alpha[int(h * 0.35) : int(h * 0.85), int(w * 0.35) : int(w * 0.65)] = 0  # transparent = repaint
    buf = io.BytesIO()
    Image.fromarray(np.dstack([(rgb * 255).astype(np.uint8), alpha]), "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def extra_paths_yaml(base: Path, models: Path) -> Path:
    folders = ["diffusers", "diffusion_models", "text_encoders", "vae", "loras"]
    text = "atelier_demo:\n    base_path: " + str(models) + "\n" + "".join(f"    {f}: {f}/\n" for f in folders)
    path = base / "extra_model_paths.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=os.environ.get("ATELIER_MODELS"),
                    help="a ComfyUI models folder to read FLUX.1 Fill from (default $ATELIER_MODELS)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the workflow's 28; 4 on random weights)")
    ap.add_argument("--out", type=Path, default=REPO / "out", help="where the result picture is written")
    ap.add_argument("--base", type=Path, default=cache_dir() / "demo", help="ComfyUI's --base-directory for the demo")
    a = ap.parse_args()

    a.base.mkdir(parents=True, exist_ok=True)
    extra = []
    if a.models:
        extra = ["--extra-model-paths-config", str(extra_paths_yaml(a.base, Path(a.models).expanduser().resolve()))]
    server = ComfyServer(a.base, REPO, extra_args=extra)
    log.info("booting ComfyUI with Atelier (base directory %s) ...", a.base)
    server.start(timeout=240)
    try:
        client = ComfyClient(server.url)
        options = client.object_info("AtelierFluxFillLoader")["input"]["required"]["model"][1]["options"]
        real = [o for o in options if DEMO_MODEL not in o]
        random_weights = not real
        if random_weights:
            log.warning("\n*** No FLUX.1 Fill model found (models/diffusers/<folder> or "
                        "models/diffusion_models/flux1-fill-dev.safetensors + text_encoders + vae).\n"
                        "*** Generating RANDOM demo weights: the output picture is NOISE. It proves the wiring, "
                        "not the quality.\n*** Point ATELIER_MODELS at your ComfyUI models folder for a real run.\n")
            target = a.base / "models" / "diffusers" / DEMO_MODEL
            if not (target / "model_index.json").exists():
                from tests.harness import tiny_flux

                tiny_flux.build_diffusers(target, seed=0, scale=2)
            choice = f"diffusers/{DEMO_MODEL}"
        else:
            choice = real[0]
        log.info("model: %s", choice)
        prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
        image_name = next(n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage")
        client.upload_image(example_image(), image_name)
        for node in prompt.values():
            if node["class_type"] == "AtelierFluxFillLoader":
                node["inputs"]["model"] = choice
            if node["class_type"] == "AtelierFluxFill":
                node["inputs"]["steps"] = a.steps or (4 if random_weights else node["inputs"]["steps"])
        t0 = time.perf_counter()
        entry = client.run(prompt, timeout=3600)
        if not ComfyClient.succeeded(entry):
            log.error("the workflow failed: %s", ComfyClient.error_message(entry))
            return 1
        save_id = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
        a.out.mkdir(parents=True, exist_ok=True)
        written = []
        for ref in entry["outputs"][save_id]["images"]:
            dst = a.out / ref["filename"]
            dst.write_bytes(client.view(ref["filename"], ref.get("subfolder", ""), ref.get("type", "output")))
            written.append(dst)
        log.info("done in %.1f s: %s%s", time.perf_counter() - t0, ", ".join(map(str, written)),
                 "  (RANDOM weights: noise by design)" if random_weights else "")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
