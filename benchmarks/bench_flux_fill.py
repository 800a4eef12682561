"""FLUX.1 Fill benchmark: full-size architecture, random weights, every quantization × offload setting.

    python benchmarks/bench_flux_fill.py make  --out /tmp/flux-fill-full        # build the random model once
    python benchmarks/bench_flux_fill.py run   --model /tmp/flux-fill-full --combos none:none,nf4:sequential ...
                                               --json benchmarks/results/flux_fill_<gpu>.json

`make` writes a diffusers FluxFillPipeline folder with FLUX.1-Fill-dev's architecture (transformer 11.9 B params,
T5-XXL encoder, CLIP-L, FLUX VAE) filled with random bf16 weights: nothing is downloaded, and speed and memory are
those of the real model. `run` loads it through Atelier's engine (the code the nodes call) once per setting and
times a 1024×1024 inpaint: per denoising step (CUDA-synchronised, first step excluded as warm-up), the whole job
(text encoders + steps + VAE), peak VRAM (torch.cuda.max_memory_allocated), load time and VRAM left after release.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atelier import fill, stage  # noqa: E402
from atelier.registry import REGISTRY  # noqa: E402
from atelier.types import FluxFillFiles, FluxFillSpec  # noqa: E402

log = logging.getLogger("atelier.bench")
GiB = 1024**3

FLUX_FILL_TRANSFORMER = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=19, num_single_layers=38,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False,
              use_cache=False, pad_token_id=0, eos_token_id=1)


def _randomise(module: torch.nn.Module, device: str, seed: int) -> torch.nn.Module:
    """Materialise a meta-initialised module on ``device`` with small random bf16 weights (fast, no CPU init)."""
    module = module.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")):
                p.fill_(1.0) if name.endswith(("weight", "scale")) else p.zero_()
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return module


def random_pipeline(tokenizers: Path):
    """FluxFillPipeline with FLUX.1-Fill-dev's architecture and random bf16 weights, transformer and T5 built on the
    GPU (meta device + to_empty: no CPU init); tokenizers from a ComfyUI tree."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    dev = "cuda"
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_FILL_TRANSFORMER)
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    transformer = _randomise(transformer, dev, 1).to(torch.bfloat16)
    t5 = _randomise(t5, dev, 2).to(torch.bfloat16)
    torch.manual_seed(3)
    vae = AutoencoderKL(**FLUX_VAE).to(torch.bfloat16)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(torch.bfloat16)
    return FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=vae, text_encoder=clip,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers / "comfy" / "sd1_tokenizer", model_max_length=77),
        text_encoder_2=t5,
        tokenizer_2=T5TokenizerFast.from_pretrained(tokenizers / "comfy" / "text_encoders" / "t5_tokenizer"),
        transformer=transformer)


def make(out: Path, tokenizers: Path) -> None:
    t0 = time.perf_counter()
    pipe = random_pipeline(tokenizers)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    n = sum(p.numel() for p in pipe.transformer.parameters())
    log.info("made %s: transformer %.2f B params, in %.0f s", out, n / 1e9, time.perf_counter() - t0)


class StepTimer:
    def __init__(self):
        self.times: list[float] = []

    def step(self, n: int = 1) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def stats(self) -> dict:
        """Mean step (the first interval starts at the first step's end: warm-up excluded) and every step."""
        per = [b - a for a, b in zip(self.times, self.times[1:])]
        return {"step_s": round(sum(per) / len(per), 4) if per else None, "step_s_all": [round(x, 4) for x in per]}


def run_one(model_dir: Path, quantization: str, offload: str, steps: int, size: int, **toggles) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    spec = FluxFillSpec(files=FluxFillFiles("diffusers", str(model_dir)), quantization=quantization,
                        offload=offload, device="cuda", **toggles)
    row: dict = {"quantization": quantization, "offload": offload, **toggles}
    try:
        t0 = time.perf_counter()
        handle = fill.make_handle(spec)
        model = stage.get(fill.STAGE, handle)
        torch.cuda.synchronize()
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["resolved_offload"] = model.offload
        row["notes"] = list(model.notes)
        row["vram_after_load_gib"] = round((torch.cuda.memory_allocated() - base) / GiB, 2)
        g = torch.Generator().manual_seed(0)
        image = torch.rand(1, size, size, 3, generator=g)
        mask = torch.zeros(1, size, size)
        mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
        torch.cuda.reset_peak_memory_stats()
        timer = StepTimer()
        t1 = time.perf_counter()
        out = fill.inpaint(model, image, mask, "a ceramic vase on a wooden table, soft light", steps=steps,
                           guidance=30.0, seed=0, composite_back=True, progress=timer)
        torch.cuda.synchronize()
        row["job_s"] = round(time.perf_counter() - t1, 2)
        row.update(timer.stats())
        row["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        row["finite"] = bool(torch.isfinite(out).all())
        del model, out
        free_cuda()
        row["vram_after_release_gib"] = round((torch.cuda.memory_allocated() - base) / GiB, 3)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures as rows
        log.exception("setting %s/%s failed", quantization, offload)
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        free_cuda()
    log.info("%s", json.dumps(row))
    return row


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--tokenizers", type=Path, required=True, help="a ComfyUI tree (its bundled CLIP-L and T5 tokenizers are used)")
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--combos", default="none:none,none:model,none:sequential,int8:none,int8:model,int8:sequential,"
                                       "nf4:none,nf4:model,nf4:sequential,none:auto")
    r.add_argument("--toggles", default="", help="extra runs, e.g. 'none:none:first_block_cache=0.1;...'")
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--size", type=int, default=1024)
    r.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out, a.tokenizers)
        return
    rows = []
    if a.json.exists():
        rows = json.loads(a.json.read_text()).get("rows", [])
    for combo in [c for c in a.combos.split(",") if c]:
        q, o = combo.split(":")
        rows.append(run_one(a.model, q, o, a.steps, a.size))
        _write(a, rows)
    for extra in [t for t in a.toggles.split(";") if t]:
        q, o, kv = extra.split(":")
        kw = {}
        for pair in kv.split("+"):
            k, v = pair.split("=")
            kw[k] = (v == "true") if v in ("true", "false") else float(v)
        rows.append(run_one(a.model, q, o, a.steps, a.size, **kw))
        _write(a, rows)


def _write(a, rows: list) -> None:
    doc = {
        **environment(), "size": a.size, "steps": a.steps, "model": "FLUX.1-Fill-dev architecture, random bf16 weights (benchmarks/bench_flux_fill.py make)",
        "rows": rows,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1))


def free_cuda() -> None:
    """Drop every loaded Atelier model and hand the cached VRAM back (between settings, after a failure too)."""
    REGISTRY.release_all()
    gc.collect()
    torch.cuda.empty_cache()


def environment() -> dict:
    """The GPU and package versions a results file records."""
    import diffusers
    import transformers

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "bitsandbytes": _version("bitsandbytes"), "python": platform.python_version()}


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
