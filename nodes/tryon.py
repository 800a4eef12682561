"""Try-on nodes: the SDXL try-on loader and sampler, and the LoRA node for both try-on pipes (SDXL, FLUX Fill)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..atelier import fill, flux_tryon, tryon
from ..atelier import lora as lora_engine
from ..atelier.errors import InputError
from ..atelier.types import FluxFillHandle
from . import _bridge as bridge
from . import _settings as settings
from ._bridge import FluxFillPipe, LoraPipe, Redux, TryOnPipe


class AtelierTryOnLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTryOnLoader",
            display_name="Try-On Loader (SDXL)",
            category="atelier/tryon",
            description="Load SDXL (inpainting or base) with an optional depth ControlNet and an IP-Adapter that "
                        "reads the garment picture, with the memory/speed settings of your GPU. Obeys ComfyUI's "
                        "Unload button.",
            inputs=[
                io.Combo.Input("model", options=bridge.tryon_model_choices(),
                               tooltip="An SDXL checkpoint in models/checkpoints (inpainting = 9-channel UNet, or "
                                       "base) or a diffusers SDXL folder in models/diffusers. SD1.5 is refused."),
                io.Combo.Input("controlnet", options=bridge.tryon_controlnet_choices(), default=bridge.NONE,
                               tooltip="none, or an SDXL depth ControlNet in models/controlnet (one file, or the "
                                       "folder's diffusion_pytorch_model.safetensors): keeps the body's shape."),
                io.Combo.Input("ip_adapter", options=bridge.ipadapter_choices(), default=bridge.NONE,
                               tooltip="none, or an h94 SDXL IP-Adapter in models/ipadapter (.safetensors or .bin "
                                       "as downloaded): carries the garment picture into the result."),
                io.Combo.Input("clip_vision", options=bridge.clip_vision_choices(), default=bridge.AUTO,
                               tooltip="The IP-Adapter's image encoder in models/clip_vision (auto = the first "
                                       "that fits: CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors for _vit-h)."),
                settings.quantization("UNet quantized"),
                settings.offload(),
                io.Boolean.Input("attention_slicing", default=False,
                                 tooltip="Compute attention in slices (diffusers): less memory on CPUs/old GPUs, "
                                         "slower elsewhere. Not combined with an IP-Adapter."),
                settings.vae_slicing("Decode batch items one at a time."),
                settings.vae_tiling("Encode/decode in tiles: large pictures on small GPUs."),
                settings.dtype(),
            ],
            outputs=[TryOnPipe.Output(display_name="pipe")],
        )

    @classmethod
    def execute(cls, model, controlnet, ip_adapter, clip_vision, quantization, offload, attention_slicing,
                vae_slicing, vae_tiling, dtype) -> io.NodeOutput:
        spec = tryon.TryOnSpec(files=bridge.tryon_files(model, controlnet, ip_adapter, clip_vision),
                               quantization=quantization, offload=offload, attention_slicing=attention_slicing,
                               vae_slicing=vae_slicing, vae_tiling=vae_tiling, dtype=dtype, device=bridge.device())
        handle, text = bridge.load_stage(tryon.STAGE, spec)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class AtelierTryOn(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTryOn",
            display_name="Try-On (SDXL)",
            category="atelier/tryon",
            description="Dress the person in the garment inside the mask: SDXL inpainting guided by depth "
                        "(ControlNet) and by the garment picture (IP-Adapter, masked to the garment area).",
            inputs=[
                TryOnPipe.Input("pipe", tooltip="From Try-On Loader (SDXL), optionally through LoRA nodes."),
                io.Image.Input("person", tooltip="The person picture (any size: padded to a multiple of 32 and "
                                                 "cropped back)."),
                io.Image.Input("garment", tooltip="The garment picture (product shot). Transparency: see "
                                                  "garment_alpha."),
                io.Mask.Input("mask", tooltip="1 = where the garment goes (Garment Mask, or painted). Same size as "
                                              "the person. An empty mask is an error."),
                io.Image.Input("depth", optional=True,
                               tooltip="Depth of the person picture (Depth node or any depth IMAGE) for the "
                                       "ControlNet. Without it the ControlNet contributes nothing."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The garment in words (colour, fabric, cut, print)."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to avoid."),
                io.Float.Input("ip_adapter_scale", default=0.8, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly the garment picture steers the result (0 = prompt only)."),
                io.Float.Input("controlnet_scale", default=0.6, min=0.0, max=2.0, step=0.05,
                               tooltip="How strongly the depth map holds the body's shape."),
                io.Float.Input("strength", default=0.99, min=0.01, max=1.0, step=0.01,
                               tooltip="How much of the masked area is repainted (0.99: fully)."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Denoising steps."),
                io.Float.Input("guidance", default=7.0, min=0.0, max=30.0, step=0.5,
                               tooltip="Classifier-free guidance (SDXL: 5–8)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Same seed, same pixels (torch.Generator('cpu'), like plain diffusers). "
                                     "Person i of a batch uses seed + i."),
                io.Boolean.Input("composite_back", default=True,
                                 tooltip="Paste the result through the mask: pixels outside it stay exactly as "
                                         "they were."),
                io.Mask.Input("garment_alpha", optional=True,
                              tooltip="For a garment PNG with transparency: connect its LoadImage MASK here and "
                                      "the transparent part is flattened on white (an RGBA IMAGE is too)."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, pipe, person, garment, mask, prompt, negative_prompt, ip_adapter_scale, controlnet_scale,
                strength, steps, guidance, seed, composite_back, depth=None, garment_alpha=None) -> io.NodeOutput:
        with bridge.comfy_progress(steps * person.shape[0]) as progress:
            model = bridge.acquire(tryon.STAGE, pipe)
            out = tryon.run(model, person, garment, mask, depth=depth, prompt=prompt,
                            negative_prompt=negative_prompt, ip_adapter_scale=ip_adapter_scale,
                            controlnet_scale=controlnet_scale, strength=strength, steps=steps, guidance=guidance,
                            seed=seed, composite_back=composite_back, loras=pipe.loras,
                            garment_alpha=garment_alpha, progress=progress)
        return io.NodeOutput(bridge.images_out(out))


class AtelierLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierLoRA",
            display_name="LoRA (Try-On / FLUX Fill)",
            category="atelier/tryon",
            description="Add a LoRA to an SDXL try-on or FLUX Fill pipe; chain several. The base model stays "
                        "loaded while LoRAs or strengths change. A LoRA for another base model is an error that "
                        "lists what did not match.",
            inputs=[
                io.MultiType.Input("pipe", types=[TryOnPipe, FluxFillPipe],
                                   tooltip="From Try-On Loader (SDXL) or FLUX Fill Loader (or another LoRA node)."),
                io.Combo.Input("lora", options=bridge.lora_choices(),
                               tooltip="A LoRA in models/loras (.safetensors; kohya/ComfyUI or diffusers keys) "
                                       "trained for the pipe's base model (SDXL, or FLUX.1 dev for FLUX Fill)."),
                io.Float.Input("strength", default=1.0, min=lora_engine.STRENGTH_RANGE[0], max=lora_engine.STRENGTH_RANGE[1],
                               step=0.05, tooltip="1 = as trained, 0 = off, negative = the opposite direction."),
            ],
            outputs=[LoraPipe.Output(display_name="pipe")],
        )

    @classmethod
    def fingerprint_inputs(cls, pipe, lora, strength):
        return (bridge.lora_fingerprint(lora), strength)

    @classmethod
    def execute(cls, pipe, lora, strength) -> io.NodeOutput:
        if isinstance(pipe, tryon.TryOnHandle):
            stage, base = tryon.STAGE, tryon.BASE
        elif isinstance(pipe, FluxFillHandle):
            stage, base = fill.STAGE, fill.LORA_BASE
        else:
            raise InputError("an ATELIER_TRYON or ATELIER_FLUX_FILL pipe", type(pipe).__name__,
                             "Connect Try-On Loader (SDXL), FLUX Fill Loader or another LoRA node.")
        out = lora_engine.with_lora(pipe, lora_engine.ref(bridge.lora_path(lora), float(strength)))
        # load it now: a LoRA for another base model is reported on this node, and the sampler finds it loaded
        lora_engine.sync(bridge.acquire(stage, out), out.loras, base)
        return io.NodeOutput(out, ui=ui.PreviewText(f"{base}: LoRA {lora_engine.describe(out.loras)}"))



class AtelierReduxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierReduxLoader",
            display_name="FLUX Redux Loader",
            category="atelier/tryon",
            description="Load FLUX.1 Redux (the garment picture as extra prompt tokens for FLUX Try-On).",
            inputs=[
                io.Combo.Input("redux", options=bridge.style_model_choices(),
                               tooltip="flux1-redux-dev.safetensors in models/style_models."),
                io.Combo.Input("siglip", options=bridge.clip_vision_choices(), default=bridge.AUTO,
                               tooltip="The SigLIP encoder in models/clip_vision (auto = a name containing "
                                       "sigclip or siglip: sigclip_vision_patch14_384.safetensors)."),
                settings.dtype(),
            ],
            outputs=[Redux.Output(display_name="redux")],
        )

    @classmethod
    def execute(cls, redux, siglip, dtype) -> io.NodeOutput:
        spec = flux_tryon.ReduxSpec(redux=bridge.style_model_path(redux), siglip=bridge.siglip_path(siglip),
                                    dtype=dtype, device=bridge.device())
        handle, text = bridge.load_stage(flux_tryon.STAGE, spec)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class AtelierFluxTryOn(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierFluxTryOn",
            display_name="Try-On (FLUX Fill)",
            category="atelier/tryon",
            description="Dress the person with FLUX.1 Fill: the garment picture is placed beside a crop around "
                        "the mask, so its logos and text are there to copy; the crop is stitched back and pixels "
                        "outside the mask stay exact.",
            inputs=[
                FluxFillPipe.Input("pipe", tooltip="From FLUX Fill Loader (LoRA nodes allowed in between)."),
                io.Image.Input("person", tooltip="The person picture (any size)."),
                io.Image.Input("garment", tooltip="The garment picture (product shot; RGBA is flattened on white)."),
                io.Mask.Input("mask", tooltip="1 = where the garment goes; the crop is taken around it."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="E.g. 'the person on the right wears the garment on the left'."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps."),
                io.Float.Input("guidance", default=30.0, min=0.0, max=100.0, step=0.5,
                               tooltip="FLUX guidance; Fill works best around 30."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Same seed, same pixels. Person i of a batch uses seed + i."),
                Redux.Input("redux", optional=True,
                            tooltip="From FLUX Redux Loader: the garment's image tokens join the prompt."),
                io.Int.Input("height", default=1024, min=16, max=2048, step=16, optional=True,
                             tooltip="Height of the side-by-side picture FLUX works on (the crop and the "
                                     "garment are scaled to it)."),
                io.Float.Input("margin", default=0.15, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Context around the mask box in the crop, as a fraction of its size."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, pipe, person, garment, mask, prompt, steps, guidance, seed, redux=None, height=1024,
                margin=0.15) -> io.NodeOutput:
        with bridge.comfy_progress(steps * person.shape[0]) as progress:
            model = bridge.acquire(fill.STAGE, pipe)
            redux_model = bridge.acquire(flux_tryon.STAGE, redux) if redux is not None else None
            out = flux_tryon.run(model, person, garment, mask, prompt, steps=steps, guidance=guidance, seed=seed,
                                 redux=redux_model, height=height, margin=margin, loras=pipe.loras,
                                 progress=progress)
        return io.NodeOutput(bridge.images_out(out))


NODES = [AtelierTryOnLoader, AtelierTryOn, AtelierLoRA, AtelierFluxTryOn, AtelierReduxLoader]
