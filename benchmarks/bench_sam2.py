"""SAM2 benchmark: every official SAM 2.1 size with random weights, through Atelier's engine, at 1024×1024.

    python benchmarks/bench_sam2.py --sizes tiny,small,base_plus,large --dtypes fp32,bf16,fp16 \
        --json benchmarks/results/sam2_<gpu>.json

For each size the sam2 package's own initialisation gives random weights (nothing is downloaded), written as a
Meta-style ``{"model": state_dict}`` .pt that the engine recognises and loads like a real checkpoint. For each
dtype it times, CUDA-synchronised, median of ``--repeat`` after one warm-up: the image embedding of a new
1024×1024 image (``set_image``), one box prompt, and a full ``segment`` call with 4 objects (embedding + 4
prompts). Peak VRAM is torch.cuda.max_memory_allocated over the run; resident is the weights. Masks of bf16/fp16
are compared with fp32 (IoU) on the same weights and prompts.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atelier import segmenter, stage  # noqa: E402
from atelier.registry import REGISTRY  # noqa: E402
from tests.harness import tiny_sam2  # noqa: E402

log = logging.getLogger("atelier.bench")
MiB = 1024**2


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def bench(size: str, dtypes: list[str], repeat: int, device: str, folder: Path) -> list[dict]:
    config = tiny_sam2.CONFIGS[("2.1", size)]
    path = folder / f"sam2.1_hiera_{size}_random.pt"
    torch.save({"model": tiny_sam2.random_state_dict(0, config)}, path)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 1024, 1024, 3, generator=g) for _ in range(repeat + 2)]
    prompts = segmenter.parse_prompts('[{"x": 512, "y": 512}]', '[{"x": 40, "y": 40}]',
                                      "[[100, 100, 600, 700], [400, 300, 1000, 900], [0, 0, 1024, 1024], "
                                      "[300, 500, 700, 1000]]")
    one_box = segmenter.parse_prompts("", "", "[[100, 100, 600, 700]]")
    rows, ref = [], None
    for dt in dtypes:
        REGISTRY.release_all()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        handle = segmenter.make_handle(segmenter.SAM2Spec(path=str(path), dtype=dt, device=device))
        model = stage.get(segmenter.STAGE, handle)
        load_s = time.perf_counter() - t0
        it = iter(images)
        embed_s = _timed(lambda m=model, i=it: segmenter.set_image(m, next(i)[0].numpy()), repeat)
        coords, labels, box = one_box.objects()[0]
        prompt_s = _timed(lambda m=model, c=coords, lb=labels, b=box: segmenter.predict_object(
            m.predictor, c, lb, b, False, m.autocast()), repeat)
        it2 = iter(images)
        segment_s = _timed(lambda m=model, i=it2: segmenter.segment(m, next(i), prompts), repeat)
        masks = segmenter.segment(model, images[0], prompts)
        if ref is None:
            ref = masks
        row = dict(size=size, dtype=dt, arch=handle.arch.label, params_m=round(handle.weight_bytes / 4e6, 1)
                   if dt == "fp32" else None, load_s=round(load_s, 2), embed_ms=round(embed_s * 1e3, 1),
                   prompt_ms=round(prompt_s * 1e3, 2), segment_4_objects_ms=round(segment_s * 1e3, 1),
                   resident_mib=round(model.resident_bytes / MiB), peak_mib=round(torch.cuda.max_memory_allocated() / MiB),
                   iou_vs_first_dtype=[round(_iou(a, b), 4) for a, b in zip(masks, ref, strict=True)])
        log.info("%s", json.dumps(row))
        rows.append(row)
    REGISTRY.release_all()
    torch.cuda.empty_cache()
    row = dict(size=size, after_release_allocated_mib=round(torch.cuda.memory_allocated() / MiB, 1))
    log.info("%s", json.dumps(row))
    rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small,base_plus,large")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            results += bench(size, args.dtypes.split(","), args.repeat, args.device, Path(tmp))
    out = dict(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               torch=torch.__version__, python=platform.python_version(), results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        log.info("written %s", args.json)


if __name__ == "__main__":
    main()
