"""Where the VRAM and the time of FLUX Fill's streaming modes go: peak VRAM per phase (CLIP, T5, VAE encode,
transformer steps, VAE decode) and per-step time, for Atelier's `sequential` (diffusers group offloading, leaf
level, CUDA stream) and for block-level streaming, in bf16 and nf4.

    python benchmarks/profile_offload.py --model <base>/models/diffusers/FLUX.1-Fill-dev-random --json out.json

Rows: {"mode", "step_s", "peak_gib", "phases": {phase: peak GiB}}; 1024², 4 steps (first excluded from step_s).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("atelier.bench")
GiB = 1024**3


class PhasePeaks:
    """Forward hooks that reset the CUDA peak counter when a phase starts and read it when it ends."""

    def __init__(self):
        self.peaks: dict[str, float] = {}

    def watch(self, module: torch.nn.Module, name: str) -> None:
        def pre(_m, _a):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def post(_m, _a, _o):
            torch.cuda.synchronize()
            self.peaks[name] = max(self.peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / GiB)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def run(model: Path, quant: str, offload_type: str, steps: int, size: int) -> dict:
    from diffusers import FluxFillPipeline
    from diffusers.hooks import apply_group_offloading

    kw: dict = {"torch_dtype": torch.bfloat16}
    if quant == "nf4":
        from diffusers.quantizers import PipelineQuantizationConfig

        kw["quantization_config"] = PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit", components_to_quantize=["transformer", "text_encoder_2"],
            quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16})
    pipe = FluxFillPipeline.from_pretrained(model, **kw)
    dev = torch.device("cuda")
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        m = getattr(pipe, name)
        if name == "transformer" and offload_type == "block_level":
            apply_group_offloading(m, onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=True)
        else:
            apply_group_offloading(m, onload_device=dev, offload_device=torch.device("cpu"), offload_type="leaf_level",
                                   use_stream=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() / GiB
    peaks = PhasePeaks()
    peaks.watch(pipe.text_encoder, "clip")
    peaks.watch(pipe.text_encoder_2, "t5")
    peaks.watch(pipe.vae.encoder, "vae_encode")
    peaks.watch(pipe.transformer, "transformer_step")
    peaks.watch(pipe.vae.decoder, "vae_decode")
    stamps: list[float] = []

    def on_step(_p, _i, _t, kwargs):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kwargs

    image = torch.rand(1, 3, size, size)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 1
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        pipe(prompt="a vase", image=image, mask_image=mask, height=size, width=size, num_inference_steps=steps,
             guidance_scale=30.0, generator=torch.Generator("cpu").manual_seed(0), max_sequence_length=512,
             output_type="pt", callback_on_step_end=on_step)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    row = {"mode": f"{quant} {offload_type}", "resident_gib": round(resident, 3),
           "step_s": round(sum(gaps) / len(gaps), 4) if gaps else None,
           "phases": {k: round(v, 3) for k, v in peaks.peaks.items()}}
    del pipe
    torch.cuda.empty_cache()
    log.info("%s", json.dumps(row))
    return row


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--modes", default="none:leaf_level,nf4:leaf_level,nf4:block_level,none:block_level")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    rows = []
    for m in a.modes.split(","):
        q, o = m.split(":")
        try:
            rows.append(run(a.model, q, o, a.steps, a.size))
        except Exception as e:  # noqa: BLE001 - record and go on
            log.exception("%s failed", m)
            rows.append({"mode": m, "error": f"{type(e).__name__}: {e}"[:400]})
        a.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "size": a.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
