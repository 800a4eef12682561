"""Batch throughput on one GPU: 1 ComfyUI server vs 2, 3, 4 servers sharing it, through the batch runner (Ray).

One command on a GPU machine (ComfyUI from `bash .ci/setup_env.sh` or `$ATELIER_COMFYUI`; Ray installed):

    python benchmarks/bench_batch.py --base /tmp/batchbench --json benchmarks/results/batch_h200.json

What it does:
* builds FLUX.1-Fill-dev's full-size architecture with random bf16 weights once (`bench_flux_fill.make`,
  `<base>/models/diffusers/FLUX.1-Fill-dev-random`; nothing downloaded) and a table of `--items` 512² pictures
  (a transparent hole = the area to repaint), one seed per row;
* for K in `--servers` (default 1 2 3 4): `python -m atelier batch workflows/api/flux_fill_inpaint.json` logic
  (`run_batch`) with `gpus=1, servers_per_gpu=K` — K ComfyUI servers started by Ray actors on the one GPU
  (fractional GPUs), the loader set to nf4, no offload, `--steps` steps;
* per K: items/s over the whole run (model loading included: every server loads nf4 at the same time) and in
  steady state (`items_per_s_steady`: from the moment every server finished its first item), seconds per item, each server's VRAM
  (nvidia-smi's per-process used memory, peak over the run) and the GPU's total.

Rows are written to the JSON after each K.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("atelier.bench")
MODEL = "FLUX.1-Fill-dev-random"


def make_models(base: Path) -> None:
    folder = base / "models" / "diffusers" / MODEL
    if (folder / "model_index.json").is_file():
        return
    from bench_flux_fill import make

    from atelier.batch.server import find_comfyui

    make(folder, find_comfyui())


def make_table(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["id,1.image,3.seed"]
    for i in range(n):
        rgba = np.dstack([rng.integers(0, 256, (size, size, 3), dtype=np.uint8), np.full((size, size), 255, np.uint8)])
        rgba[size // 4: 3 * size // 4, size // 3: 2 * size // 3, 3] = 0
        Image.fromarray(rgba, "RGBA").save(folder / f"p{i:03d}.png")
        lines.append(f"r{i:03d},p{i:03d}.png,{i}")
    (folder / "table.csv").write_text("\n".join(lines) + "\n")
    return folder / "table.csv"


class VramSampler:
    """Every 0.5 s: each server's own CUDA memory (ComfyUI's /system_stats `torch_vram_total`: what its PyTorch
    allocator holds; server URLs from the manifest) and nvidia-smi's per-process and whole-GPU used memory (pids
    may be hidden in containers). Peaks are kept."""

    def __init__(self, manifest: Path):
        self.manifest = manifest
        self.per_pid: dict = {}
        self.per_server: dict = {}
        self.gpu_peak_mib = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _servers(self) -> list:
        try:
            db = sqlite3.connect(self.manifest)
            try:
                return db.execute("SELECT name, url FROM servers WHERE url IS NOT NULL").fetchall()
            finally:
                db.close()
        except sqlite3.Error:
            return []

    def _run(self) -> None:
        import requests

        while not self._stop.is_set():
            for name, url in self._servers():
                try:
                    dev = requests.get(url + "/system_stats", timeout=2).json()["devices"][0]
                    gib = dev.get("torch_vram_total", 0) / 1024**3
                    self.per_server[name] = max(self.per_server.get(name, 0.0), gib)
                except (requests.RequestException, ValueError, KeyError, IndexError):
                    pass
            try:
                apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                for line in apps.stdout.strip().splitlines():
                    pid, mib = (int(x) for x in line.split(","))
                    self.per_pid[pid] = max(self.per_pid.get(pid, 0), mib)
                tot = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10)
                self.gpu_peak_mib = max(self.gpu_peak_mib, int(tot.stdout.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=15)


def one(base: Path, table: Path, k: int, steps: int, per_server: int) -> dict:
    from atelier.batch.runner import BatchConfig, run_batch

    out = base / f"out_k{k}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    vram = VramSampler(out / "manifest.sqlite")
    t0 = time.monotonic()
    try:
        s = run_batch(BatchConfig(
            workflow=str(REPO / "workflows" / "api" / "flux_fill_inpaint.json"), table=str(table), out=str(out),
            gpus=1, servers_per_gpu=k, base_directory=str(base), per_server=per_server, progress=True,
            server_args=["--disable-cuda-malloc"],
            sets={"2.model": f"diffusers/{MODEL}", "2.quantization": "nf4", "2.offload": "none", "3.steps": str(steps)}))
    finally:
        vram.stop()
    wall = time.monotonic() - t0
    db = sqlite3.connect(out / "manifest.sqlite")
    items = db.execute("SELECT server, started, finished, seconds FROM items WHERE state='done'").fetchall()
    servers = db.execute("SELECT name, pid, done, restarts FROM servers").fetchall()
    db.close()
    first_done: dict = {}
    for server, _st, fin, _sec in items:
        first_done[server] = min(first_done.get(server, fin), fin)
    secs = sorted(it[3] for it in items)
    return {
        "servers": k, "items": len(items), "failed": s["counts"]["failed"], "wall_s": round(wall, 1),
        "items_per_s_overall": s["items_per_s"],
        "items_per_s_steady": s["items_per_s_steady"],
        "s_per_item_median": round(secs[len(secs) // 2], 2),
        "first_item_s_max": round(max(first_done.values()) - min(it[1] for it in items), 1),
        "torch_reserved_peak_gib_per_server": {k: round(v, 2) for k, v in vram.per_server.items()},
        "nvidia_smi_peak_gib_per_server": {name: round(vram.per_pid.get(pid, 0) / 1024, 2) for name, pid, *_ in servers},
        "gpu_used_peak_gib": round(vram.gpu_peak_mib / 1024, 2),
        "done_per_server": {name: done for name, _pid, done, _r in servers},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="working folder (models, table, outputs)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--servers", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--per-server", type=int, default=1, help="prompts in flight per server")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import ray
    import torch

    base = args.base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "atelier"
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(REPO, target_is_directory=True)
    make_models(base)
    torch.cuda.empty_cache()
    table = make_table(base / "table", args.items, args.size)
    result = {"gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "items": args.items,
              "size": args.size, "steps": args.steps, "quantization": "nf4", "ray": ray.__version__,
              "torch": torch.__version__, "rows": []}
    for k in args.servers:
        row = one(base, table, k, args.steps, args.per_server)
        log.info("%d server(s): %s", k, row)
        result["rows"].append(row)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    base_row = result["rows"][0]
    for row in result["rows"]:
        if base_row.get("items_per_s_steady") and row.get("items_per_s_steady"):
            row["speedup_steady"] = round(row["items_per_s_steady"] / base_row["items_per_s_steady"], 2)
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))  # noqa: T201 (benchmark output)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
