"""FLUX.1 Fill nodes: the loader (every memory/speed trade-off is an input) and the inpaint node."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..atelier import fill
from ..atelier.types import FluxFillSpec
from . import _bridge as bridge
from . import _settings as settings
from ._bridge import FluxFillPipe


class AtelierFluxFillLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierFluxFillLoader",
            display_name="FLUX Fill Loader",
            category="atelier/fill",
            description="Load FLUX.1 Fill (diffusers folder or ComfyUI single files) with the memory/speed settings "
                        "of your GPU. Loaded models obey ComfyUI's Unload button.",
            inputs=[
                io.Combo.Input("model", options=bridge.flux_fill_choices(),
                               tooltip="FLUX.1 Fill: a diffusers folder in models/diffusers, or "
                                       "flux1-fill-dev*.safetensors in models/diffusion_models (then clip_l, t5xxl "
                                       "and vae below are used)."),
                settings.quantization("transformer and T5 quantized"),
                settings.offload(),
                io.Boolean.Input("attention_slicing", default=False,
                                 tooltip="Compute attention in chunks of queries: less memory where PyTorch has no "
                                         "memory-efficient attention (CPU, old GPUs); slower elsewhere."),
                settings.vae_slicing("Decode batch items one at a time."),
                settings.vae_tiling("Encode/decode in tiles: large images on small GPUs."),
                settings.first_block_cache(),
                settings.dtype(),
                io.Combo.Input("clip_l", options=bridge.file_choices("text_encoders"), default=bridge.AUTO,
                               optional=True, tooltip="Single-file models only: CLIP-L in models/text_encoders "
                                                      "(auto = a name containing clip_l)."),
                io.Combo.Input("t5xxl", options=bridge.file_choices("text_encoders"), default=bridge.AUTO,
                               optional=True, tooltip="Single-file models only: T5-XXL in models/text_encoders "
                                                      "(auto = a name containing t5xxl, fp16 preferred)."),
                io.Combo.Input("vae", options=bridge.file_choices("vae"), default=bridge.AUTO, optional=True,
                               tooltip="Single-file models only: FLUX's ae.safetensors in models/vae."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile the transformer's blocks: faster steps after a first run "
                                         "that compiles (tens of seconds). Needs a GPU and a C++ compiler; skipped "
                                         "under sequential offload."),
            ],
            outputs=[FluxFillPipe.Output(display_name="pipe")],
        )

    @classmethod
    def execute(cls, model, quantization, offload, attention_slicing, vae_slicing, vae_tiling, first_block_cache,
                dtype, clip_l=bridge.AUTO, t5xxl=bridge.AUTO, vae=bridge.AUTO, compile=False) -> io.NodeOutput:
        spec = FluxFillSpec(
            files=bridge.flux_fill_files(model, clip_l, t5xxl, vae), quantization=quantization, offload=offload,
            attention_slicing=attention_slicing, vae_slicing=vae_slicing, vae_tiling=vae_tiling,
            first_block_cache=float(first_block_cache), dtype=dtype, device=bridge.device(), compile=bool(compile))
        handle, text = bridge.load_stage(fill.STAGE, spec)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class AtelierFluxFill(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierFluxFill",
            display_name="FLUX Fill (Inpaint)",
            category="atelier/fill",
            description="Repaint the masked part of an image with FLUX.1 Fill; with composite_back the rest stays "
                        "exactly as it was.",
            inputs=[
                FluxFillPipe.Input("pipe", tooltip="From FLUX Fill Loader."),
                io.Image.Input("image", tooltip="The picture to edit (any size: padded to a multiple of 16 and "
                                                "cropped back)."),
                io.Mask.Input("mask", tooltip="1 = repaint, 0 = keep. Same size as the image; one mask for the "
                                              "batch or one per image. An empty mask returns the image untouched."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What should appear in the masked area."),
                io.Int.Input("steps", default=28, min=1, max=200, tooltip="Denoising steps (28 is FLUX's usual)."),
                io.Float.Input("guidance", default=30.0, min=0.0, max=100.0, step=0.5,
                               tooltip="FLUX guidance; Fill works best around 30."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Same seed, same pixels (torch.Generator('cpu'), like plain diffusers). "
                                     "Image i of a batch uses seed + i."),
                io.Boolean.Input("composite_back", default=True,
                                 tooltip="Paste the result back through the mask so unmasked pixels are exactly "
                                         "the input's."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, pipe, image, mask, prompt, steps, guidance, seed, composite_back) -> io.NodeOutput:
        with bridge.comfy_progress(steps * image.shape[0]) as progress:
            model = bridge.acquire(fill.STAGE, pipe)
            out = fill.inpaint(model, image, mask, prompt, steps=steps, guidance=guidance, seed=seed,
                               composite_back=composite_back, progress=progress, loras=pipe.loras)
        return io.NodeOutput(bridge.images_out(out))


NODES = [AtelierFluxFillLoader, AtelierFluxFill]
