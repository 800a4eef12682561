"""FastComposer nodes: several subjects in one picture from one photo each (no fine-tuning), on Stable Diffusion 1.5.

The loader reads FastComposer's released checkpoint; the generate node marks subjects in the prompt with
``<subject>`` after the word each one stands for, takes one subject picture per marker and runs diffusers'
StableDiffusionPipeline with delayed subject conditioning (see atelier/fastcomposer.py)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..atelier import fastcomposer
from . import _bridge as bridge
from . import _settings as settings
from ._bridge import FastComposer


class AtelierFastComposerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierFastComposerLoader",
            display_name="FastComposer Loader",
            category="atelier/compose",
            description="Load FastComposer (MIT, arXiv 2305.10431): Stable Diffusion 1.5 with a CLIP image encoder "
                        "and a fusion MLP, all in its one released checkpoint. Loaded models obey ComfyUI's Unload "
                        "button.",
            inputs=[
                io.Combo.Input("model", options=bridge.fastcomposer_choices(),
                               tooltip="FastComposer's pytorch_model.bin as released (read with weights_only=True) "
                                       "or a .safetensors of the same keys, in models/fastcomposer."),
                settings.offload(),
                io.Boolean.Input("attention_slicing", default=False,
                                 tooltip="Compute the UNet's attention in slices: less memory on old GPUs and the "
                                         "CPU, slower elsewhere."),
                settings.vae_slicing("Decode batch items one at a time."),
                settings.dtype(),
                io.Combo.Input("base", options=bridge.sd15_base_choices(), default=bridge.NONE, optional=True,
                               tooltip="Only for a slimmer FastComposer file without the UNet, VAE or text encoder: "
                                       "an SD1.5 checkpoint (.safetensors) in models/checkpoints that supplies "
                                       "them. none = everything comes from the FastComposer file."),
            ],
            outputs=[FastComposer.Output(display_name="composer")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return bridge.fastcomposer_fingerprint(kwargs.get("model"), kwargs.get("base"))

    @classmethod
    def execute(cls, model, offload, attention_slicing, vae_slicing, dtype, base=bridge.NONE) -> io.NodeOutput:
        spec = bridge.fastcomposer_spec(model, base, offload=offload, attention_slicing=bool(attention_slicing),
                                        vae_slicing=bool(vae_slicing), dtype=dtype)
        handle, text = bridge.load_stage(fastcomposer.STAGE, spec)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class AtelierFastComposer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierFastComposer",
            display_name="FastComposer (Multi-Subject)",
            category="atelier/compose",
            description="Generate one picture with several people (or subjects), each from one photo: write "
                        f"{fastcomposer.MARKER} after the word each photo stands for.",
            inputs=[
                FastComposer.Input("composer", tooltip="From FastComposer Loader."),
                io.String.Input("prompt", multiline=True,
                                default=f"a man {fastcomposer.MARKER} and a woman {fastcomposer.MARKER} "
                                        "sitting in a park",
                                tooltip=f"Mark each subject with {fastcomposer.MARKER} right after its word: "
                                        f"'a man {fastcomposer.MARKER} and a woman {fastcomposer.MARKER}'. The "
                                        "first marker takes the first subject picture, and so on. At most 77 "
                                        "CLIP tokens."),
                io.Image.Input("subjects", tooltip="One picture per marker, in the markers' order (an IMAGE "
                                                   "batch: e.g. Batch Images). A face or a person, ideally ≥ 224 px."),
                io.Mask.Input("subject_masks", optional=True,
                              tooltip="Optional: one mask per subject picture (1 = the subject), e.g. from Remove "
                                      "Background. The encoder then sees the subject's box on black; without "
                                      "masks it sees the whole picture, padded to a square."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to avoid (used with guidance above 1)."),
                io.Float.Input("alpha", default=0.2, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the steps on the text alone before the subjects are fused in. "
                                       "Higher = the prompt's layout and style win (less likeness); lower = more "
                                       "likeness, less editability. 0.2 = the paper's 10 of 50 steps; 1 = plain "
                                       "SD1.5."),
                io.Int.Input("steps", default=50, min=1, max=200, tooltip="Denoising steps (PNDM, SD1.5's own)."),
                io.Float.Input("guidance", default=5.0, min=1.0, max=30.0, step=0.5,
                               tooltip="Classifier-free guidance scale (FastComposer's demo uses 5)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Same seed, same pixels (torch.Generator('cpu'), like plain diffusers)."),
                io.Int.Input("width", default=512, min=64, max=2048, step=8, tooltip="Picture width (SD1.5: 512)."),
                io.Int.Input("height", default=512, min=64, max=2048, step=8, tooltip="Picture height (SD1.5: 512)."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, composer, prompt, subjects, negative_prompt, alpha, steps, guidance, seed, width, height,
                subject_masks=None) -> io.NodeOutput:
        with bridge.comfy_progress(steps) as progress:
            model = bridge.acquire(fastcomposer.STAGE, composer)
            out = fastcomposer.generate(model, prompt, subjects, subject_masks, negative_prompt=negative_prompt,
                                        alpha=float(alpha), steps=int(steps), guidance=float(guidance),
                                        seed=int(seed), width=int(width), height=int(height), progress=progress)
        return io.NodeOutput(bridge.images_out(out))


NODES = [AtelierFastComposerLoader, AtelierFastComposer]
