"""FLUX.1 Fill through ComfyUI: Atelier's nodes vs plain diffusers vs ComfyUI's native FLUX nodes, same GPU, same run.

One command on a GPU machine (after `bash benchmarks/gpu_bundle.sh` where it has no internet):

    python benchmarks/bench_comfy.py all --base /tmp/fluxbench --json benchmarks/results/comfy_<gpu>.json

`make` builds FLUX.1-Fill-dev's full-size architecture with random bf16 weights (nothing is downloaded) under
``<base>/models`` in both layouts Atelier's loader reads, from the same tensors:

* ``diffusers/FLUX.1-Fill-dev-random/`` (FluxFillPipeline.save_pretrained);
* ``diffusion_models/flux1-fill-dev-random.safetensors`` (BFL key names, what UNETLoader reads too),
  ``text_encoders/clip_l.safetensors``, ``text_encoders/t5xxl_bf16.safetensors``, ``vae/ae.safetensors``.

`run` boots a real ComfyUI server (GPU, ``--front-end-root`` empty: API only; ``--disable-cuda-malloc`` so that
the server and plain diffusers use the same PyTorch allocator and counters) with Atelier and a benchmark probe
pack (``benchmarks/comfy_probe``: reads torch's CUDA counters inside the server) in custom_nodes, and for every
setting queues a 1024² inpaint of 28 steps twice over HTTP, the way users do: a cold run (server just booted, model
loaded from disk: load + job) and a warm run (another seed: the job with the model resident). Per row:

* ``job_s``: warm run, POST /prompt → success in /history (text encoders, 28 steps, VAE decode, all);
* ``step_s``: mean interval between the sampler's websocket progress events of the warm run (first excluded);
* ``load_s``: cold run − warm run (disk → GPU, quantisation, hooks);
* ``peak_vram_gib``: torch.cuda.max_memory_allocated in the server over the warm run (reset just before);
  ``peak_vram_cold_gib`` likewise over the cold run (loading included); ``peak_reserved_gib``: the caching
  allocator's peak (what nvidia-smi would roughly show, minus the CUDA context);
* ``host_rss_peak_gib``: the server process's peak resident RAM (sampled every 50 ms);
* ``vram_after_free_gib``: memory still allocated after POST /free (unload_models + free_memory).

Peers, on the same weights and inputs: ComfyUI's native path (UNETLoader default / fp8_e4m3fn, DualCLIPLoader,
VAELoader, CLIPTextEncode, FluxGuidance, InpaintModelConditioning, KSampler euler/simple cfg 1, VAEDecode) in the
same kind of server, and plain diffusers FluxFillPipeline in a fresh process per setting (one warm-up job, then the
timed job; same counters). An eviction scenario checks that a core model needing the VRAM evicts Atelier's
pipeline instead of failing with OOM (this process holds VRAM as ballast so that both cannot fit).

Rows are appended to the JSON after each setting; a rerun skips rows already there (``--redo`` to repeat them).
`report_comfy.py` turns the file into the README's tables (`--readme`) and the time-vs-VRAM plot (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("atelier.bench")
GiB = 1024**3

DIFFUSERS_NAME = "FLUX.1-Fill-dev-random"
BFL_NAME = "flux1-fill-dev-random.safetensors"
CLIP_NAME = "clip_l.safetensors"
T5_NAME = "t5xxl_bf16.safetensors"
VAE_NAME = "ae.safetensors"
IMAGE_NAME = "bench_fill_1024.png"
PROMPT = "a ceramic vase with dried flowers on a wooden table, soft window light"
GUIDANCE = 30.0
CAPS_GIB = (6, 8, 12, 16)  # RTX 2060 / 3060-4060 / 4070 / 4080 class

# --------------------------------------------------------------------------------------------------- settings
# id → what runs. Atelier rows go through AtelierFluxFillLoader + AtelierFluxFill; "native" through ComfyUI's own
# nodes; "diffusers" through plain FluxFillPipeline. Order = priority (a partial run still answers the targets).
SETTINGS: list[dict] = [
    dict(id="atelier bf16", path="atelier", quantization="none", offload="none"),
    dict(id="diffusers bf16", path="diffusers", mode="bf16"),
    dict(id="native default", path="native", weight_dtype="default"),
    dict(id="native fp8_e4m3fn", path="native", weight_dtype="fp8_e4m3fn"),
    dict(id="atelier nf4", path="atelier", quantization="nf4", offload="none"),
    dict(id="diffusers nf4", path="diffusers", mode="nf4"),
    dict(id="atelier nf4 + model", path="atelier", quantization="nf4", offload="model"),
    dict(id="atelier nf4 + sequential", path="atelier", quantization="nf4", offload="sequential"),
    dict(id="atelier nf4 + sequential + vae tiling", path="atelier", quantization="nf4", offload="sequential",
         vae_tiling=True, vae_slicing=True),
    dict(id="atelier bf16 + sequential", path="atelier", quantization="none", offload="sequential"),
    dict(id="atelier bf16 + sequential + vae tiling", path="atelier", quantization="none", offload="sequential",
         vae_tiling=True, vae_slicing=True),
    dict(id="diffusers bf16 + group offload", path="diffusers", mode="group"),
    dict(id="atelier bf16 + compile", path="atelier", quantization="none", offload="none", compile=True),
    dict(id="atelier bf16 + model", path="atelier", quantization="none", offload="model"),
    dict(id="eviction", path="eviction"),
    dict(id="atelier bf16 single files", path="atelier", quantization="none", offload="none", layout="single_file"),
    dict(id="diffusers bf16 + model offload", path="diffusers", mode="model"),
    dict(id="atelier int8", path="atelier", quantization="int8", offload="none"),
    dict(id="diffusers int8", path="diffusers", mode="int8"),
    dict(id="diffusers nf4 + model offload", path="diffusers", mode="nf4-model"),
    dict(id="atelier bf16 + attention slicing", path="atelier", quantization="none", offload="none",
         attention_slicing=True),
    dict(id="atelier bf16 + FirstBlockCache 0.1", path="atelier", quantization="none", offload="none",
         first_block_cache=0.1),
    dict(id="atelier bf16 + vae slicing/tiling", path="atelier", quantization="none", offload="none",
         vae_slicing=True, vae_tiling=True),
    dict(id="atelier int8 + model", path="atelier", quantization="int8", offload="model"),
    dict(id="atelier int8 + sequential", path="atelier", quantization="int8", offload="sequential"),
    dict(id="diffusers bf16 + accelerate sequential", path="diffusers", mode="sequential", steps=4),
    # issue 12: peers at their best (native fp8 with --fast fp8_matrix_mult, --novram) and hard VRAM caps
    dict(id="native fp8-fast", path="native", weight_dtype="fp8_e4m3fn_fast", fast=True),
    dict(id="atelier fp8", path="atelier", quantization="fp8", offload="none"),
    dict(id="atelier fp8 + compile", path="atelier", quantization="fp8", offload="none", compile=True),
    dict(id="native fp8-fast --novram", path="native", weight_dtype="fp8_e4m3fn_fast", fast=True, novram=True),
    dict(id="native bf16 --novram", path="native", weight_dtype="default", novram=True),
    *[row for cap in CAPS_GIB for row in (
        dict(id=f"atelier fp8 auto @{cap} GiB", path="atelier", quantization="fp8", offload="auto", vae_tiling=True,
             cap_gib=cap),
        dict(id=f"native fp8-fast @{cap} GiB", path="native", weight_dtype="fp8_e4m3fn_fast", fast=True, cap_gib=cap),
        dict(id=f"atelier nf4 auto @{cap} GiB", path="atelier", quantization="nf4", offload="auto", vae_tiling=True,
             cap_gib=cap),
        dict(id=f"atelier bf16 auto @{cap} GiB", path="atelier", quantization="none", offload="auto", vae_tiling=True,
             cap_gib=cap),
        dict(id=f"native bf16 @{cap} GiB", path="native", weight_dtype="default", cap_gib=cap),
    )],
]

# The subset one 8-minute GPU slot answers the questions with (run: `--only quick`): native's fastest vs
# Atelier's fastest without a cap, then Atelier auto vs native's best at an 8 and a 16 GiB cap.
QUICK = ["native fp8-fast", "atelier fp8", "atelier fp8 auto @8 GiB", "native fp8-fast @8 GiB",
         "atelier fp8 auto @16 GiB", "native fp8-fast @16 GiB", "atelier fp8 + compile"]


# ------------------------------------------------------------------------------------------------------- make


def make(base: Path, tokenizers: Path) -> None:
    from bench_flux_fill import random_pipeline
    from safetensors.torch import save_file

    os.environ.setdefault("ATELIER_COMFYUI", str(tokenizers))
    from tests.harness.tiny_flux import _comfy_key_maps, transformer_to_bfl

    models = base / "models"
    for sub in ("diffusers", "diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = random_pipeline(tokenizers)
    transformer, t5, clip, vae = pipe.transformer, pipe.text_encoder_2, pipe.text_encoder, pipe.vae
    folder = models / "diffusers" / DIFFUSERS_NAME
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size="10GB")
    log.info("diffusers layout written in %.0f s", time.perf_counter() - t0)

    # the same tensors as ComfyUI users keep them
    bfl_path = models / "diffusion_models" / BFL_NAME
    need = sum(p.numel() * p.element_size() for p in transformer.parameters()) + GiB
    if shutil.disk_usage(bfl_path.parent).free < need and shutil.disk_usage("/dev/shm").free > need:
        shm = Path("/dev/shm") / BFL_NAME  # not enough disk for both layouts: this file lives in RAM
        log.info("disk short: the BFL transformer file goes to %s (symlinked)", shm)
        bfl_path.unlink(missing_ok=True)
        bfl_path.symlink_to(shm)
        bfl_path = shm
    cfg = transformer.config
    bfl = transformer_to_bfl(transformer.state_dict(), cfg.num_attention_heads * cfg.attention_head_dim,
                             cfg.num_layers, cfg.num_single_layers)
    save_file({k: v.cpu() for k, v in bfl.items()}, str(bfl_path))
    del bfl
    t5_file = folder / "text_encoder_2" / "model.safetensors"
    t5_link = models / "text_encoders" / T5_NAME
    t5_link.unlink(missing_ok=True)
    if t5_file.exists():  # one shard: the Hugging Face T5 file is what ComfyUI's t5xxl files are
        t5_link.symlink_to(t5_file)
    else:
        save_file({k: v.cpu().contiguous() for k, v in t5.state_dict().items()}, str(t5_link))
    clip_sd = {(k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v.cpu().contiguous()
               for k, v in clip.state_dict().items()}
    save_file(clip_sd, str(models / "text_encoders" / CLIP_NAME))
    _, convert_vae = _comfy_key_maps()
    save_file({k: v.cpu().contiguous() for k, v in convert_vae(vae.state_dict()).items()},
              str(models / "vae" / VAE_NAME))
    write_input_image(base / "input" / IMAGE_NAME)
    log.info("made %s in %.0f s", base, time.perf_counter() - t0)


def write_input_image(path: Path, size: int = 1024) -> None:
    """A deterministic picture; alpha 0 = the area to repaint (ComfyUI's LoadImage: mask = 1 - alpha)."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([0.6 + 0.3 * x, 0.45 + 0.2 * y, 0.3 + 0.1 * (x * y)], -1)
    rgb[int(size * 0.7):] *= 0.6  # a "table"
    alpha = np.ones((size, size), np.float32)
    alpha[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 0.0
    rgba = np.concatenate([rgb, alpha[..., None]], -1)
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(path)


# ------------------------------------------------------------------------------------------- through ComfyUI


def atelier_graph(s: dict, seed: int, steps: int, reset: bool = True) -> dict:
    model = f"diffusion_models/{BFL_NAME}" if s.get("layout") == "single_file" else f"diffusers/{DIFFUSERS_NAME}"
    loader = {"model": model, "quantization": s["quantization"], "offload": s["offload"],
              "attention_slicing": s.get("attention_slicing", False), "vae_slicing": s.get("vae_slicing", False),
              "vae_tiling": s.get("vae_tiling", False), "first_block_cache": s.get("first_block_cache", 0.0),
              "dtype": "auto", "compile": s.get("compile", False)}
    if s.get("layout") == "single_file":
        loader.update(clip_l=CLIP_NAME, t5xxl=T5_NAME, vae=VAE_NAME)
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": IMAGE_NAME}},
        RESET: {"class_type": "AtelierBenchReset", "inputs": {"image": ["1", 0], "reset": reset}},
        "2": {"class_type": "AtelierFluxFillLoader", "inputs": loader},
        "3": {"class_type": "AtelierFluxFill", "inputs": {
            "pipe": ["2", 0], "image": [RESET, 0], "mask": ["1", 1], "prompt": PROMPT, "steps": steps,
            "guidance": GUIDANCE, "seed": seed, "composite_back": True}},
        "9": {"class_type": "AtelierBenchMemory", "inputs": {"reset": False, "tag": "job", "image": ["3", 0]}},
    }


def native_graph(s: dict, seed: int, steps: int, reset: bool = True) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": IMAGE_NAME}},
        RESET: {"class_type": "AtelierBenchReset", "inputs": {"image": ["1", 0], "reset": reset}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": BFL_NAME, "weight_dtype": s["weight_dtype"]}},
        "4": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": CLIP_NAME, "clip_name2": T5_NAME,
                                                          "type": "flux"}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 0]}},
        "7": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": GUIDANCE}},
        "8": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "10": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["7", 0], "negative": ["8", 0], "vae": ["5", 0], "pixels": [RESET, 0], "mask": ["1", 1],
            "noise_mask": True}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["10", 0], "negative": ["10", 1], "latent_image": ["10", 2],
            "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["5", 0]}},
        "9": {"class_type": "AtelierBenchMemory", "inputs": {"reset": False, "tag": "job", "image": ["11", 0]}},
    }


PROBE = "9"
SAMPLER = "3"
RESET = "12"  # AtelierBenchReset between LoadImage and the job: zeroes the CUDA peak inside the job itself


class RssSampler:
    """Peak resident memory of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process ended
                return
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=1)
        return self.peak


class Server:
    """A ComfyUI server on the GPU with Atelier and the probe pack; client + websocket listener."""

    def __init__(self, base: Path, extra_args: list[str] = (), env: dict | None = None):
        from tests.harness.comfy_server import ComfyClient, ComfyServer, WsListener

        front = base / "no-frontend"
        front.mkdir(parents=True, exist_ok=True)
        (front / "index.html").write_text("API only (benchmark server)\n")
        probe = base / "custom_nodes" / "atelier_bench_probe"
        probe.parent.mkdir(parents=True, exist_ok=True)
        if not probe.is_symlink():
            probe.symlink_to(REPO / "benchmarks" / "comfy_probe", target_is_directory=True)
        import torch

        # on a machine without CUDA the same code runs on the CPU (a smoke test of the benchmark itself)
        self.server = ComfyServer(base, REPO, cpu=not torch.cuda.is_available(), env=env,
                                  extra_args=["--front-end-root", str(front), "--disable-cuda-malloc", *extra_args])
        t0 = time.perf_counter()
        self.server.start(timeout=600)
        self.boot_s = time.perf_counter() - t0
        self.client = ComfyClient(self.server.url, timeout=120)
        self.ws = WsListener(self.server.url, self.client.client_id)
        self.rss = RssSampler(self.server.proc.pid)

    def probe(self, reset: bool, tag: str) -> dict:
        entry = self.client.run({PROBE: {"class_type": "AtelierBenchMemory", "inputs": {"reset": reset, "tag": tag}}},
                                timeout=120)
        return json.loads(entry["outputs"][PROBE]["text"][0])

    def job(self, prompt: dict, timeout: float = 1800) -> dict:
        """One prompt, the graph the user queues (its AtelierBenchReset node zeroes the peak counters inside the
        job: no other prompt runs in between, so ComfyUI's cache keeps the loaders' outputs as it does for users)."""
        start = len(self.ws.messages())
        t0 = time.monotonic()
        pid = self.client.queue(prompt)
        entry = self.client.wait(pid, timeout=timeout, poll=0.05)
        wall = time.monotonic() - t0
        out: dict = {"wall_s": wall, "ok": self.client.succeeded(entry)}
        if not out["ok"]:
            out["error"] = (self.client.error_message(entry) or "failed")[:600]
            out["oom"] = _is_oom(out["error"])
            return out
        # success time from the websocket (sharper than /history polling)
        msgs = self.ws.messages()[start:]
        done = [m for m in msgs if m.get("type") == "execution_success" and m["data"].get("prompt_id") == pid]
        if done:
            out["wall_s"] = done[0]["_t"] - t0
        prog = [m["_t"] for m in msgs if m.get("type") == "progress" and m["data"].get("prompt_id") == pid
                and str(m["data"].get("node")) == SAMPLER]
        gaps = [b - a for a, b in zip(prog, prog[1:])]
        out["steps_seen"] = len(prog)
        out["step_s"] = sum(gaps[1:]) / len(gaps[1:]) if len(gaps) > 1 else None
        out["mem"] = json.loads(entry["outputs"][PROBE]["text"][0])
        # where the time went: each node from its "executing" event to the next one
        ex = [(m["_t"], m["data"].get("node")) for m in msgs if m.get("type") == "executing"
              and m["data"].get("prompt_id") == pid]
        out["nodes_s"] = {str(n): round(b[0] - a, 3) for (a, n), b in zip(ex, ex[1:]) if n is not None}
        texts = [t for nid, o in entry["outputs"].items() if nid != PROBE for t in o.get("text", [])]
        out["notes"] = texts
        return out

    def stop(self) -> float:
        peak = self.rss.stop()
        self.ws.close()
        self.client.close()
        self.server.stop()
        return peak


def _is_oom(text: str | None) -> bool:
    t = (text or "").lower()
    return "outofmemory" in t.replace(" ", "") or "out of memory" in t


def server_args(s: dict) -> tuple[list[str], dict]:
    """ComfyUI arguments and environment of a setting: ``fast`` → --fast fp8_matrix_mult, ``novram`` → --novram,
    ``cap_gib`` → the probe pack's hard cap, and for native rows --reserve-vram sized so that ComfyUI's planner
    sees the cap as its free memory (native at its best under the same cap; Atelier reads the cap itself)."""
    args: list[str] = []
    env: dict = {}
    if s.get("fast"):
        args += ["--fast", "fp8_matrix_mult"]
    if s.get("novram"):
        args.append("--novram")
    cap = s.get("cap_gib")
    if cap:
        import torch

        env["ATELIER_BENCH_VRAM_CAP_GIB"] = str(cap)
        if s["path"] == "native":
            free, _ = torch.cuda.mem_get_info()
            args += ["--reserve-vram", f"{max(0.0, free / GiB - cap):.2f}"]
    return args, env


def run_server_setting(base: Path, s: dict, steps: int, free_check: bool = True) -> dict:
    graph = atelier_graph if s["path"] == "atelier" else native_graph
    row: dict = {"id": s["id"], "path": s["path"], "setting": {k: v for k, v in s.items() if k not in ("id", "path")},
                 "steps": steps}
    args, env = server_args(s)
    row.update(server_args=args, vram_cap_gib=s.get("cap_gib"))
    srv = Server(base, args, env)
    try:
        row["boot_s"] = round(srv.boot_s, 1)
        cold = srv.job(graph(s, 1, steps, reset=False))  # just booted: the counters cover loading + the job
        if not cold["ok"]:
            row.update(error=cold["error"], oom=cold.get("oom", False), failed="cold")
            return row
        warm = srv.job(graph(s, 2, steps, reset=True))  # the same graph re-queued with another seed
        if not warm["ok"]:
            row.update(error=warm["error"], oom=warm.get("oom", False), failed="warm")
            return row
        after: dict = {}
        if free_check:
            srv.client.free(unload_models=True, free_memory=True)
            time.sleep(3)
            after = srv.probe(reset=False, tag="after-free")
            if (after.get("allocated_gib") or 0) > 0.1:  # slow release (pinned host buffers) or a leak: look again
                time.sleep(10)
                row["vram_after_free_first_look_gib"] = _r(after.get("allocated_gib"), 3)
                after = srv.probe(reset=False, tag="after-free-again")
        row.update(
            cold_job_s=round(cold["wall_s"], 2), job_s=round(warm["wall_s"], 2),
            load_s=round(cold["wall_s"] - warm["wall_s"], 2),
            step_s=_r(warm["step_s"], 4), step_s_cold=_r(cold["step_s"], 4), steps_seen=warm["steps_seen"],
            peak_vram_gib=_r(warm["mem"].get("peak_allocated_gib"), 2),
            peak_reserved_gib=_r(warm["mem"].get("peak_reserved_gib"), 2),
            peak_vram_cold_gib=_r(cold["mem"].get("peak_allocated_gib"), 2),
            resident_after_job_gib=_r(warm["mem"].get("allocated_gib"), 2),
            vram_after_free_gib=_r(after.get("allocated_gib"), 3),
            device_used_after_free_gib=_r(after.get("device_used_gib"), 2),
            finite=bool(warm["mem"].get("finite")), notes=cold["notes"], nodes_s=warm.get("nodes_s"),
            memory_fraction=warm["mem"].get("memory_fraction"),
            load_peak_over_run_peak=(_r(cold["mem"]["peak_allocated_gib"] / warm["mem"]["peak_allocated_gib"], 3)
                                     if warm["mem"].get("peak_allocated_gib") else None),
        )
    except Exception as e:  # noqa: BLE001 - a benchmark records a failed setting as a row and goes on
        log.exception("%s failed", s["id"])
        row["error"] = f"{type(e).__name__}: {e}"[:600]
        row["oom"] = _is_oom(row["error"])
        row["server_log_tail"] = srv.server.log_tail(30)
    finally:
        row["host_rss_peak_gib"] = round(srv.stop() / GiB, 2)
    return row


def run_eviction(base: Path, steps: int, usable: float = 48.0) -> dict:
    """Atelier bf16 resident, then ComfyUI's native FLUX, then Atelier again, on a GPU where only ``usable`` GiB
    are really free (this process holds the rest as ballast): Atelier (~34 GiB) and native FLUX (~35 GiB) cannot
    both fit, so each load must evict the other through ComfyUI's model management, or the job dies of OOM."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    ballast_bytes = max(0, int(free - usable * GiB))
    ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device="cuda")
    row: dict = {"id": "eviction", "path": "eviction", "usable_vram_gib": usable, "steps": steps,
                 "ballast_gib": round(ballast_bytes / GiB, 1)}
    srv = Server(base)
    try:
        a = srv.job(atelier_graph(dict(quantization="none", offload="none"), 1, steps))
        n = srv.job(native_graph(dict(weight_dtype="default"), 1, steps))
        a2 = srv.job(atelier_graph(dict(quantization="none", offload="none"), 3, steps))
        logtext = srv.server.log_text()
        row.update(atelier_ok=a["ok"], native_after_atelier_ok=n["ok"], atelier_again_ok=a2["ok"],
                   atelier_released_by_comfy=logtext.count("Atelier: released a loaded model"),
                   errors=[x.get("error") for x in (a, n, a2) if not x["ok"]],
                   atelier_peak_vram_gib=_r(a.get("mem", {}).get("peak_allocated_gib"), 2),
                   native_peak_vram_gib=_r(n.get("mem", {}).get("peak_allocated_gib"), 2),
                   oom=("OutOfMemoryError" in logtext or "out of memory" in logtext.lower()))
    except Exception as e:  # noqa: BLE001
        log.exception("eviction scenario failed")
        row["error"] = f"{type(e).__name__}: {e}"[:600]
    finally:
        row["host_rss_peak_gib"] = round(srv.stop() / GiB, 2)
        del ballast
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------- plain diffusers


def diffusers_one(base: Path, s: dict, steps: int, size: int) -> dict:
    """One plain-diffusers setting in this (fresh) process: load, a warm-up job, then the timed job."""
    import resource

    import numpy as np
    import torch
    from diffusers import FluxFillPipeline
    from PIL import Image

    folder = base / "models" / "diffusers" / DIFFUSERS_NAME
    mode = s["mode"]
    row: dict = {"id": s["id"], "path": "diffusers", "setting": {"mode": mode}, "steps": steps}
    kw: dict = {"torch_dtype": torch.bfloat16}
    if mode.startswith(("nf4", "int8")):
        from diffusers.quantizers import PipelineQuantizationConfig

        quant = ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
                 if mode.startswith("nf4") else {"load_in_8bit": True})
        kw["quantization_config"] = PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit" if mode.startswith("nf4") else "bitsandbytes_8bit",
            quant_kwargs=quant, components_to_quantize=["transformer", "text_encoder_2"])
    t0 = time.perf_counter()
    pipe = FluxFillPipeline.from_pretrained(folder, **kw)
    if mode in ("bf16", "nf4", "int8"):
        pipe.to("cuda")
    elif mode in ("model", "nf4-model"):
        pipe.enable_model_cpu_offload()
    elif mode == "group":
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload()
    torch.cuda.synchronize()
    row["load_s"] = round(time.perf_counter() - t0, 2)
    pipe.set_progress_bar_config(disable=True)
    rgba = Image.open(base / "input" / IMAGE_NAME)
    image = rgba.convert("RGB")
    mask = Image.fromarray(255 - np.asarray(rgba)[..., 3])

    def job(seed: int) -> tuple[float, list[float], object]:
        stamps: list[float] = []

        def on_step(_p, _i, _t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        t = time.perf_counter()
        out = pipe(prompt=PROMPT, image=image, mask_image=mask, height=size, width=size, guidance_scale=GUIDANCE,
                   num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                   max_sequence_length=512, output_type="pt", callback_on_step_end=on_step).images
        torch.cuda.synchronize()
        return time.perf_counter() - t, stamps, out

    try:
        torch.cuda.reset_peak_memory_stats()
        cold_s, _, _ = job(1)
        row["peak_vram_cold_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        torch.cuda.reset_peak_memory_stats()
        job_s, stamps, out = job(2)
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        row.update(cold_job_s=round(cold_s, 2), job_s=round(job_s, 2),
                   step_s=_r(sum(gaps[1:]) / len(gaps[1:]) if len(gaps) > 1 else None, 4),
                   peak_vram_gib=round(torch.cuda.max_memory_allocated() / GiB, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 2),
                   finite=bool(torch.isfinite(out).all()))
    except Exception as e:  # noqa: BLE001
        log.exception("%s failed", s["id"])
        row["error"] = f"{type(e).__name__}: {e}"[:600]
    row["host_rss_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2)
    return row


def run_diffusers_setting(base: Path, s: dict, steps: int, size: int) -> dict:
    out = base / "diffusers-row.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "diffusers-one", "--base", str(base), "--setting", json.dumps(s),
           "--steps", str(s.get("steps", steps)), "--size", str(size), "--out", str(out)]
    proc = subprocess.run(cmd, timeout=1800)
    if out.exists():
        return json.loads(out.read_text())
    return {"id": s["id"], "path": "diffusers", "error": f"subprocess exited {proc.returncode} without a row"}


# ------------------------------------------------------------------------------------------------------- main


def _r(x, n):
    return None if x is None else round(float(x), n)


def run(base: Path, out: Path, only: list[str], redo: bool, steps: int, size: int, budget_s: float,
        free_check: bool = True) -> None:
    from bench_flux_fill import environment

    rows = json.loads(out.read_text()).get("rows", []) if out.exists() else []
    done = {r["id"] for r in rows if "error" not in r}
    t_start = time.monotonic()
    if "quick" in only:
        only = [o for o in only if o != "quick"] + QUICK
    settings = {s["id"]: s for s in SETTINGS}
    # --only gives the order too (a partial run answers the first questions first)
    order = [settings[o] for o in only if o in settings] + [s for s in SETTINGS if s["id"] not in only]
    for s in order:
        if only and not any(o == s["id"] or o == s["path"] for o in only):
            continue
        if s["id"] in done and not redo:
            continue
        if time.monotonic() - t_start > budget_s:
            log.info("time budget spent: stopping before %s (rerun to go on)", s["id"])
            break
        log.info("=== %s", s["id"])
        t0 = time.monotonic()
        if s["path"] in ("atelier", "native"):
            row = run_server_setting(base, s, s.get("steps", steps), free_check)
        elif s["path"] == "diffusers":
            row = run_diffusers_setting(base, s, steps, size)
        else:
            row = run_eviction(base, 4)
        row["wall_s"] = round(time.monotonic() - t0, 1)
        log.info("%s", json.dumps(row))
        rows = [r for r in rows if r["id"] != s["id"]] + [row]
        doc = {**environment(), "size": size, "steps": steps, "prompt": PROMPT, "guidance": GUIDANCE,
               "model": "FLUX.1-Fill-dev architecture, random bf16 weights (benchmarks/bench_comfy.py make)",
               "rows": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("make", "run", "all"):
        p = sub.add_parser(name)
        p.add_argument("--base", type=Path, required=True, help="working folder: models/, input/, server files")
        if name in ("make", "all"):
            p.add_argument("--tokenizers", type=Path, default=Path(os.environ.get("ATELIER_COMFYUI", "")),
                           help="a ComfyUI tree (its CLIP-L and T5 tokenizers); default $ATELIER_COMFYUI")
        if name in ("run", "all"):
            p.add_argument("--json", type=Path, required=True)
            p.add_argument("--only", default="", help="comma-separated setting ids or paths (atelier, native, "
                                                      "diffusers, eviction)")
            p.add_argument("--redo", action="store_true")
            p.add_argument("--steps", type=int, default=28)
            p.add_argument("--size", type=int, default=1024)
            p.add_argument("--budget-s", type=float, default=1e9, help="start no new setting after this long")
            p.add_argument("--no-free-check", action="store_true", help="skip the POST /free check (saves ~5 s a row)")
    one = sub.add_parser("diffusers-one")
    one.add_argument("--base", type=Path, required=True)
    one.add_argument("--setting", required=True)
    one.add_argument("--steps", type=int, default=28)
    one.add_argument("--size", type=int, default=1024)
    one.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd in ("make", "all") and not (a.base / "models" / "diffusers" / DIFFUSERS_NAME / "model_index.json").exists():
        make(a.base, a.tokenizers)
    if a.cmd in ("run", "all"):
        run(a.base, a.json, [o.strip() for o in a.only.split(",") if o.strip()], a.redo, a.steps, a.size, a.budget_s,
            not a.no_free_check)
    if a.cmd == "diffusers-one":
        row = diffusers_one(a.base, json.loads(a.setting), a.steps, a.size)
        a.out.write_text(json.dumps(row))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
