"""Qwen-Image-Layered benchmark: full-size architecture, random weights, a 640 px / 4-layer / 50-step split.

    python benchmarks/bench_layers.py make --out /data/qwen-layered-full --tokenizers ~/.cache/atelier/comfyui
    python benchmarks/bench_layers.py run  --model /data/qwen-layered-full \\
               --combos none:none,nf4:none,none:sequential --json benchmarks/results/layers_<gpu>.json

`make` writes a diffusers QwenImageLayeredPipeline folder with Qwen/Qwen-Image-Layered's architecture, filled with
random bf16 weights on the GPU (meta device + to_empty, no CPU init): the MMDiT transformer (60 blocks, 24 × 128
heads, layer-3D RoPE, additional timestep condition: 20.4 B parameters, 40.9 GB), the Qwen2.5-VL-7B text encoder with
its vision tower (8.3 B, 16.6 GB) and the RGBA Qwen-Image VAE. Nothing is downloaded; the tokenizer is the Qwen2.5-VL
one that ComfyUI ships. It needs ~58 GB of free disk (pick a machine with enough; the H100 box has 64 GB).

`run` loads the folder through Atelier's engine (atelier.layers: the code the nodes call) once per
quantization:offload setting and times `layers.split` on a 640-bucket picture, 4 layers, 50 steps, true CFG 4 (two
transformer passes per step, as the model card runs it), with a prompt (so the timing is the split, not a caption
of random tokens; `--caption` adds a run with the pipeline's own captioning). Per row: load time, VRAM after load,
whole job, mean step (CUDA-synchronised, first step excluded), peak VRAM (torch.cuda.max_memory_allocated), VRAM
left after release, and whether the layers are finite. Rows are appended to the JSON file after each setting.
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

from bench_flux_fill import StepTimer, _randomise, environment, free_cuda  # noqa: E402 - shared benchmark helpers

from atelier import layers, stage  # noqa: E402
from tests.harness.tiny_layered import CHAT_TEMPLATE  # noqa: E402 - Qwen2-VL's multimodal chat template

log = logging.getLogger("atelier.bench")
GiB = 1024**3

# Qwen/Qwen-Image-Layered's configs (transformer/config.json, vae/config.json, scheduler/scheduler_config.json)
TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56],
                   zero_cond_t=False, use_additional_t_cond=True, use_layer3d_rope=True)
VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
           temperal_downsample=[False, True, True], dropout=0.0, input_channels=4)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
                 time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
                 use_exponential_sigmas=False, use_karras_sigmas=False)
# Qwen2.5-VL-7B-Instruct's config.json (flat text settings + vision_config)
TEXT_ENCODER = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", vocab_size=152064,
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0,
    use_sliding_window=False, sliding_window=32768, max_window_layers=28, attention_dropout=0.0,
    initializer_range=0.02, use_cache=True, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
    vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
    video_token_id=151656, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                       in_chans=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2, spatial_patch_size=14,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                       temporal_patch_size=2),
)
GENERATION_CONFIG = dict(bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643], do_sample=True,
                         temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05)
PREPROCESSOR = dict(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor", do_resize=True,
                    do_rescale=True, do_normalize=True, do_convert_rgb=True, resample=3, rescale_factor=1 / 255,
                    min_pixels=3136, max_pixels=12845056, size={"shortest_edge": 3136, "longest_edge": 12845056},
                    patch_size=14, temporal_patch_size=2, merge_size=2,
                    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def _materialise(module_fn, device: str, seed: int) -> torch.nn.Module:
    """Build ``module_fn()`` with its parameters on the meta device, then give them random values on ``device``.

    Buffers and plain tensor attributes (rotary tables) are computed normally by the constructors and kept: only
    the parameters are left uninitialised by ``init_empty_weights`` and filled by ``_randomise``.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = module_fn()
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    module = _randomise(module, device, seed)
    with torch.no_grad():
        for n, b in module.named_buffers():
            if n in buffers:
                b.copy_(buffers[n].to(b.dtype))
    return module


def make(out: Path, comfy_tree: Path, device: str = "cuda") -> None:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageLayeredPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    t0 = time.perf_counter()
    cfg_dir = out.parent / f".{out.name}-config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(TEXT_ENCODER))
    te_config = AutoConfig.from_pretrained(cfg_dir)
    transformer = _materialise(lambda: QwenImageTransformer2DModel(**TRANSFORMER), device, 1).to(torch.bfloat16)
    text_encoder = _materialise(lambda: Qwen2_5_VLForConditionalGeneration(te_config), device, 2).to(torch.bfloat16)
    text_encoder.generation_config = GenerationConfig(**GENERATION_CONFIG)
    torch.manual_seed(3)
    vae = AutoencoderKLQwenImage(**VAE).to(torch.bfloat16)
    tok_dir = comfy_tree / "comfy" / "text_encoders" / "qwen25_tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    proc_dir = cfg_dir / "processor"  # the hub's processor/ layout, loaded back (works across transformers versions)
    tokenizer.save_pretrained(proc_dir)
    (proc_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (proc_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    processor = Qwen2VLProcessor.from_pretrained(proc_dir)
    pipe = QwenImageLayeredPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
                                    transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="10GB")
    (out / "processor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    n_t = sum(p.numel() for p in transformer.parameters())
    n_te = sum(p.numel() for p in text_encoder.parameters())
    log.info("made %s: transformer %.2f B, text encoder %.2f B params, in %.0f s", out, n_t / 1e9, n_te / 1e9,
             time.perf_counter() - t0)


def run_one(model_dir: Path, quantization: str, offload: str, steps: int, resolution: int, n_layers: int,
            prompt: str) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    spec = layers.LayeredSpec(path=str(model_dir), quantization=quantization, offload=offload, device="cuda")
    row: dict = {"quantization": quantization, "offload": offload, "resolution": resolution, "layers": n_layers,
                 "steps": steps, "captioned": not prompt}
    try:
        t0 = time.perf_counter()
        handle = layers.make_handle(spec)
        model = stage.get(layers.STAGE, handle)
        torch.cuda.synchronize()
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["resolved_offload"] = model.offload
        row["dtype"] = handle.dtype
        row["notes"] = list(model.notes)
        row["vram_after_load_gib"] = round((torch.cuda.memory_allocated() - base) / GiB, 2)
        image = torch.rand(1, 768, 1024, 3, generator=torch.Generator().manual_seed(0))  # 4:3 → the 640 bucket
        torch.cuda.reset_peak_memory_stats()
        timer = StepTimer()
        t1 = time.perf_counter()
        out = layers.split(model, image, layers=n_layers, resolution=resolution, steps=steps, cfg=4.0, seed=0,
                           prompt=prompt, language="en", progress=timer)
        torch.cuda.synchronize()
        row["job_s"] = round(time.perf_counter() - t1, 2)
        row.update(timer.stats())
        row["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        row["layer_size"] = list(out.layers.shape[1:3])
        row["finite"] = bool(torch.isfinite(out.layers).all() and torch.isfinite(out.alphas).all())
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
    m.add_argument("--tokenizers", type=Path, required=True, help="a ComfyUI tree (its Qwen2.5-VL tokenizer is used)")
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--combos", default="none:none,nf4:none,none:sequential",
                   help="quantization:offload settings, e.g. none:none,nf4:none,nf4:sequential,none:model")
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--layers", type=int, default=4)
    r.add_argument("--resolution", type=int, default=640)
    r.add_argument("--prompt", default="a poster: a cat on a red sofa, the title 'SALE' in bold letters, a white "
                                       "background")
    r.add_argument("--caption", action="store_true", help="also time one run with the pipeline's own captioning")
    r.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out, a.tokenizers)
        return
    rows = json.loads(a.json.read_text()).get("rows", []) if a.json.exists() else []
    for combo in [c for c in a.combos.split(",") if c]:
        q, o = combo.split(":")
        rows.append(run_one(a.model, q, o, a.steps, a.resolution, a.layers, a.prompt))
        _write(a, rows)
    if a.caption:
        q, o = a.combos.split(",")[0].split(":")
        rows.append(run_one(a.model, q, o, a.steps, a.resolution, a.layers, ""))
        _write(a, rows)


def _write(a, rows: list) -> None:
    doc = {
        **environment(),
        "job": f"{a.resolution} px bucket, {a.layers} layers, {a.steps} steps, true CFG 4 (2 passes per step)",
        "model": "Qwen-Image-Layered architecture, random bf16 weights (benchmarks/bench_layers.py make)",
        "anchor": "34.2 s for bf16 on one H200 (published)",
        "rows": rows,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
