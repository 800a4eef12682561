"""A benchmark-only ComfyUI node pack: reads (and resets) the server process's CUDA memory counters.

`benchmarks/bench_comfy.py` links it into the benchmark server's custom_nodes next to Atelier, so that peak VRAM
of a job run through ComfyUI (Atelier's nodes or ComfyUI's own FLUX nodes) is measured inside the process that
ran it, with the same counter plain diffusers is measured with (torch.cuda.max_memory_allocated). Not part of the
Atelier pack.

VRAM caps: with ``ATELIER_BENCH_VRAM_CAP_GIB`` set, the pack calls ``torch.cuda.set_per_process_memory_fraction``
when ComfyUI imports it, before any prompt (and any model) runs: the server's allocator can then never hold more
than the cap, as on a smaller card (any allocation beyond it is an OutOfMemoryError, a failed row). The CUDA context
itself (~0.5 GiB) is outside torch's allocator and not counted, for every path alike.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

GiB = 1024**3
CAP_ENV = "ATELIER_BENCH_VRAM_CAP_GIB"


def _apply_cap() -> None:
    cap = os.environ.get(CAP_ENV)
    if not cap or not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, float(cap) * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    logging.getLogger("atelier.bench").info("atelier bench probe: VRAM capped at %s GiB (fraction %.4f of %.1f GiB)",
                                            cap, fraction, total / GiB)


_apply_cap()


class AtelierBenchReset:
    """Passes its image through; with ``reset`` it zeroes the CUDA peak counters first. Put between LoadImage and
    the rest of a graph, it runs inside the job (never cached: it re-runs every prompt, so everything downstream of
    the image does too) while the loaders, which do not depend on the image, stay cached the way users see them."""

    CATEGORY = "atelier/benchmark"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "reset": ("BOOLEAN", {"default": True})}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def run(self, image, reset):
        if reset and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return (image,)


class AtelierBenchMemory:
    """Output node: the CUDA memory counters as JSON text in the history entry; `reset` zeroes the peak."""

    CATEGORY = "atelier/benchmark"
    RETURN_TYPES = ()
    FUNCTION = "read"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"reset": ("BOOLEAN", {"default": False}), "tag": ("STRING", {"default": ""})},
                "optional": {"image": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # never cached: every prompt reads the counters afresh

    def read(self, reset, tag, image=None):
        stats = {"tag": tag, "cuda": torch.cuda.is_available(), "t": time.time()}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            fraction = (torch.cuda.get_per_process_memory_fraction(0)
                        if hasattr(torch.cuda, "get_per_process_memory_fraction") else None)
            stats.update(allocated_gib=torch.cuda.memory_allocated() / GiB, memory_fraction=fraction,
                         reserved_gib=torch.cuda.memory_reserved() / GiB,
                         peak_allocated_gib=torch.cuda.max_memory_allocated() / GiB,
                         peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
                         device_used_gib=(total - free) / GiB)
            if reset:
                torch.cuda.reset_peak_memory_stats()
        if image is not None:
            stats["finite"] = bool(torch.isfinite(image).all())
            stats["image_shape"] = list(image.shape)
        return {"ui": {"text": [json.dumps(stats)]}}


NODE_CLASS_MAPPINGS = {"AtelierBenchMemory": AtelierBenchMemory, "AtelierBenchReset": AtelierBenchReset}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierBenchMemory": "Atelier Benchmark: CUDA memory",
                              "AtelierBenchReset": "Atelier Benchmark: reset CUDA peak"}
