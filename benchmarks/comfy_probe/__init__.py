"""A benchmark-only ComfyUI node pack: reads (and resets) the server process's CUDA memory counters.

`benchmarks/bench_comfy.py` links it into the benchmark server's custom_nodes next to Atelier, so that peak VRAM
of a job run through ComfyUI (Atelier's nodes or ComfyUI's own FLUX nodes) is measured inside the process that
ran it, with the same counter plain diffusers is measured with (torch.cuda.max_memory_allocated). Not part of the
Atelier pack.
"""

from __future__ import annotations

import json

import torch

GiB = 1024**3


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
        stats = {"tag": tag, "cuda": torch.cuda.is_available()}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            stats.update(allocated_gib=torch.cuda.memory_allocated() / GiB,
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


NODE_CLASS_MAPPINGS = {"AtelierBenchMemory": AtelierBenchMemory}
NODE_DISPLAY_NAME_MAPPINGS = {"AtelierBenchMemory": "Atelier Benchmark: CUDA memory"}
