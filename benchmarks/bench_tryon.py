"""Try-on benchmark on the GPU: full-size architectures, random weights, one command.

    python benchmarks/bench_tryon.py --work /tmp/tryon-bench --json benchmarks/results/tryon_<gpu>.json
    (--parts sdxl / --parts flux: one half per run, e.g. --json …/tryon_sdxl_<gpu>.json)

Builds once under --work (nothing is downloaded): an SDXL inpainting checkpoint folder (9-channel UNet 2.6 B params,
both text encoders, VAE; SDXL's configs from atelier/configs/sdxl), a depth ControlNet (SDXL's full config), an
h94-layout IP-Adapter Plus (Resampler 1280 wide, depth 4, 16 tokens) with a ViT-H/14 CLIP vision encoder, and a
kohya-format LoRA (rank 32 on every UNet attention projection); and, for the FLUX rows, the random FLUX.1-Fill
folder of bench_flux_fill.py plus a rank-32 LoRA.

SDXL rows (1024×768, 30 steps, inpaint + ControlNet + IP-Adapter Plus + one LoRA), through Atelier's engine (the
code the nodes call): job time, peak VRAM (torch.cuda.max_memory_allocated) and the process's peak host RAM (RSS
sampled every 50 ms while the row runs) for bf16 resident (offload none), `model`, `sequential`, and nf4 UNet; plus
plain diffusers (StableDiffusionXLControlNetInpaintPipeline + load_ip_adapter + load_lora_weights) on the same files at
its best for each placement: all on the GPU (`plain`), enable_model_cpu_offload (`plain/model`), leaf-level group
offload with a side stream (`plain/sequential`). Each row runs its job twice in one process (warm-up, then timed),
the way a re-queued graph finds its models loaded. Targets (issue 11): resident ≤ 1.05× plain
diffusers' time; model ≤ 10 GiB; sequential ≤ 4 GiB.

FLUX rows: Try-On (FLUX Fill) with a 1024² person crop beside a 1024² garment (1024×2048 picture), nf4 with and
without the LoRA: mean step time (first step excluded). Target: with LoRA ≤ 1.1× without.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atelier import fill, flux_tryon, lora, sdxl_files, stage, tryon  # noqa: E402
from atelier.types import FluxFillFiles, FluxFillSpec  # noqa: E402
from benchmarks.bench_flux_fill import (  # noqa: E402
    GiB,
    StepTimer,
    _randomise,
    environment,
    free_cuda,
)
from benchmarks.bench_comfy import RssSampler  # noqa: E402
from benchmarks.bench_flux_fill import make as make_flux  # noqa: E402

log = logging.getLogger("atelier.bench")
W, H, STEPS = 768, 1024, 30
PROMPT = "a person wearing a red cotton t-shirt with a white printed logo"


@contextmanager
def recorded(row: dict, what: str):
    """Run a benchmark row: a failure is recorded in the row (never raised); models released afterwards."""
    free_cuda()
    torch.cuda.reset_peak_memory_stats()
    rss = RssSampler(os.getpid())
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a benchmark records failures as rows
        log.exception("%s failed", what)
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    row["host_rss_peak_gib"] = round(rss.stop() / GiB, 2)  # this process, while the row ran (loading included)
    free_cuda()
    log.info("%s", json.dumps(row))


def timed(row: dict, t0: float, timer: StepTimer | None = None) -> None:
    torch.cuda.synchronize()
    row["job_s"] = round(time.perf_counter() - t0, 2)
    if timer is not None:
        row.update(timer.stats())
    row["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)


def comfy_tree() -> Path:
    from tests.harness.comfy_server import comfy_root

    return comfy_root()


def _build(cls, config: dict, seed: int):
    """A full-size module with random bf16 weights made on the GPU (meta init, no CPU work)."""
    from transformers import PreTrainedModel

    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
    with torch.device("meta"):
        model = cls(cls.config_class(**config)) if issubclass(cls, PreTrainedModel) else cls(**config)
    return _randomise(model, "cuda", seed).to(torch.bfloat16)


def make_sdxl(work: Path) -> dict[str, Path]:
    """The full-size random SDXL try-on files (skipped when already there)."""
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from tests.harness import tiny_sdxl

    paths = {"folder": work / "sdxl-inpaint", "controlnet": work / "controlnet-depth-sdxl",
             "h94": work / "h94", "clip": work / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
             "lora": work / "loras" / "kohya_rank32.safetensors"}
    paths["ip"] = paths["h94"] / "sdxl_models" / "ip-adapter-plus_sdxl_vit-h.safetensors"
    if (work / ".sdxl-done").exists():
        return paths
    t0 = time.perf_counter()
    unet = _build(UNet2DConditionModel, dict(sdxl_files.template("unet"), in_channels=9), 1)
    te1 = _build(CLIPTextModel, sdxl_files.template("text_encoder"), 2)
    te2 = _build(CLIPTextModelWithProjection, sdxl_files.template("text_encoder_2"), 3)
    torch.manual_seed(6)
    vae = AutoencoderKL(**{k: v for k, v in sdxl_files.template("vae").items() if not k.startswith("_")})
    tok1, tok2 = tryon._tokenizers(str(comfy_tree() / "comfy" / "sd1_tokenizer"))
    sched = EulerDiscreteScheduler.from_config(sdxl_files.template("scheduler"))
    StableDiffusionXLInpaintPipeline(vae=vae.to(torch.bfloat16), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched).save_pretrained(
        paths["folder"], safe_serialization=True, max_shard_size="10GB")
    _build(ControlNetModel, sdxl_files.template("controlnet"), 4).save_pretrained(paths["controlnet"],
                                                                                 safe_serialization=True)
    clip = _build(CLIPVisionModelWithProjection, sdxl_files.template("clip_vision"), 5)
    from safetensors.torch import save_file

    paths["clip"].parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in clip.state_dict().items()}, paths["clip"])
    state = tiny_sdxl.ip_adapter_state(unet, clip.config, plus=True, tokens=16, resampler=(1280, 20, 64, 4))
    state = {part: {k: v.to(torch.bfloat16) for k, v in d.items()} for part, d in state.items()}
    tiny_sdxl.save_ip_adapter(state, paths["ip"])
    tiny_sdxl.kohya_lora(unet, te1, paths["lora"], rank=32)
    (work / ".sdxl-done").write_text("ok")
    log.info("made the SDXL try-on files in %.0f s", time.perf_counter() - t0)
    del unet, te1, te2, clip
    free_cuda()
    return paths


def inputs():
    g = torch.Generator().manual_seed(0)
    person = torch.rand(1, H, W, 3, generator=g)
    garment = torch.rand(1, 1024, 1024, 3, generator=g)
    depth = torch.rand(1, H, W, 3, generator=g)
    mask = torch.zeros(1, H, W)
    mask[:, H // 5: 4 * H // 5, W // 6: 5 * W // 6] = 1
    return person, garment, depth, mask


def sdxl_row(paths: dict, quantization: str, offload: str) -> dict:
    row: dict = {"stage": "sdxl_tryon", "quantization": quantization, "offload": offload}
    with recorded(row, f"SDXL {quantization}/{offload}"):
        files = tryon.TryOnFiles(layout="diffusers", path=str(paths["folder"]), controlnet=str(paths["controlnet"]),
                                 ip_adapter=str(paths["ip"]), clip_vision=str(paths["clip"]))
        handle = tryon.make_handle(tryon.TryOnSpec(files=files, quantization=quantization, offload=offload,
                                                   device="cuda"))
        handle = lora.with_lora(handle, lora.ref(str(paths["lora"]), 0.8))
        t0 = time.perf_counter()
        model = stage.get(tryon.STAGE, handle)
        row["load_s"] = round(time.perf_counter() - t0, 1)
        row["notes"] = list(model.notes)
        person, garment, depth, mask = inputs()
        for attempt in ("warmup", "timed"):
            torch.cuda.reset_peak_memory_stats()
            timer = StepTimer()
            t1 = time.perf_counter()
            out = tryon.run(model, person, garment, mask, depth=depth, prompt=PROMPT, steps=STEPS, seed=0,
                            loras=handle.loras, progress=timer)
        timed(row, t1, timer)
        row["finite"] = bool(torch.isfinite(out).all())
    return row


def plain_diffusers_row(paths: dict, offload: str = "none") -> dict:
    """The same job in a plain diffusers script, bf16, placed at diffusers' best for ``offload``: none (everything on
    the GPU), model (enable_model_cpu_offload), sequential (leaf-level group offload, prefetched on a side stream)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetInpaintPipeline
    from diffusers.image_processor import IPAdapterMaskProcessor

    from atelier import ip_adapter

    row: dict = {"stage": "sdxl_tryon", "quantization": "none", "offload": offload, "peer": "plain diffusers"}
    with recorded(row, f"plain diffusers {offload}"):
        pipe = StableDiffusionXLControlNetInpaintPipeline.from_pretrained(
            paths["folder"], controlnet=ControlNetModel.from_pretrained(paths["controlnet"], torch_dtype=torch.bfloat16),
            torch_dtype=torch.bfloat16, add_watermarker=False)
        ip_adapter.load_into(pipe, ip_adapter.read(str(paths["ip"])), str(paths["clip"]), torch.bfloat16)
        pipe.load_lora_weights(str(paths["lora"]), adapter_name="l")
        pipe.set_adapters(["l"], [0.8])
        if offload == "none":
            pipe.to("cuda")
        elif offload == "model":
            pipe.enable_model_cpu_offload()
        elif offload == "sequential":
            pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                      offload_type="leaf_level", use_stream=True)
        else:
            raise ValueError(f"plain diffusers offload none, model or sequential; got {offload!r}")
        pipe.set_ip_adapter_scale(0.8)
        pipe.set_progress_bar_config(disable=True)
        person, garment, depth, mask = inputs()
        ip_mask = IPAdapterMaskProcessor().preprocess(mask.unsqueeze(1), height=H, width=W).reshape(1, 1, H, W)
        for attempt in ("warmup", "timed"):
            torch.cuda.reset_peak_memory_stats()
            t1 = time.perf_counter()
            pipe(prompt=PROMPT, image=person.permute(0, 3, 1, 2), mask_image=mask.unsqueeze(1),
                 control_image=depth.permute(0, 3, 1, 2), height=H, width=W, strength=0.99, num_inference_steps=STEPS,
                 guidance_scale=7.0, controlnet_conditioning_scale=0.6, ip_adapter_image=tryon._pil(garment[0]),
                 cross_attention_kwargs={"ip_adapter_masks": [ip_mask]}, generator=torch.Generator("cpu").manual_seed(0),
                 output_type="pt")
        timed(row, t1)
        del pipe
    return row


def make_flux_lora(folder: Path, path: Path) -> Path:
    if path.exists():
        return path
    from diffusers import FluxTransformer2DModel

    from tests.harness import tiny_flux

    with torch.device("meta"):  # only the layer shapes are read
        t = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder, subfolder="transformer"))
    tiny_flux.random_lora(t, path, rank=32)
    return path


def flux_row(folder: Path, lora_path: Path | None, steps: int) -> dict:
    row: dict = {"stage": "flux_tryon", "quantization": "nf4", "offload": "none", "lora": bool(lora_path)}
    with recorded(row, "FLUX try-on"):
        handle = fill.make_handle(FluxFillSpec(files=FluxFillFiles("diffusers", str(folder)), quantization="nf4",
                                               offload="none", device="cuda"))
        if lora_path:
            handle = lora.with_lora(handle, lora.ref(str(lora_path), 1.0))
        model = stage.get(fill.STAGE, handle)
        g = torch.Generator().manual_seed(0)
        person, garment = torch.rand(1, 1024, 1024, 3, generator=g), torch.rand(1, 1024, 1024, 3, generator=g)
        mask = torch.ones(1, 1024, 1024)  # the crop is the whole picture: 1024 × (1024 + 1024)
        torch.cuda.reset_peak_memory_stats()
        timer = StepTimer()
        t1 = time.perf_counter()
        flux_tryon.run(model, person, garment, mask, PROMPT, steps=steps, height=1024, margin=0.0,
                       loras=handle.loras, progress=timer)
        timed(row, t1, timer)
    return row


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/atelier-tryon-bench"), help="where the random models go")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--parts", default="sdxl,flux", help="sdxl, flux or both (each fits a 10-minute slot)")
    ap.add_argument("--flux-steps", type=int, default=6)
    ap.add_argument("--sdxl-rows", default="plain,plain/model,plain/sequential,none/none,none/model,none/sequential,"
                                             "nf4/none",
                    help="SDXL rows: plain[/offload] (diffusers) and quantization/offload pairs (Atelier)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    parts = set(a.parts.split(","))
    rows = []
    if "sdxl" in parts:
        paths = make_sdxl(a.work)
        for row in a.sdxl_rows.split(","):
            kind, _, offload = row.partition("/")
            rows.append(plain_diffusers_row(paths, offload or "none") if kind == "plain" else
                        sdxl_row(paths, kind, offload))
    if "flux" in parts:
        flux = a.work / "flux-fill"
        if not (flux / "model_index.json").exists():
            make_flux(flux, comfy_tree())
            free_cuda()
        lora_path = make_flux_lora(flux, a.work / "loras" / "flux_rank32.safetensors")
        rows += [flux_row(flux, None, a.flux_steps), flux_row(flux, lora_path, a.flux_steps)]
    doc = {**environment(), "size": f"{W}x{H}", "steps": STEPS, "rows": rows,
           "model": "SDXL inpainting + depth ControlNet + IP-Adapter Plus (ViT-H) + kohya LoRA rank 32, random bf16 "
                    "weights; FLUX.1 Fill architecture nf4 ± LoRA rank 32 (benchmarks/bench_tryon.py)"}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1))
    log.info("wrote %s", a.json)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
