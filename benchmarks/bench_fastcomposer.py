"""FastComposer benchmark: full-size SD1.5 + CLIP ViT-L/14 image encoder, random fp16 weights, 512², 50 steps.

    python benchmarks/bench_fastcomposer.py --json benchmarks/results/fastcomposer_<gpu>.json

One command. It writes a random checkpoint in the released layout (one pytorch_model.bin with unet., vae.,
text_encoder., image_encoder., postfuse_module.: SD1.5's UNet 860 M, VAE 84 M, CLIP-L text 123 M, ViT-L/14 vision
304 M + projection, fusion MLP 3.5 M; ~2.6 GB in fp16) to --dir (default /tmp/atelier-fastcomposer-full), loads it
through Atelier's engine (atelier.fastcomposer: the code the nodes call) and times, each after one warm-up job:

* plain SD1.5: diffusers' StableDiffusionPipeline.__call__ on the same UNet / VAE / text encoder with the prompt
  without markers (the image encoder and the fusion MLP moved off the GPU for this row, so its peak is plain SD1.5's);
* FastComposer with 1, 2 and 4 subjects (alpha 0.2: 10 of 50 steps on text alone, guidance 5);
* FastComposer with 2 subjects under ``offload model`` (a separate load), for its peak.

Per row: whole job (CUDA-synchronised wall time), mean step (first step excluded), peak VRAM
(torch.cuda.max_memory_allocated, reset before the job), ratio to plain SD1.5. Targets (issue 14): ≤ 1.05× plain
SD1.5's job time; ``model`` offload peak ≤ 4 GiB.
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
from bench_flux_fill import StepTimer, _randomise, environment, free_cuda  # noqa: E402 - shared benchmark helpers

from atelier import fastcomposer as fc  # noqa: E402
from atelier import stage  # noqa: E402
from tests.harness.tiny_fastcomposer import official_state_dict  # noqa: E402 - the released key layout

log = logging.getLogger("atelier.bench")
GiB = 1024**3
PROMPTS = {
    1: "a photo of a man <subject> sitting in a park",
    2: "a photo of a man <subject> and a woman <subject> sitting in a park",
    4: "a man <subject>, a woman <subject>, a boy <subject> and a girl <subject> sitting in a park",
}


def make(path: Path, seed: int = 0) -> Path:
    """The released layout with random fp16 weights (built on the GPU from the shipped configs)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = fc._build_parts(fc.part_configs(path), empty=True)
    for i, (name, module) in enumerate(parts.items()):
        parts[name] = _randomise(module, "cuda", seed + i).half()
    post = {k: v for k, v in parts.pop("postfuse_module").state_dict().items()}
    sd = {k: v.cpu() for k, v in official_state_dict(parts, post).items()}
    torch.save(sd, path)
    del parts, sd
    free_cuda()
    log.info("wrote %s (%.2f GB)", path, path.stat().st_size / 1e9)
    return path


def subjects(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, 512, 512, 3, generator=g)


def timed(fn, timer: StepTimer | None = None) -> tuple[float, float, float]:
    """(job seconds, peak VRAM GiB, peak host RAM GiB of this process while the job ran)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rss = RssSampler(os.getpid())
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    job = time.perf_counter() - t0
    return job, torch.cuda.max_memory_allocated() / GiB, rss.stop() / GiB


def run(path: Path, tokenizer: Path, steps: int, size: int) -> list[dict]:
    rows: list[dict] = []
    spec = fc.make_spec(str(path), str(tokenizer), offload="none", dtype="fp16", device="cuda")
    t0 = time.perf_counter()
    model = stage.get(fc.STAGE, fc.make_handle(spec, None))
    load_s = time.perf_counter() - t0
    pipe = model.pipe

    def plain(timer):
        def go():
            pipe(prompt=PROMPTS[2].replace(fc.MARKER, ""), negative_prompt="", guidance_scale=5.0,
                 num_inference_steps=steps, width=size, height=size,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="pt",
                 callback_on_step_end=lambda p, i, t, kw: (timer.step(), kw)[1])
        return go

    # plain SD1.5: the FastComposer-only parts off the GPU
    pipe.image_encoder.to("cpu")
    model.postfuse.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    plain(StepTimer())()  # warm-up
    timer = StepTimer()
    job, peak, host = timed(plain(timer))
    rows.append({"setting": "plain SD1.5 (diffusers StableDiffusionPipeline)", "offload": "none", "subjects": 0,
                 "job_s": round(job, 3), **timer.stats(), "peak_vram_gib": round(peak, 3),
                 "host_rss_peak_gib": round(host, 2), "load_s": round(load_s, 1)})
    base_job = job
    pipe.image_encoder.to("cuda")
    model.postfuse.to("cuda")

    for n in (1, 2, 4):
        def go(timer, n=n):
            return lambda: fc.generate(model, PROMPTS[n], subjects(n), alpha=0.2, steps=steps, guidance=5.0, seed=0,
                                       width=size, height=size, progress=timer)
        go(StepTimer())()  # warm-up
        timer = StepTimer()
        job, peak, host = timed(go(timer))
        rows.append({"setting": f"FastComposer, {n} subject{'s' if n > 1 else ''}", "offload": "none", "subjects": n,
                     "job_s": round(job, 3), **timer.stats(), "peak_vram_gib": round(peak, 3),
                     "host_rss_peak_gib": round(host, 2), "ratio_vs_plain": round(job / base_job, 3)})
        log.info("%s", rows[-1])
    free_cuda()

    spec = fc.make_spec(str(path), str(tokenizer), offload="model", dtype="fp16", device="cuda")
    model = stage.get(fc.STAGE, fc.make_handle(spec, None))
    go = lambda timer: (lambda: fc.generate(model, PROMPTS[2], subjects(2), alpha=0.2, steps=steps, guidance=5.0,  # noqa: E731
                                            seed=0, width=size, height=size, progress=timer))
    go(StepTimer())()
    timer = StepTimer()
    job, peak, host = timed(go(timer))
    rows.append({"setting": "FastComposer, 2 subjects", "offload": "model", "subjects": 2, "job_s": round(job, 3),
                 **timer.stats(), "peak_vram_gib": round(peak, 3), "host_rss_peak_gib": round(host, 2),
                 "ratio_vs_plain": round(job / base_job, 3)})
    free_cuda()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "fastcomposer.json")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/atelier-fastcomposer-full"))
    ap.add_argument("--tokenizer", type=Path,
                    default=Path(os.environ.get("ATELIER_COMFYUI", Path.home() / ".cache/atelier/comfyui"))
                    / "comfy" / "sd1_tokenizer")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = make(a.dir / "pytorch_model.bin")
    rows = run(path, a.tokenizer, a.steps, a.size)
    plain = rows[0]["job_s"]
    doc = {"benchmark": "fastcomposer", "environment": environment(), "steps": a.steps, "size": a.size,
           "dtype": "fp16", "alpha": 0.2, "guidance": 5.0, "rows": rows,
           "targets": {"job_ratio_max": 1.05, "model_offload_peak_gib_max": 4.0},
           "met": {"job_ratio": all(r.get("ratio_vs_plain", 0) <= 1.05 for r in rows[1:4]),
                   "model_offload_peak": rows[-1]["peak_vram_gib"] <= 4.0},
           "plain_job_s": plain}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
