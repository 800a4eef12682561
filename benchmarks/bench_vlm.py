"""VLM captioner benchmark: Qwen2.5-VL at full size with random weights, each quantization × offload setting.

    python benchmarks/bench_vlm.py make --arch 7b --out /tmp/qwen25vl-7b --tokenizer DIR   # random model, once
    python benchmarks/bench_vlm.py run  --model /tmp/qwen25vl-7b --combos none:none,nf4:none,int8:none,none:model:12 \
                                        --json benchmarks/results/vlm_<gpu>.json

`make` writes a Hugging Face folder with Qwen2.5-VL-7B-Instruct's (or 3B's) architecture filled with random bf16
weights, plus the tokenizer (DIR: ComfyUI's comfy/text_encoders/qwen25_tokenizer) and the hub's preprocessor
config: nothing is downloaded; speed and memory are the real model's. `run` loads it through Atelier's engine (what
the nodes call) once per setting and captions a 1024×768 image (about 1000 visual tokens): load time, time to the
first token (vision tower + prefill), decode tokens/s (CUDA-synchronised per token), peak VRAM
(torch.cuda.max_memory_allocated) and VRAM left after release; a 4-token warm-up caption precedes the timed one.
``none:model:12`` caps the GPU share at 12 GiB so that offload really spills layers into RAM.

Measured on an H100: benchmarks/results/vlm_h100.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atelier import captioner  # noqa: E402

log = logging.getLogger("atelier.bench")
GiB = 1024**3

_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, in_channels=3,
               patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2, hidden_act="silu")
_TEXT = dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], attention_dropout=0.0,
             bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
             vision_token_id=151654, image_token_id=151655, video_token_id=151656, hidden_act="silu",
             initializer_range=0.02, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0,
             sliding_window=32768, use_cache=True, use_sliding_window=False,
             rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
ARCHS = {  # the hub's config.json of Qwen2.5-VL-7B-Instruct and -3B-Instruct
    "7b": dict(_TEXT, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, max_window_layers=28, vocab_size=152064, tie_word_embeddings=False,
               vision_config=dict(_VISION, out_hidden_size=3584)),
    "3b": dict(_TEXT, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, max_window_layers=70, vocab_size=151936, tie_word_embeddings=True,
               vision_config=dict(_VISION, out_hidden_size=2048)),
}
GENERATION = dict(bos_token_id=151643, pad_token_id=151643, eos_token_id=[151645, 151643], do_sample=True,
                  temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05)


def make(out: Path, arch: str, tokenizer: Path) -> None:
    import os

    import transformers
    from transformers import AutoConfig, GenerationConfig

    os.environ["ATELIER_QWEN_TOKENIZER"] = str(tokenizer)
    from tests.harness import tiny_vlm

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(ARCHS[arch], indent=2))
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    model = model.to_empty(device="cuda")
    g = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0) if ("norm" in name or ".ln_" in name) and name.endswith("weight") else p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(**GENERATION)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    tiny_vlm.write_processor_files(out, "qwen2_5_vl", min_pixels=3136, max_pixels=12845056)
    n = sum(p.numel() for p in model.parameters())
    log.info("made %s: %.2f B params, in %.0f s", out, n / 1e9, time.perf_counter() - t0)


class TokenTimer:
    """The captioner's Progress: a CUDA-synchronised timestamp per generated token."""

    def __init__(self):
        self.times: list[float] = []

    def step(self, n: int = 1) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run_one(model_dir: Path, quantization: str, offload: str, cap_gib: float | None, tokens: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    row: dict = {"quantization": quantization, "offload": offload, "gpu_cap_gib": cap_gib}
    spec = captioner.VLMSpec(path=str(model_dir), quantization=quantization, offload=offload, device="cuda")
    vlm = None
    try:
        t0 = time.perf_counter()
        handle = captioner.make_handle(spec)
        vlm = captioner.load(handle, max_gpu_bytes=int(cap_gib * GiB) if cap_gib else None)
        torch.cuda.synchronize()
        row.update(load_s=round(time.perf_counter() - t0, 2), resolved_offload=vlm.offload, notes=list(vlm.notes),
                   vram_after_load_gib=round((torch.cuda.memory_allocated() - base) / GiB, 2))
        image = torch.rand(1, 768, 1024, 3, generator=torch.Generator().manual_seed(0))
        captioner.caption(vlm, image, "caption", max_new_tokens=4)  # warm-up: CUDA kernels load on first use
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        timer = TokenTimer()
        t1 = time.perf_counter()
        [reply] = captioner.caption(vlm, image, "background_analysis", max_new_tokens=tokens, progress=timer)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        row["tokens"] = reply.tokens
        row["first_token_s"] = round(timer.times[0] - t1, 3) if timer.times else None
        decode = timer.times[-1] - timer.times[0] if len(timer.times) > 1 else None
        row["decode_tok_s"] = round((len(timer.times) - 1) / decode, 2) if decode else None
        row["job_s"] = round(t2 - t1, 2)
        row["peak_vram_gib"] = round((torch.cuda.max_memory_allocated() - base) / GiB, 2)
    except Exception as e:  # noqa: BLE001 - a benchmark records what failed and goes on
        log.exception("combo %s:%s failed", quantization, offload)
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        if vlm is not None:
            vlm.close()
        del vlm
        gc.collect()
        torch.cuda.empty_cache()
        row["vram_after_release_gib"] = round((torch.cuda.memory_allocated() - base) / GiB, 3)
    log.info("%s", row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--arch", choices=sorted(ARCHS), default="7b")
    m.add_argument("--tokenizer", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--combos", default="none:none,nf4:none,int8:none,none:model:12,int8:model:5")
    r.add_argument("--tokens", type=int, default=128)
    r.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "make":
        make(args.out, args.arch, args.tokenizer)
        return
    import bitsandbytes
    import transformers

    rows: list[dict] = []
    result = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
              "python": platform.python_version(), "image": "1024x768", "max_new_tokens": args.tokens,
              "model": f"{args.model.name}: Qwen2.5-VL architecture, random bf16 weights (bench_vlm.py make)",
              "rows": rows}
    for combo in args.combos.split(","):
        parts = combo.split(":")
        cap = float(parts[2]) if len(parts) > 2 else None
        rows.append(run_one(args.model, parts[0], parts[1], cap, args.tokens))
        if args.json:  # after every row: a run cut short still leaves what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    log.info("%s", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
