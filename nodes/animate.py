"""Realtime character nodes: the SD1.5 character loader and the pose-driven animation loop (atelier/animate)."""

from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..atelier import character
from . import _bridge as bridge
from . import _settings as settings
from ._bridge import Character

CATEGORY = "atelier/animate"


class AtelierCharacterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierCharacterLoader",
            display_name="Character Loader (SD1.5 + OpenPose)",
            category=CATEGORY,
            description="Load SD1.5 with an OpenPose ControlNet, optionally an IP-Adapter (identity from a "
                        "reference picture), a fast LoRA (LCM / TCD / Hyper-SD: 1–8 steps) and TAESD, for the "
                        "realtime character. Offline, from ComfyUI's model folders; obeys the Unload button.",
            inputs=[
                io.Combo.Input("model", options=bridge.sd15_model_choices(),
                               tooltip="SD1.5: a single checkpoint in models/checkpoints or a diffusers folder in "
                                       "models/diffusers. SDXL models are refused with a clear error."),
                io.Combo.Input("controlnet", options=bridge.controlnet_choices(),
                               tooltip="SD1.5 OpenPose ControlNet in models/controlnet: a single file "
                                       "(control_v11p_sd15_openpose) or a diffusers folder (name/)."),
                io.Combo.Input("ip_adapter", options=bridge.optional_file_choices(
                    "ipadapter", bridge.NONE, (".safetensors", ".bin")), default=bridge.NONE,
                    tooltip="none, or an SD1.5 IP-Adapter from models/ipadapter (h94: ip-adapter_sd15, "
                            "ip-adapter-plus_sd15): keeps the character's look from the reference picture."),
                io.Combo.Input("clip_vision", options=bridge.optional_file_choices("clip_vision", bridge.AUTO),
                               default=bridge.AUTO,
                               tooltip="The IP-Adapter's image encoder in models/clip_vision. auto = a file named "
                                       "like CLIP-ViT-H-14-laion2B-s32B-b79K (ViT-bigG for vit-G adapters)."),
                io.Combo.Input("fast_lora", options=bridge.optional_file_choices("loras", bridge.NONE),
                               default=bridge.NONE,
                               tooltip="none, or an LCM / TCD / Hyper-SD LoRA from models/loras (its name must say "
                                       "lcm, tcd or hyper): fused into the UNet, with its scheduler. 2–4 steps, "
                                       "guidance 1. Without it: DPM-Solver++, 15–22 steps."),
                io.Combo.Input("vae", options=[bridge.FULL] + [n for n in bridge.optional_file_choices(
                    "vae_approx", bridge.FULL, (".safetensors", ".pth"), "taesd_")[1:]
                    if "xl" not in n.lower() and "taesd3" not in n.lower()], default=bridge.FULL,
                    tooltip="full = the checkpoint's VAE; or TAESD (taesd_decoder.safetensors in models/vae_approx, "
                            "madebyollin): a much faster decode, slightly softer pictures."),
                settings.offload(),
                io.Boolean.Input("attention_slicing", default=False,
                                 tooltip="Attention in slices: less VRAM on small GPUs (RTX 2060), a little slower."),
                settings.vae_slicing("Decode the frames of a batch one at a time."),
                io.Combo.Input("dtype", options=["auto", "fp16", "bf16", "fp32"], default="auto",
                               tooltip="auto = bf16 on GPUs that support it, fp16 on older GPUs (RTX 20xx), fp32 on "
                                       "CPU. SD1.5 runs well in fp16 everywhere."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile the UNet and ControlNet: faster frames after the first "
                                         "(which compile). Needs a GPU and a C++ compiler."),
            ],
            outputs=[Character.Output(display_name="character")],
        )

    @classmethod
    def execute(cls, model, controlnet, ip_adapter, clip_vision, fast_lora, vae, offload, attention_slicing,
                vae_slicing, dtype, compile) -> io.NodeOutput:
        ipa = bridge.optional_file_path(ip_adapter, "ipadapter", bridge.NONE)
        spec = character.CharacterSpec(
            model=bridge.sd15_model_path(model), controlnet=bridge.controlnet_path(controlnet),
            tokenizer=bridge.sd1_tokenizer(), ip_adapter=ipa, clip_vision=bridge.clip_vision_path(clip_vision, ipa),
            fast_lora=bridge.optional_file_path(fast_lora, "loras", bridge.NONE),
            taesd=bridge.optional_file_path(vae, "vae_approx", bridge.FULL), offload=offload,
            attention_slicing=bool(attention_slicing), vae_slicing=bool(vae_slicing), dtype=dtype,
            device=bridge.device(), compile=bool(compile))
        handle, text = bridge.load_stage(character.STAGE, spec)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class AtelierAnimateCharacter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierAnimateCharacter",
            display_name="Animate Character",
            category=CATEGORY,
            description="One frame per pose map: the character follows the poses, keeps the reference's look "
                        "(IP-Adapter) and reuses the previous frame's latent for speed and steadiness. Frame 1 is "
                        "the plain diffusers ControlNet pipeline; Stop works between frames.",
            inputs=[
                Character.Input("character", tooltip="From Character Loader."),
                io.Image.Input("pose_image", tooltip="OpenPose skeleton maps, one per frame (e.g. from Pose). "
                                                     "Output frames have their size, rounded down to a multiple "
                                                     "of 8."),
                io.Image.Input("reference", tooltip="The character's picture (identity for the IP-Adapter; the "
                                                    "first image of a batch is used)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What the character is (style, clothes, hair)."),
                io.String.Input("keyframe_prompts", multiline=True, default="", optional=True,
                                tooltip='Optional: {"frame": "prompt"} JSON (frames from 0), e.g. from the '
                                        'captioner; plain text = from frame 0. Each is added to prompt from its '
                                        'frame on; embeddings are computed once per keyframe.'),
                io.Int.Input("steps", default=4, min=1, max=character.MAX_STEPS,
                             tooltip="Denoising steps of a fresh frame: 2–4 with a fast LoRA, 15–22 without."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=20.0, step=0.1,
                               tooltip="Classifier-free guidance; 1 = off (fast LoRAs), 5–7.5 without one."),
                io.Float.Input("controlnet_scale", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="How strictly the pose is followed (0.7–1.0)."),
                io.Float.Input("ip_adapter_scale", default=0.6, min=0.0, max=1.5, step=0.05,
                               tooltip="How strongly the reference's look is kept (ignored without an IP-Adapter)."),
                io.Float.Input("reuse", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="How much of the previous frame's latent carries over: a reusing frame runs "
                                       "the last max(1, int(steps·(1−reuse))) steps from it. 0 = every frame fresh."),
                io.Int.Input("reset_every", default=0, min=0, max=10000,
                             tooltip="Start fresh every N frames (stops drift); 0 = only at the start."),
                io.Int.Input("batch", default=1, min=1, max=64,
                             tooltip="Frames per forward pass (they share the previous pass's latent). 1 on "
                                     "small GPUs, 4–8 on large ones; an out-of-memory pass is split and logged."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Each pass starts from torch.Generator('cpu').manual_seed(seed), as in diffusers."),
            ],
            outputs=[io.Image.Output(display_name="frames"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, character, pose_image, reference, prompt, steps, guidance, controlnet_scale, ip_adapter_scale,
                reuse, reset_every, batch, seed, keyframe_prompts="") -> io.NodeOutput:
        from ..atelier import character as engine

        s = engine.Settings(steps=steps, guidance=guidance, controlnet_scale=controlnet_scale,
                            ip_adapter_scale=ip_adapter_scale, reuse=reuse, reset_every=reset_every, batch=batch,
                            seed=seed)
        with bridge.stop_aware_progress(pose_image.shape[0]) as progress:
            model = bridge.acquire(engine.STAGE, character)
            frames, report = engine.animate(model, pose_image, reference, prompt, keyframe_prompts=keyframe_prompts,
                                            settings=s, progress=progress)
        from ..atelier import live

        live.remember(live.LiveConfig(handle=character, reference=reference, prompt=prompt,
                                      keyframes=engine.parse_keyframes(keyframe_prompts), settings=s))
        text = json.dumps(report, indent=1)
        line = (f"{report['frames']} frames, {report['fps']} fps, ΔE mean {report['delta_e_mean']}, "
                f"{len(report['resets'])} resets, {len(report['oom_events'])} OOM events")
        return io.NodeOutput(bridge.images_out(frames), text, ui=ui.PreviewText(line))


NODES = [AtelierCharacterLoader, AtelierAnimateCharacter]


# ------------------------------------------------------------------------------------------- live panel routes


def _live_slot():
    from ..atelier import live

    s = live.state()
    if s.slot is None:
        s.slot = live.LatestWins(lambda item: _live_work(*item))
    return s


def _live_work(frame, pose_name):
    from ..atelier import live

    s = live.state()
    model = bridge.acquire(character.STAGE, s.config.handle)
    return live.animate_frame(model, s, frame, bridge.pose_function(pose_name))


def register_live_routes(routes) -> None:
    """GET /atelier/live/status, POST /atelier/live/frame (an image body; ?pose=<model|none>&size=<px>),
    POST /atelier/live/reset. web/js/atelier_live.js is the panel."""
    from aiohttp import web

    from ..atelier import live
    from ..atelier.errors import AtelierError

    @routes.get("/atelier/live/status")
    async def status(request):
        s = live.state()
        cfg = s.config
        return web.json_response({
            "ready": cfg is not None,
            "character": character.summary(cfg.handle).splitlines()[0] if cfg else None,
            "prompt": cfg.prompt if cfg else None, "settings": cfg.settings.__dict__ if cfg else None,
            "pose_models": bridge.live_pose_choices(),
            "done": s.slot.done if s.slot else 0, "dropped": s.slot.dropped if s.slot else 0})

    @routes.post("/atelier/live/frame")
    async def frame(request):
        s = _live_slot()
        if s.config is None:
            return web.json_response({"error": "Queue a workflow with Animate Character once: the live panel "
                                               "animates its character with its settings."}, status=409)
        try:
            size = int(request.query.get("size", "512"))
            image = live.decode_frame(await request.read(), max_side=max(8, min(size, 1024)))
            result = await s.slot.submit((image, request.query.get("pose", bridge.NONE)))
        except AtelierError as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response(result)

    @routes.post("/atelier/live/reset")
    async def reset(request):
        live.state().session = None
        return web.json_response({"ok": True})


_routes = bridge.prompt_server_routes()
if _routes is not None:
    register_live_routes(_routes)
