"""Realtime pose-driven character: SD1.5 + OpenPose ControlNet + IP-Adapter with latent reuse between frames.

``load(handle)`` builds a :class:`CharacterModel` (diffusers ``StableDiffusionControlNetPipeline`` and its img2img
twin sharing the same modules); :func:`animate` (or a :class:`Session`, which the live panel feeds frame by frame)
generates one frame per pose map:

* **frame 1, and every frame after a reset, is the plain pipeline**: the same call as a diffusers script with the
  same ControlNet, IP-Adapter, scheduler and ``torch.Generator("cpu").manual_seed(seed)``;
* **later frames reuse the previous latent** ``z`` (the last denoised latent of the previous forward pass) through
  ``StableDiffusionControlNetImg2ImgPipeline`` with the latent as its image. With ``reuse`` r and ``steps`` N the
  pass runs the last ``n = max(1, int(N·(1−r)))`` steps of the N-step schedule and starts from

      x = √ᾱ(t) · z + √(1−ᾱ(t)) · ε,   t = the schedule's timestep N−n,  ε ~ N(0, I) from the seeded generator

  (:func:`reuse_plan`, :func:`mixed_latent`). r = 0 runs every frame fresh; r = 1 runs one step from ``z``.
  Fewer steps per frame is where the realtime speed comes from; resets (``reset_every``) stop drift.

Prompt embeddings are computed once per keyframe prompt and the IP-Adapter's image embedding once per run; both go
to the pipeline as ``prompt_embeds`` / ``ip_adapter_image_embeds``. Each forward pass handles ``batch`` frames
(they share the previous pass's latent). The report gives per-frame pose / model / decode times, fps, the colour
consistency ΔE between consecutive frames (:func:`histogram_delta_e`), resets and OOM events.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ip_adapter_sd15, pipelines, sd15_files
from .errors import InputError, ModelFileError, SettingError
from .images import check_image, to_bchw, to_bhwc
from .memory import Footprint, dtype_name, resident_vram
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

log = logging.getLogger("atelier")

MAX_STEPS = 30

# fast LoRAs by what their file name contains → the scheduler they are distilled for (one row each)
FAST_LORA_SCHEDULERS: dict[str, str] = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "hyper": "TCDScheduler"}
DEFAULT_SCHEDULER = "DPMSolverMultistepScheduler"


# ------------------------------------------------------------------------------------------- spec, handle


@dataclass(frozen=True)
class CharacterSpec:
    """Everything that decides how the character pipeline is built; equal specs share one loaded model."""

    model: str  # SD1.5 diffusers folder or single checkpoint file
    controlnet: str  # OpenPose ControlNet: folder or single file
    tokenizer: str  # ComfyUI's CLIP tokenizer folder (single-file checkpoints; folders use theirs when present)
    ip_adapter: str | None = None
    clip_vision: str | None = None
    fast_lora: str | None = None
    taesd: str | None = None  # None = the checkpoint's full VAE
    offload: str = "auto"
    attention_slicing: bool = False
    vae_slicing: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    compile: bool = False
    # fixed for this stage (pipelines.resolve reads them)
    quantization: str = "none"
    vae_tiling: bool = False
    first_block_cache: float = 0.0


@dataclass(frozen=True)
class CharacterHandle:
    """What the loader outputs (ATELIER_CHARACTER): the spec and what was resolved from it."""

    spec: CharacterSpec
    offload: str
    dtype: str
    layout: str  # diffusers / single_file
    scheduler: str


def scheduler_for(fast_lora: str | None) -> str:
    """The scheduler class name a fast LoRA was distilled for (by its file name), else DPM-Solver++."""
    if not fast_lora:
        return DEFAULT_SCHEDULER
    name = Path(fast_lora).name.lower()
    for fragment, cls in FAST_LORA_SCHEDULERS.items():
        if fragment in name:
            return cls
    raise ModelFileError("a fast LoRA whose name says which it is (contains lcm, tcd or hyper)",
                         f"'{Path(fast_lora).name}'", "Rename it (e.g. lcm-lora-sdv1-5.safetensors) or pick none.")


def _header_bytes(keys: dict[str, list[int]], prefix: str = "") -> int:
    return sum(2 * math.prod(v) for k, v in keys.items() if k.startswith(prefix))


def part_sizes(spec: CharacterSpec) -> dict[str, int]:
    """Bytes of each part in 16 bit from the files' headers (nothing loaded)."""
    def file_bytes(path: str | None) -> int:
        if not path:
            return 0
        if os.path.isdir(path):
            return pipelines.bytes16(sorted(Path(path).glob("*.safetensors")))
        return _header_bytes(sd15_files.shapes(path))

    if os.path.isdir(spec.model):
        unet = pipelines.folder_bytes16(spec.model, "unet")
        text = pipelines.folder_bytes16(spec.model, "text_encoder")
        vae = pipelines.folder_bytes16(spec.model, "vae")
    else:
        keys = sd15_files.shapes(spec.model)
        unet, text = _header_bytes(keys, sd15_files.UNET_PREFIX), _header_bytes(keys, sd15_files.CLIP_PREFIX)
        vae = _header_bytes(keys, sd15_files.VAE_PREFIX)
    if spec.taesd:
        vae = file_bytes(spec.taesd)
    return {"transformer": unet + file_bytes(spec.controlnet) + file_bytes(spec.ip_adapter),
            "text_encoders": text + file_bytes(spec.clip_vision), "vae": vae}


def check_files(spec: CharacterSpec) -> str:
    """Every chosen file is there and of the right kind (SD1.5); returns the checkpoint layout."""
    layout = sd15_files.checkpoint_kind(spec.model)
    sd15_files.controlnet_kind(spec.controlnet)
    if spec.ip_adapter:
        adapter = ip_adapter_sd15.describe(spec.ip_adapter)
        if not spec.clip_vision:
            raise ModelFileError("a CLIP vision encoder for the IP-Adapter (models/clip_vision)", "none",
                                 "Put CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in models/clip_vision.")
        if not os.path.isdir(spec.clip_vision):
            cfg = sd15_files.clip_vision_config(sd15_files.shapes(spec.clip_vision))
            ip_adapter_sd15.check_encoder(adapter, cfg, Path(spec.ip_adapter).name, Path(spec.clip_vision).name)
    if spec.fast_lora and not os.path.isfile(spec.fast_lora):
        raise ModelFileError("the fast LoRA file", f"'{spec.fast_lora}' (missing)", "Put it in models/loras.")
    if spec.taesd:
        dec, _ = sd15_files.taesd_pair(spec.taesd)
        if not dec:
            raise ModelFileError("taesd_decoder.safetensors in models/vae_approx", f"'{Path(spec.taesd).name}' alone",
                                 "Put madebyollin's taesd_decoder.safetensors beside it.")
    if layout == "single_file" and not os.path.isdir(spec.tokenizer):
        raise ModelFileError("ComfyUI's CLIP tokenizer folder (comfy/sd1_tokenizer)", f"'{spec.tokenizer}'",
                             "Reinstall ComfyUI: the folder ships with it.")
    return layout


def resolve(spec: CharacterSpec, free_vram: int | None = None) -> tuple[str, torch.dtype, str, Footprint]:
    return pipelines.resolve(spec, part_sizes(spec), free_vram)


def make_handle(spec: CharacterSpec, free_vram: int | None = None) -> CharacterHandle:
    layout = check_files(spec)
    mode, dtype, _, _ = resolve(spec, free_vram)
    return CharacterHandle(spec=spec, offload=mode, dtype=dtype_name(dtype), layout=layout,
                           scheduler=scheduler_for(spec.fast_lora))


def need_bytes(handle: CharacterHandle, free_vram: int | None = None) -> int:
    _, _, _, fp = resolve(handle.spec, free_vram)
    return resident_vram(handle.offload, fp)


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class CharacterModel(pipelines.LoadedPipeline):
    """The ControlNet pipeline (``pipe``) and its img2img twin (``img2img``, same modules)."""

    img2img: Any = None
    has_ip_adapter: bool = False

    def close(self) -> None:
        self.img2img = None
        super().close()


def load(handle: CharacterHandle) -> CharacterModel:
    spec = handle.spec
    check_files(spec)
    _, dtype, why, fp = resolve(spec)
    t0 = time.perf_counter()
    log.info("Atelier: loading the character pipeline from %s (%s, offload %s: %s)", Path(spec.model).name,
             dtype_name(dtype), handle.offload, why)
    pipe = _build_pipeline(spec, dtype, handle.scheduler)
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    model = CharacterModel(pipe=pipe, spec=spec, offload=handle.offload, dtype=dtype, device=torch.device(spec.device),
                           footprint=fp, has_ip_adapter=bool(spec.ip_adapter))
    try:
        _apply_settings(model)
        model.img2img = StableDiffusionControlNetImg2ImgPipeline(**pipe.components)
        model.img2img.set_progress_bar_config(disable=True)
    except Exception:
        model.close()
        raise
    model.load_seconds = time.perf_counter() - t0
    return model


def _build_pipeline(spec: CharacterSpec, dtype: torch.dtype, scheduler: str):
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionControlNetPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel

    if os.path.isdir(spec.model):
        root = spec.model
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        text = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, local_files_only=True)
        tok_dir = os.path.join(root, "tokenizer")
        tokenizer = sd15_files.clip_tokenizer(tok_dir if os.path.isdir(tok_dir) else spec.tokenizer)
        sched_cfg_path = os.path.join(root, "scheduler", "scheduler_config.json")
        sched_cfg = (json.loads(Path(sched_cfg_path).read_text(encoding="utf-8")) if os.path.isfile(sched_cfg_path)
                     else sd15_files.facts("scheduler"))
    else:
        unet, vae, text, tokenizer = sd15_files.load_single_checkpoint(spec.model, dtype, spec.tokenizer)
        sched_cfg = sd15_files.facts("scheduler")
    if spec.taesd:
        vae, _ = sd15_files.load_taesd(spec.taesd, dtype)
    controlnet = sd15_files.load_controlnet(spec.controlnet, dtype)
    if controlnet.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ModelFileError(f"a ControlNet for this model ({unet.config.cross_attention_dim}-wide cross-attention)",
                             f"'{Path(spec.controlnet).name}' ({controlnet.config.cross_attention_dim}-wide)",
                             "Pick an SD1.5 OpenPose ControlNet.")
    sched = getattr(diffusers, scheduler).from_config(sched_cfg)
    image_encoder = feature_extractor = None
    if spec.ip_adapter:
        image_encoder = sd15_files.load_clip_vision(spec.clip_vision, dtype)
        size = image_encoder.config.image_size
        feature_extractor = CLIPImageProcessor(size=size, crop_size=size)
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, controlnet=controlnet, scheduler=sched,
        safety_checker=None, feature_extractor=feature_extractor, image_encoder=image_encoder,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if spec.ip_adapter:
        pipe.load_ip_adapter(ip_adapter_sd15.read(spec.ip_adapter), subfolder="", weight_name="ip_adapter",
                             image_encoder_folder=None)
    if spec.fast_lora:
        pipe.load_lora_weights(spec.fast_lora, adapter_name="fast")
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go (no per-step LoRA cost)
    return pipe


def _apply_settings(model: CharacterModel) -> None:
    pipe, spec = model.pipe, model.spec
    if spec.attention_slicing:
        pipe.enable_attention_slicing()
    if spec.vae_slicing:
        pipe.vae.enable_slicing()
    pipelines.apply_offload(model)
    if spec.compile:
        if model.device.type != "cuda":
            model.notes.append("compile skipped: needs a CUDA GPU")
        elif model.offload == "sequential":
            model.notes.append("compile skipped: sequential offload streams every layer")
        else:
            for m in (pipe.unet, pipe.controlnet):
                m.compile(fullgraph=False, dynamic=False)
            model.notes.append("UNet and ControlNet compiled (torch.compile): the first frames include compilation")


def summary(handle: CharacterHandle, model: CharacterModel | None = None) -> str:
    s = handle.spec
    parts = [f"{Path(s.model).name} + {Path(s.controlnet).name}"]
    if s.ip_adapter:
        parts.append(f"IP-Adapter {Path(s.ip_adapter).name}")
    if s.fast_lora:
        parts.append(f"{Path(s.fast_lora).name} ({handle.scheduler})")
    parts.append("TAESD" if s.taesd else "full VAE")
    parts.append(f"{handle.dtype}, offload {handle.offload}")
    flags = [n for n, on in (("attention slicing", s.attention_slicing), ("VAE slicing", s.vae_slicing),
                             ("compiled", s.compile)) if on]
    return with_notes(", ".join(parts + flags), model)


STAGE = Stage(group="character", make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)


# ------------------------------------------------------------------------------------------------- reuse


def reuse_plan(steps: int, reuse: float) -> tuple[int, float]:
    """(steps run on a reusing frame, the img2img ``strength`` that runs exactly that many).

    diffusers runs ``int(steps · strength)`` steps; the half step keeps float rounding from dropping one."""
    n = max(1, int(steps * (1.0 - reuse) + 1e-9))
    return n, min(1.0, (n + 0.5) / steps)


def mixed_latent(prev: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    """The start latent of a reusing frame: √ᾱ(t)·prev + √(1−ᾱ(t))·noise (what the scheduler's add_noise does)."""
    a = alphas_cumprod[int(t)].to(torch.float64)
    return (a.sqrt() * prev.double() + (1 - a).sqrt() * noise.double()).to(prev.dtype)


# ------------------------------------------------------------------------------------------- consistency


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) of sRGB values in [0, 1], last dimension RGB."""
    rgb = rgb.double().clamp(0, 1)
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
    xyz = lin @ m.T / torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def histogram_delta_e(a: torch.Tensor, b: torch.Tensor, side: int = 96) -> float:
    """Colour-histogram ΔE of two frames (H×W×3 in [0, 1]): the earth mover's distance between their L*, a* and b*
    histograms (per channel, in Lab units), combined as √(ΔL² + Δa² + Δb²).

    Moving pixels around (a pose change) gives 0; shifting every colour by one Lab offset gives that offset's ΔE76;
    a changed outfit or hair colour shows up as the share of pixels that changed times how far. Frames are
    resampled to ``side`` pixels a side first (the histograms are compared on equal pixel counts)."""
    def lab(x):
        x = torch.nn.functional.interpolate(x.permute(2, 0, 1)[None].float(), size=(side, side), mode="area")
        return srgb_to_lab(x[0].permute(1, 2, 0).reshape(-1, 3))

    la, lb = lab(a), lab(b)
    w = (la.sort(dim=0).values - lb.sort(dim=0).values).abs().mean(dim=0)  # 1-D EMD per channel
    return float(torch.sqrt((w**2).sum()))


# ------------------------------------------------------------------------------------------------ prompts


def parse_keyframes(text: str | None) -> dict[int, str]:
    """``keyframe_prompts``: a JSON object {frame: prompt} (frames count from 0), a JSON list of {"frame", "prompt"},
    or plain text (a caption: the prompt from frame 0 on). Empty = none."""
    if not text or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError('keyframe_prompts as {"frame": "prompt", ...} or plain text',
                         "JSON nested too deep to read", 'Write e.g. {"0": "smiling", "24": "looking left"}.') from None
    except ValueError:
        return {0: text.strip()}
    if isinstance(data, str):
        return {0: data}
    items = data.items() if isinstance(data, dict) else (
        [(d.get("frame"), d.get("prompt")) for d in data if isinstance(d, dict)] if isinstance(data, list) else None)
    if items is None:
        raise InputError('keyframe_prompts as {"frame": "prompt", ...}', type(data).__name__,
                         'Write e.g. {"0": "smiling", "24": "looking left"}.')
    out = {}
    for k, v in items:
        try:
            frame = int(k)
        except (TypeError, ValueError):
            raise InputError("keyframe_prompts keyed by frame numbers", repr(k),
                             'Write e.g. {"0": "smiling", "24": "looking left"}.') from None
        if frame < 0 or not isinstance(v, str):
            raise InputError("a frame number ≥ 0 and a prompt text", f"{k!r}: {v!r}", "Fix that entry.")
        out[frame] = v
    return out


def frame_prompt(prompt: str, keyframes: dict[int, str], frame: int) -> tuple[int | None, str]:
    """(the keyframe in force at ``frame``, the prompt: ``prompt, keyframe text``)."""
    keys = [k for k in keyframes if k <= frame]
    if not keys:
        return None, prompt
    key = max(keys)
    extra = keyframes[key].strip()
    return key, (f"{prompt.strip()}, {extra}" if prompt.strip() and extra else (prompt.strip() or extra))


# -------------------------------------------------------------------------------------------------- run


@dataclass
class Settings:
    steps: int = 4
    guidance: float = 1.0
    controlnet_scale: float = 1.0
    ip_adapter_scale: float = 0.6
    reuse: float = 0.5
    reset_every: int = 0
    batch: int = 1
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps from 1 to {MAX_STEPS}", str(self.steps),
                             "Use 2–8 with a fast LoRA (LCM/TCD/Hyper-SD), 15–22 without.")
        if not 0.0 <= self.reuse <= 1.0:
            raise InputError("reuse from 0 to 1", str(self.reuse), "0 = every frame fresh, 0.5 = half the steps.")
        if self.batch < 1 or self.reset_every < 0:
            raise InputError("batch ≥ 1 and reset_every ≥ 0", f"batch {self.batch}, reset_every {self.reset_every}",
                             "Use batch 1 on small GPUs, 4–8 on large ones.")


@dataclass
class Record:
    frame: int
    mode: str  # fresh / reuse
    steps_run: int
    keyframe: int | None
    pose_ms: float = 0.0
    model_ms: float = 0.0
    decode_ms: float = 0.0
    delta_e: float | None = None


class Session:
    """The frame loop of one character run: prompt/identity embeddings, the previous latent, the records.

    :func:`animate` feeds it a whole pose batch; the live panel feeds it one frame at a time."""

    def __init__(self, model: CharacterModel, reference: torch.Tensor | None, prompt: str,
                 keyframes: dict[int, str] | None = None, settings: Settings | None = None,
                 negative_prompt: str = ""):
        if model.pipe is None:
            raise released("character pipeline")
        self.model, self.prompt, self.keyframes = model, prompt or "", dict(keyframes or {})
        self.negative_prompt = negative_prompt
        self.s = settings or Settings()
        self.s.check()
        self.prev_latent: torch.Tensor | None = None
        self.prev_image: torch.Tensor | None = None
        self.since_reset = 0
        self.frame = 0
        self.records: list[Record] = []
        self.resets: list[dict] = []
        self.oom_events: list[dict] = []
        self._embeds: dict[str, tuple] = {}
        self.cfg = self.s.guidance > 1.0 and model.pipe.unet.config.time_cond_proj_dim is None
        self.ip_embeds = None
        if model.has_ip_adapter:
            if reference is None:
                raise InputError("a reference picture for the IP-Adapter", "none", "Connect the character's picture.")
            self.ip_embeds = self._identity(reference)
        self.started = time.perf_counter()

    # embeddings, once each ----------------------------------------------------------------------------
    def _identity(self, reference: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        ref = check_image(reference, "reference")[0]
        pil = Image.fromarray((ref.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
        pipe = self.model.pipe
        with torch.inference_mode():
            embeds = pipe.prepare_ip_adapter_image_embeds(pil, None, pipe._execution_device, 1, self.cfg)
        return embeds[0]  # (2, 1, D) with CFG (negative first), else (1, 1, D)

    def _prompt_embeds(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if text not in self._embeds:
            pipe = self.model.pipe
            with torch.inference_mode():
                pe, ne = pipe.encode_prompt(text, pipe._execution_device, 1, self.cfg,
                                            negative_prompt=self.negative_prompt or None)
            self._embeds[text] = (pe, ne)
        return self._embeds[text]

    # one forward pass ---------------------------------------------------------------------------------
    def run(self, poses: torch.Tensor, pose_seconds: float = 0.0, progress: Progress | None = None) -> torch.Tensor:
        """Frames for a batch of pose maps (BHWC in [0, 1]), in passes of ``batch`` frames; returns BHWC."""
        progress = progress or NullProgress()
        poses = check_image(poses, "pose_image")
        out = []
        for i in range(0, poses.shape[0], self.s.batch):
            chunk = poses[i:i + self.s.batch]
            out.append(self._pass_with_oom_fallback(chunk, pose_seconds * chunk.shape[0] / poses.shape[0], progress))
            progress.step(chunk.shape[0])  # a Stop point between passes
        return torch.cat(out, 0)

    def _pass_with_oom_fallback(self, poses, pose_seconds, progress) -> torch.Tensor:
        try:
            return self._pass(poses, pose_seconds, progress)
        except torch.OutOfMemoryError:
            b = poses.shape[0]
            event = {"frame": self.frame, "batch": b}
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if b == 1:
                event["action"] = "gave up (batch 1 does not fit)"
                self.oom_events.append(event)
                raise SettingError("enough free VRAM for one frame", "out of memory at batch 1",
                                   "Turn on attention_slicing and vae_slicing, use vae taesd, offload model, "
                                   "fewer steps or smaller pose maps.") from None
            half = b // 2
            event["action"] = f"split into passes of {half} and {b - half}"
            self.oom_events.append(event)
            log.warning("Atelier: out of memory at batch %d (frame %d): %s", b, self.frame, event["action"])
            first = self._pass_with_oom_fallback(poses[:half], pose_seconds / 2, progress)
            return torch.cat([first, self._pass_with_oom_fallback(poses[half:], pose_seconds / 2, progress)], 0)

    def _pass(self, poses: torch.Tensor, pose_seconds: float, progress: Progress) -> torch.Tensor:
        model, s = self.model, self.s
        pipe = model.pipe
        if pipe is None:
            raise released("character pipeline")
        b = poses.shape[0]
        mult = pipe.vae_scale_factor
        h, w = (poses.shape[1] // mult) * mult, (poses.shape[2] // mult) * mult
        if h < mult or w < mult:
            raise InputError(f"pose maps of at least {mult}×{mult} pixels", f"{poses.shape[2]}×{poses.shape[1]}",
                             "Connect the pose maps of the video frames (512×512 is SD1.5's size).")
        reason = None
        if self.prev_latent is None:
            reason = "start"
        elif tuple(self.prev_latent.shape[-2:]) != (h // mult, w // mult):
            reason = "size changed"
        elif s.reset_every and self.since_reset >= s.reset_every:
            reason = "reset_every"
        fresh = reason is not None or s.reuse <= 0.0
        if reason is not None:
            self.resets.append({"frame": self.frame, "reason": reason})
            self.since_reset = 0
        frames = list(range(self.frame, self.frame + b))
        keys_prompts = [frame_prompt(self.prompt, self.keyframes, f) for f in frames]
        embeds = [self._prompt_embeds(p) for _, p in keys_prompts]
        kwargs: dict[str, Any] = dict(
            prompt_embeds=torch.cat([e[0] for e in embeds]),
            negative_prompt_embeds=torch.cat([e[1] for e in embeds]) if self.cfg else None,
            num_inference_steps=s.steps, guidance_scale=s.guidance, controlnet_conditioning_scale=s.controlnet_scale,
            height=h, width=w, generator=torch.Generator("cpu").manual_seed(int(s.seed) % (2**64)),
            output_type="latent")
        if self.ip_embeds is not None:
            pipe.set_ip_adapter_scale(s.ip_adapter_scale)
            e = self.ip_embeds
            kwargs["ip_adapter_image_embeds"] = [
                torch.cat([e[:1].repeat(b, 1, 1), e[1:].repeat(b, 1, 1)]) if self.cfg else e.repeat(b, 1, 1)]
        check = getattr(progress, "check", None)

        def on_step(_pipe, _i, _t, kw):
            if check is not None:
                check()  # Stop inside a pass (ComfyUI raises here)
            return kw

        kwargs["callback_on_step_end"] = on_step
        control = to_bchw(poses).float()
        steps_run = s.steps
        sync = _sync(model.device)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                if fresh:
                    latents = pipe(image=control, **kwargs).images
                else:
                    steps_run, strength = reuse_plan(s.steps, s.reuse)
                    prev = self.prev_latent.expand(b, -1, -1, -1).contiguous()
                    latents = model.img2img(image=prev, control_image=control, strength=strength, **kwargs).images
                sync()
                t1 = time.perf_counter()
                images = self.decode(latents)
                sync()
                t2 = time.perf_counter()
        finally:
            pipe.maybe_free_model_hooks()
        self.prev_latent = latents[-1:].detach()
        self.since_reset += b
        for k, f in enumerate(frames):
            de = histogram_delta_e(self.prev_image, images[k]) if self.prev_image is not None and \
                self.prev_image.shape == images[k].shape else None
            self.records.append(Record(frame=f, mode="fresh" if fresh else "reuse", steps_run=steps_run,
                                       keyframe=keys_prompts[k][0], pose_ms=1000 * pose_seconds / b,
                                       model_ms=1000 * (t1 - t0) / b, decode_ms=1000 * (t2 - t1) / b, delta_e=de))
            self.prev_image = images[k]
        self.frame += b
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → BHWC in [0, 1] on the CPU (diffusers' decode + postprocess)."""
        vae = self.model.pipe.vae
        x = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return to_bhwc((x.float() / 2 + 0.5).clamp(0, 1).cpu())

    def report(self) -> dict:
        """What the node's ``report`` output says (see the module docstring)."""
        recs = self.records
        wall = sum(r.pose_ms + r.model_ms + r.decode_ms for r in recs) / 1000
        des = [r.delta_e for r in recs if r.delta_e is not None]
        return {
            "frames": len(recs),
            "fps": round(len(recs) / wall, 3) if wall > 0 else None,
            "seconds": round(wall, 4),
            "mean_ms": {k: round(sum(getattr(r, f"{k}_ms") for r in recs) / max(1, len(recs)), 3)
                        for k in ("pose", "model", "decode")},
            "delta_e_mean": round(sum(des) / len(des), 4) if des else None,
            "resets": self.resets,
            "oom_events": self.oom_events,
            "settings": {**self.s.__dict__, "scheduler": type(self.model.pipe.scheduler).__name__,
                         "cfg": self.cfg, "ip_adapter": self.ip_embeds is not None},
            "per_frame": [{"frame": r.frame, "mode": r.mode, "steps_run": r.steps_run, "keyframe": r.keyframe,
                           "pose_ms": round(r.pose_ms, 3), "model_ms": round(r.model_ms, 3),
                           "decode_ms": round(r.decode_ms, 3),
                           "delta_e": None if r.delta_e is None else round(r.delta_e, 4)} for r in recs],
        }


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def animate(model: CharacterModel, pose: torch.Tensor, reference: torch.Tensor | None, prompt: str, *,
            keyframe_prompts: str | dict | None = None, settings: Settings | None = None, pose_seconds: float = 0.0,
            progress: Progress | None = None) -> tuple[torch.Tensor, dict]:
    """One frame per pose map (IMAGE BHWC) → (frames BHWC, report dict). See the module docstring."""
    pose = check_image(pose, "pose_image")
    keyframes = keyframe_prompts if isinstance(keyframe_prompts, dict) else parse_keyframes(keyframe_prompts)
    late = sorted(k for k in keyframes if k >= pose.shape[0])
    if late:
        raise InputError(f"keyframes within the {pose.shape[0]} frames of pose_image (0–{pose.shape[0] - 1})",
                         f"a keyframe at frame {late[0]}", "Connect a longer pose batch or fix keyframe_prompts.")
    if reference is not None:
        reference = check_image(reference, "reference")
    session = Session(model, reference, prompt, keyframes, settings)
    frames = session.run(pose, pose_seconds=pose_seconds, progress=progress)
    return frames, session.report()
