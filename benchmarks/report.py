"""Render engine-level FLUX Fill results (`bench_flux_fill.py run`) as a Markdown table.

    python benchmarks/report.py benchmarks/results/flux_fill_h100.json

The README quotes the ComfyUI-server benchmark instead (`report_comfy.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def _setting(r: dict) -> str:
    extra = [k.replace("_", " ") + (f" {r[k]:g}" if isinstance(r[k], float) else "")
             for k in ("attention_slicing", "vae_slicing", "vae_tiling", "first_block_cache") if r.get(k)]
    return " + ".join([r["quantization"], r["offload"]] + extra)


def table(doc: dict) -> str:
    rows = doc["rows"]
    base = next((r for r in rows if r["quantization"] == "none" and r["offload"] == "none" and "step_s" in r
                 and not any(r.get(k) for k in ("attention_slicing", "vae_slicing", "vae_tiling",
                                                "first_block_cache"))), None)
    out = [f"{doc['gpu']}, {doc['date']}, {doc['size']}×{doc['size']}, {doc['steps']} steps, torch {doc['torch']}, "
           f"diffusers {doc['diffusers']}, bitsandbytes {doc['bitsandbytes']}; {doc['model']}.", "",
           "| quantization + offload | runs as | s/step | × bf16 | peak VRAM GiB | job s | load s | VRAM after release GiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {_setting(r)} | error: {r['error'][:80]} | | | | | | |")
            continue
        ratio = f"{r['step_s'] / base['step_s']:.2f}" if base and r.get("step_s") else ""
        out.append(f"| {_setting(r)} | {r['resolved_offload']} | {r['step_s']:.3f} | {ratio} | "
                   f"{r['peak_vram_gib']:.2f} | {r['job_s']:.1f} | {r['load_s']:.1f} | "
                   f"{r['vram_after_release_gib']:.3f} |")
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    if notes:
        out += ["", "Fallbacks seen: " + "; ".join(notes) + "."]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json", type=Path)
    a = ap.parse_args()
    sys.stdout.write(table(json.loads(a.json.read_text())) + "\n")


if __name__ == "__main__":
    main()
