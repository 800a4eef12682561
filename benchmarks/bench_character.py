"""Realtime character benchmark: full-size SD1.5 + OpenPose ControlNet + IP-Adapter (ViT-H), random fp16 weights, 512².

    python benchmarks/bench_character.py --json benchmarks/results/character_<gpu>.json

One command: it writes the models in their on-disk layouts under --work (default /tmp/atelier-bench-character,
~4.3 GB; reused when there), then loads them through Atelier's engine (atelier.character: the code the nodes call)
and measures, per row, frames per second (CUDA-synchronised wall time of `Session.run` over whole passes, after
warm-up passes) and peak VRAM (torch.cuda.max_memory_allocated):

* steps 1, 2, 4, 20 × VAE taesd / full × batch 1 / 8 × compile off / on (torch.compile of UNet + ControlNet),
  guidance 1 (no CFG), IP-Adapter on, every frame fresh (reuse 0: the step count is what runs);
* CUDA graphs: batch 1 and 8 at 2 steps with UNet + ControlNet compiled in mode "reduce-overhead";
* latent reuse: 4 steps with reuse 0.5 (2 steps run per frame after the first);
* the plain-diffusers ceiling of issue 13 on the same machine (StableDiffusionControlNetPipeline, no IP-Adapter,
  no CFG, TAESD, eager fp16) at 1, 2, 4 steps, batch 1 and 8;
* the RTX 2060 setting (fp16, batch 1, attention + VAE slicing, TAESD, 4 steps) with its peak VRAM, and the
  arithmetic for a 2060: FLOPs of one UNet + ControlNet step (torch.utils.flop_counter) and the weight bytes read
  per step, scaled by the fraction of the GPU's peak this run reached.

Rows are appended to the JSON file as they finish (a crash keeps what was measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_comfy import RssSampler  # noqa: E402
from bench_flux_fill import _randomise, environment  # noqa: E402 - shared benchmark helpers

from atelier import character, sd15_files  # noqa: E402

log = logging.getLogger("atelier.bench")
GiB = 1024**3
SIZE = 512
# ViT-H-14 (laion2B), the SD1.5 IP-Adapter's image encoder
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
             patch_size=14, projection_dim=1024, hidden_act="gelu")
# RTX 2060 (TU106, 6 GB): fp16 tensor-core peak with fp32 accumulate, memory bandwidth
RTX2060 = {"fp16_tflops": 25.8, "bandwidth_gbs": 336.0}
PEAK_FP16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0, "RTX 4080": 97.5}


def _cfg(name: str) -> dict:
    cfg = sd15_files.facts(name)
    cfg.pop("_class_name", None)
    return cfg


def make(work: Path, tokenizer: str) -> dict:
    """Random full-size models in users' layouts: an SD1.5 diffusers folder, a ControlNet folder, h94's IP-Adapter
    file, the ViT-H CLIP vision file, madebyollin's TAESD files."""
    from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    paths = {"sd15": work / "sd15", "controlnet": work / "controlnet", "ip_adapter": work / "ip-adapter_sd15.safetensors",
             "clip_vision": work / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
             "taesd": work / "vae_approx" / "taesd_decoder.safetensors"}
    if (work / "done.json").is_file():
        return paths
    dev = "cuda"
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_cfg("unet"))
        cn = ControlNetModel(**_cfg("controlnet"))
        vae = AutoencoderKL(**_cfg("vae"))
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in _cfg("text_encoder").items() if k != "architectures"}))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
        tiny = AutoencoderTiny(**_cfg("taesd"))
    for i, m in enumerate((unet, cn, vae, text, vision, tiny)):
        _randomise(m, dev, i).half()
    unet.save_pretrained(paths["sd15"] / "unet")
    vae.save_pretrained(paths["sd15"] / "vae")
    text.save_pretrained(paths["sd15"] / "text_encoder")
    PNDMScheduler.from_config(_cfg("scheduler")).save_pretrained(paths["sd15"] / "scheduler")
    (paths["sd15"] / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cn.save_pretrained(paths["controlnet"])
    save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, str(paths["clip_vision"]))
    g = torch.Generator(dev).manual_seed(9)
    rnd = lambda *s: (torch.randn(*s, generator=g, device=dev) * 0.02).half()  # noqa: E731
    ipa = {"image_proj.proj.weight": rnd(768 * 4, 1024), "image_proj.proj.bias": rnd(768 * 4),
           "image_proj.norm.weight": rnd(768) + 1, "image_proj.norm.bias": rnd(768)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            block = unet.config.block_out_channels
            hidden = (block[-1] if name.startswith("mid") else list(reversed(block))[int(name.split(".")[1])]
                      if name.startswith("up") else block[int(name.split(".")[1])])
            ipa[f"ip_adapter.{key}.to_k_ip.weight"] = rnd(hidden, 768)
            ipa[f"ip_adapter.{key}.to_v_ip.weight"] = rnd(hidden, 768)
            key += 2
    save_file({k: v.contiguous().cpu() for k, v in ipa.items()}, str(paths["ip_adapter"]))
    dec = {f"{int(k.split('.')[2]) + 1}.{'.'.join(k.split('.')[3:])}": v.contiguous()
           for k, v in tiny.state_dict().items() if k.startswith("decoder.layers.")}
    paths["taesd"].parent.mkdir(parents=True, exist_ok=True)
    save_file(dec, str(paths["taesd"]))
    (work / "done.json").write_text("{}")
    del unet, cn, vae, text, vision, tiny
    torch.cuda.empty_cache()
    return paths


def spec(paths: dict, tokenizer: str, *, taesd=True, compile=False, slicing=False, ip=True) -> character.CharacterSpec:
    return character.CharacterSpec(
        model=str(paths["sd15"]), controlnet=str(paths["controlnet"]), tokenizer=tokenizer,
        ip_adapter=str(paths["ip_adapter"]) if ip else None, clip_vision=str(paths["clip_vision"]) if ip else None,
        taesd=str(paths["taesd"]) if taesd else None, offload="none", attention_slicing=slicing, vae_slicing=slicing,
        dtype="fp16", device="cuda", compile=compile)


def poses(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return (torch.rand(n, SIZE, SIZE, 3, generator=g) > 0.97).float()  # sparse bright dots: a skeleton-like map


def measure(model, steps: int, batch: int, reuse: float = 0.0, passes: int = 4, warmup: int = 2) -> dict:
    ref = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(1))
    s = character.Session(model, ref if model.has_ip_adapter else None, "a character",
                          settings=character.Settings(steps=steps, guidance=1.0, reuse=reuse, batch=batch))
    p = poses(batch)
    for _ in range(warmup):
        s.run(p)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rss = RssSampler(os.getpid())
    t0 = time.perf_counter()
    for _ in range(passes):
        s.run(p)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    host = rss.stop()
    rec = s.records[-batch * passes:]
    return {"fps": round(batch * passes / wall, 2), "ms_per_frame": round(1000 * wall / (batch * passes), 2),
            "model_ms": round(sum(r.model_ms for r in rec) / len(rec), 2),
            "decode_ms": round(sum(r.decode_ms for r in rec) / len(rec), 2),
            "peak_vram_gib": round(torch.cuda.max_memory_allocated() / GiB, 3), "host_rss_peak_gib": round(host / GiB, 2)}


def plain_diffusers(paths: dict, tokenizer: str, steps: int, batch: int, passes: int = 4) -> dict:
    """The issue's ceiling: StableDiffusionControlNetPipeline, eager fp16, no IP-Adapter, no CFG, TAESD."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(paths["sd15"]), controlnet=ControlNetModel.from_pretrained(str(paths["controlnet"]), torch_dtype=torch.float16),
        tokenizer=sd15_files.clip_tokenizer(tokenizer), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, torch_dtype=torch.float16).to("cuda")
    pipe.vae = sd15_files.load_taesd(str(paths["taesd"]), torch.float16)[0].to("cuda")
    pipe.set_progress_bar_config(disable=True)
    img = poses(batch).permute(0, 3, 1, 2).cuda().half()
    call = lambda: pipe(["a character"] * batch, image=img, num_inference_steps=steps, guidance_scale=1.0,  # noqa: E731
                        output_type="pt")
    call(); call()  # noqa: E702
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rss = RssSampler(os.getpid())
    t0 = time.perf_counter()
    for _ in range(passes):
        call()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {"fps": round(batch * passes / wall, 2), "peak_vram_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
           "host_rss_peak_gib": round(rss.stop() / GiB, 2)}
    del pipe
    return out


def step_cost(model) -> dict:
    """FLOPs of one UNet + ControlNet step at 512², batch 1, no CFG, and the weight bytes it reads."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = model.pipe
    lat = torch.randn(1, 4, SIZE // 8, SIZE // 8, device="cuda", dtype=torch.float16)
    ctx = torch.randn(1, 77, 768, device="cuda", dtype=torch.float16)
    cond = torch.rand(1, 3, SIZE, SIZE, device="cuda", dtype=torch.float16)
    t = torch.tensor([500], device="cuda")
    kw = {}
    if model.has_ip_adapter:
        kw["added_cond_kwargs"] = {"image_embeds": [torch.randn(1, 1, 1024, device="cuda", dtype=torch.float16)]}
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        down, mid = pipe.controlnet(lat, t, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
        pipe.unet(lat, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid, **kw)
    params = sum(p.numel() for m in (pipe.unet, pipe.controlnet) for p in m.parameters())
    return {"flops_per_step": fc.get_total_flops(), "weight_bytes_per_step": 2 * params}


def rtx2060_estimate(cost: dict, measured_step_s: float, gpu: str, steps: int = 4, decode_s_h200: float = 0.0) -> dict:
    peak = next((v for k, v in PEAK_FP16_TFLOPS.items() if k in gpu), None)
    achieved = cost["flops_per_step"] / measured_step_s / 1e12
    fraction = achieved / peak if peak else 0.35
    compute_s = cost["flops_per_step"] / (fraction * RTX2060["fp16_tflops"] * 1e12)
    memory_s = cost["weight_bytes_per_step"] / (RTX2060["bandwidth_gbs"] * 1e9)
    step_s = max(compute_s, memory_s)
    frame_s = steps * step_s + decode_s_h200 * (peak or 989.0) / RTX2060["fp16_tflops"]
    return {"achieved_tflops_here": round(achieved, 1), "fraction_of_peak": round(fraction, 3),
            "rtx2060_step_s": round(step_s, 4), "rtx2060_compute_s": round(compute_s, 4),
            "rtx2060_memory_s": round(memory_s, 4), "rtx2060_frame_s": round(frame_s, 3),
            "rtx2060_fps": round(1 / frame_s, 2), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "character.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/atelier-bench-character"))
    ap.add_argument("--tokenizer", default=None, help="ComfyUI's comfy/sd1_tokenizer (default: the cached ComfyUI)")
    ap.add_argument("--quick", action="store_true", help="steps 2 only, no compile (a smoke run)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tokenizer = a.tokenizer or str(Path.home() / ".cache/atelier/comfyui/comfy/sd1_tokenizer")
    paths = make(a.work, tokenizer)
    env = environment()
    rows: list[dict] = []

    def add(row: dict) -> None:
        row.update(gpu=env["gpu"])
        rows.append(row)
        log.info("%s", row)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"environment": env, "size": SIZE, "rows": rows}, indent=1))

    steps_list = (2,) if a.quick else (1, 2, 4, 20)
    for compile_ in ((False,) if a.quick else (False, True)):
        for taesd in (True, False):
            model = character.load(character.make_handle(spec(paths, tokenizer, taesd=taesd, compile=compile_)))
            for steps in steps_list:
                for batch in (1, 8):
                    add({"kind": "atelier", "steps": steps, "vae": "taesd" if taesd else "full", "batch": batch,
                         "compile": compile_, "ip_adapter": True, **measure(model, steps, batch)})
            if not compile_ and taesd:
                add({"kind": "atelier reuse 0.5", "steps": 4, "steps_run": 2, "vae": "taesd", "batch": 1,
                     "compile": False, **measure(model, 4, 1, reuse=0.5)})
                cost = step_cost(model)
                one = measure(model, 1, 1)
                add({"kind": "step cost", **cost, "step_ms_here": one["model_ms"]})
                add({"kind": "rtx2060 estimate", **rtx2060_estimate(cost, one["model_ms"] / 1000, env["gpu"],
                                                                    decode_s_h200=one["decode_ms"] / 1000)})
            if compile_ and taesd:  # CUDA graphs on top of compile
                for m in (model.pipe.unet, model.pipe.controlnet):
                    m.compile(mode="reduce-overhead", fullgraph=False, dynamic=False)
                for batch in (1, 8):
                    add({"kind": "atelier cuda graphs", "steps": 2, "vae": "taesd", "batch": batch, "compile": True,
                         **measure(model, 2, batch, warmup=4)})
            model.close()
            del model
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
    # the RTX 2060 setting: its VRAM on this card
    model = character.load(character.make_handle(spec(paths, tokenizer, taesd=True, slicing=True)))
    add({"kind": "rtx2060 setting", "steps": 4, "vae": "taesd", "batch": 1, "slicing": True, **measure(model, 4, 1)})
    model.close()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    for steps in ((2,) if a.quick else (1, 2, 4)):
        for batch in (1, 8):
            add({"kind": "plain diffusers (ceiling)", "steps": steps, "vae": "taesd", "batch": batch,
                 "ip_adapter": False, **plain_diffusers(paths, tokenizer, steps, batch)})
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
