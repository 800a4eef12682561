"""Background removal nodes: the remover loader (rembg-family ONNX, BiRefNet / RMBG-2.0 checkpoints) and the
remove node (object on black + alpha mask)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..atelier import masker
from ..atelier.types import DTYPES
from . import _bridge as bridge
from ._bridge import BgRemover


class AtelierBackgroundRemoverLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierBackgroundRemoverLoader",
            display_name="Background Remover Loader",
            category="atelier/mask",
            description="Load a background-removal model from models/background_removal: rembg-family .onnx "
                        "(u2net, u2netp, silueta, ISNet, BiRefNet, RMBG-2.0) through onnxruntime, or a BiRefNet / "
                        "RMBG-2.0 .safetensors through Atelier's own architecture code. Obeys ComfyUI's Unload "
                        "button.",
            inputs=[
                io.Combo.Input("model", options=bridge.bg_remover_choices(),
                               tooltip="A file in models/background_removal. .onnx: the rembg family, recognised "
                                       "from the file name (u2net, u2netp, silueta, isnet, anime, birefnet, rmbg) or "
                                       "its graph, with rembg's own pre/post-processing. .safetensors/.pth: "
                                       "BiRefNet or RMBG-2.0 with the official key names."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip=".safetensors/.pth models: auto = bf16 on GPUs that support it, fp16 on "
                                       "older GPUs, fp32 on CPU. ONNX models run in their graph's precision."),
                io.Combo.Input("device", options=list(masker.DEVICES), default="auto",
                               tooltip="auto = ComfyUI's device (ONNX models use the GPU when onnxruntime-gpu is "
                                       "installed, else the CPU); cpu = always the CPU, leaving VRAM to others."),
            ],
            outputs=[BgRemover.Output(display_name="remover")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return bridge.model_fingerprint("background_removal", kwargs.get("model"))

    @classmethod
    def execute(cls, model, dtype, device) -> io.NodeOutput:
        spec = masker.make_spec(bridge.bg_remover_path(model), dtype=dtype,
                                device=bridge.device() if device == "auto" else "cpu", memory_device=bridge.device())
        handle, text = bridge.load_stage(masker.STAGE, spec)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class AtelierRemoveBackground(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierRemoveBackground",
            display_name="Remove Background",
            category="atelier/mask",
            description="Cut the main object out of each image: the object on black, and its alpha as a MASK "
                        "(1 = object).",
            inputs=[
                BgRemover.Input("remover", tooltip="From Background Remover Loader."),
                io.Image.Input("image", tooltip="The pictures to cut out (any size; a batch runs image by image)."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=32,
                             tooltip="The side the model sees (the image is resized to a square and the mask "
                                     "resized back). 0 = the model's own size (320 for u2net, 1024 for ISNet and "
                                     "BiRefNet); ONNX models with a fixed input accept only that."),
                io.Float.Input("mask_threshold", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="0 = soft alpha (hair and edges keep partial values); above 0 = a hard mask "
                                       "that is 1 where alpha ≥ the threshold."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, remover, image, resolution, mask_threshold) -> io.NodeOutput:
        with bridge.comfy_progress(image.shape[0]) as progress:
            model = bridge.acquire(masker.STAGE, remover)
            out, mask = masker.remove(model, image, resolution=resolution, mask_threshold=mask_threshold,
                                      progress=progress)
        return io.NodeOutput(bridge.images_out(out), mask.clamp(0.0, 1.0).float().cpu())


NODES = [AtelierBackgroundRemoverLoader, AtelierRemoveBackground]
