"""Layer nodes: Qwen-Image-Layered loader and splitter, export (PSD / PPTX / ZIP / PNG), load, combine."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..atelier import layer_files
from ..atelier import layers as layered
from ..atelier.errors import InputError
from ..atelier.weights import file_stamp
from . import _bridge as bridge
from . import _settings as settings
from ._bridge import Layered

CATEGORY = "atelier/layers"
log = logging.getLogger("atelier")


def _stack_out(stack: layer_files.LayerStack):
    import torch

    rgba = torch.from_numpy(stack.rgba.astype("float32") / 255.0)
    return rgba[..., :3].contiguous(), rgba[..., 3].contiguous()


GALLERY_MAX_SIDE = 512


def gallery(stack: layer_files.LayerStack) -> dict:
    """The layer gallery's UI output (web/js/atelier_layers.js): one RGBA temp PNG per layer, scaled down
    to GALLERY_MAX_SIDE, with its name and its 1-based index (layer 1 = bottom), and the canvas size."""
    files = bridge.ui_pngs(list(stack.rgba), "atelier_layers/gallery", max_side=GALLERY_MAX_SIDE)
    return {"atelier_layers": [dict(f, name=name, index=i + 1, width=stack.width, height=stack.height)
                               for i, (f, name) in enumerate(zip(files, stack.names, strict=True))]}


class AtelierLayeredLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierLayeredLoader",
            display_name="Qwen-Image-Layered Loader",
            category=CATEGORY,
            description="Load Qwen-Image-Layered (a diffusers folder in models/diffusers) with the memory/speed "
                        "settings of your GPU. Loaded models obey ComfyUI's Unload button.",
            inputs=[
                io.Combo.Input("model", options=bridge.layered_choices(),
                               tooltip="Qwen-Image-Layered: a diffusers folder in models/diffusers whose "
                                       "model_index.json names QwenImageLayeredPipeline (Qwen/Qwen-Image-Layered)."),
                settings.quantization("transformer and Qwen2.5-VL text encoder quantized"),
                settings.offload(),
                settings.vae_slicing("Decode the layers one at a time."),
                settings.vae_tiling("Encode/decode in tiles: less VRAM for the 1024 bucket."),
                settings.first_block_cache(),
                settings.dtype(),
            ],
            outputs=[Layered.Output(display_name="pipe")],
        )

    @classmethod
    def execute(cls, model, quantization, offload, vae_slicing, vae_tiling, first_block_cache, dtype) -> io.NodeOutput:
        spec = layered.LayeredSpec(
            path=bridge.layered_folder(model), quantization=quantization, offload=offload, vae_slicing=vae_slicing,
            vae_tiling=vae_tiling, first_block_cache=float(first_block_cache), dtype=dtype, device=bridge.device())
        handle, text = bridge.load_stage(layered.STAGE, spec)
        return io.NodeOutput(handle, ui={"text": [text]})


class AtelierSplitLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSplitLayers",
            display_name="Split Into Layers",
            category=CATEGORY,
            description="Decompose a picture into RGBA layers with Qwen-Image-Layered (layer 1 = background, the "
                        "last on top). The model's leading composite image is not a layer: it is dropped, and "
                        "`composite` is the layers flattened again.",
            inputs=[
                Layered.Input("pipe", tooltip="From Qwen-Image-Layered Loader."),
                io.Image.Input("image", tooltip="One picture (a batch of 1). It is resized to the resolution "
                                                "bucket; the layers come out at that size."),
                io.Int.Input("layers", default=4, min=1, max=16, tooltip="How many layers to make (4 is usual)."),
                io.Combo.Input("resolution", options=[str(r) for r in layered.RESOLUTIONS], default="640",
                               tooltip="Working size bucket (about 640×640 or 1024×1024 pixels of area, the "
                                       "picture's aspect kept). 640 is what the model was tuned for."),
                io.Int.Input("steps", default=50, min=2, max=200,
                             tooltip="Denoising steps (50 is the model's; at least 2: Qwen's scheduler cannot do 1)."),
                io.Float.Input("cfg", default=4.0, min=1.0, max=20.0, step=0.1,
                               tooltip="True classifier-free guidance scale (1 = off, one pass per step; "
                                       "4 = the model card's)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Same seed, same layers (torch.Generator('cpu'), like plain diffusers)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What the picture shows. Empty = the pipeline captions the picture itself "
                                        "with its Qwen2.5-VL (the caption comes out as `prompt`)."),
                io.Combo.Input("language", options=list(layered.LANGUAGES), default="en",
                               tooltip="Language of the automatic caption (when prompt is empty)."),
                io.Boolean.Input("cfg_normalize", default=True,
                                 tooltip="Rescale the guided prediction to the conditional one's norm (the model "
                                         "card's setting)."),
            ],
            outputs=[io.Image.Output(display_name="layers"), io.Mask.Output(display_name="alphas"),
                     io.Image.Output(display_name="composite"), io.String.Output(display_name="prompt")],
        )

    @classmethod
    def execute(cls, pipe, image, layers, resolution, steps, cfg, seed, prompt, language,
                cfg_normalize=True) -> io.NodeOutput:
        with bridge.stop_aware_progress(steps) as progress:
            model = bridge.acquire(layered.STAGE, pipe)
            result = layered.split(model, image, layers=layers, resolution=int(resolution), steps=steps, cfg=cfg,
                                  seed=seed, prompt=prompt, language=language, cfg_normalize=cfg_normalize,
                                  progress=progress)
        text = f"prompt: {result.prompt}" + "".join(f"\n{n}" for n in result.notes)
        layers_out, alphas_out = bridge.images_out(result.layers), result.alphas.clamp(0, 1).float().cpu()
        names, _ = layer_files.parse_names("", layers_out.shape[0])
        shown = layer_files.make_stack(layers_out[..., :3].numpy(), alphas_out.numpy(), names)
        return io.NodeOutput(layers_out, alphas_out, bridge.images_out(result.composite), result.prompt,
                             ui={"text": [text], **gallery(shown)})


class AtelierExportLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierExportLayers",
            display_name="Export Layers",
            category=CATEGORY,
            description="Write layers into ComfyUI's output folder as a layered PSD (Photoshop, GIMP, Krita, "
                        "Photopea), a PowerPoint slide, a ZIP of PNGs with a manifest, or numbered PNGs.",
            is_output_node=True,
            inputs=[
                io.Image.Input("layers", tooltip="Layer colours, bottom layer first (Split Into Layers, Load Layers)."),
                io.Mask.Input("alphas", tooltip="Layer opacity, 1 = opaque: one per layer (or one for all), the "
                                                "layers' size."),
                io.Combo.Input("format", options=list(layer_files.FORMATS), default="psd",
                               tooltip="psd: named pixel layers cropped to their content; pptx: one picture per "
                                       "layer, placed where it belongs; zip: full-size PNGs + manifest.json (names, "
                                       "order, bounds); png: one numbered PNG per layer."),
                io.String.Input("filename_prefix", default="atelier_layers",
                                tooltip="File name start, optionally with subfolders ('layers/poster'); always "
                                        "inside ComfyUI's output folder. A counter is added."),
                io.String.Input("layer_names", default="",
                                tooltip="Comma-separated names, bottom layer first (e.g. 'background, table, cup'). "
                                        "Missing names become 'Layer N'."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, layers, alphas, format, filename_prefix, layer_names) -> io.NodeOutput:
        alphas = layered.match_alphas(layers, alphas)
        names, notes = layer_files.parse_names(layer_names, layers.shape[0])
        stack = layer_files.make_stack(layers[..., :3].float().cpu().numpy(), alphas.float().cpu().numpy(), names)
        if format == "png":
            paths = layer_files.output_paths(bridge.output_dir(), filename_prefix,
                                             [f"{i + 1:02}.png" for i in range(stack.count)])
            written = layer_files.write_pngs(stack, paths)
            images = [bridge.saved_file(p, "output") for p in written]
        else:
            writer = {"psd": layer_files.write_psd, "pptx": layer_files.write_pptx, "zip": layer_files.write_zip}
            if format not in writer:
                raise InputError(f"format one of {', '.join(layer_files.FORMATS)}", repr(format),
                                             "Pick one of the listed values.")
            (path,) = layer_files.output_paths(bridge.output_dir(), filename_prefix, [f".{format}"])
            written = [writer[format](stack, path)]
            previews = layer_files.output_paths(bridge.temp_dir(), "atelier_layer_preview",
                                                [f"{i + 1:02}.png" for i in range(stack.count)])
            images = [bridge.saved_file(p, "temp") for p in layer_files.write_pngs(stack, previews)]
        files = [bridge.saved_file(p, "output") for p in written]
        rel = [f"{f['subfolder']}/{f['filename']}" if f["subfolder"] else f["filename"] for f in files]
        text = (f"{stack.count} layers ({stack.width}×{stack.height}) → output/" + "\noutput/".join(rel)
                + "".join(f"\n{n}" for n in notes))
        log.info("Atelier: exported %d layers to %s", stack.count, ", ".join(rel))
        return io.NodeOutput(ui={"images": images, "text": [text], "atelier_files": files})


class AtelierLoadLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierLoadLayers",
            display_name="Load Layers",
            category=CATEGORY,
            description="Read the layers of a PSD (any editor's; groups flattened) or of a ZIP written by Export "
                        "Layers from ComfyUI's input folder.",
            inputs=[
                io.String.Input("file", default="layers.psd",
                                tooltip="A .psd or .zip in ComfyUI's input folder (subfolders allowed, e.g. "
                                        "'sets/poster.psd'). The error lists the files there."),
            ],
            outputs=[io.Image.Output(display_name="layers"), io.Mask.Output(display_name="alphas"),
                     io.String.Output(display_name="names")],
        )

    @classmethod
    def fingerprint_inputs(cls, file) -> str:
        try:
            size, mtime = file_stamp(layer_files.find_in_folder(bridge.input_dir(), file))
            return f"{file}:{size}:{mtime}"
        except Exception:  # noqa: BLE001 - execute reports the problem
            return f"{file}:missing"

    @classmethod
    def execute(cls, file) -> io.NodeOutput:
        stack = layer_files.read_layers(layer_files.find_in_folder(bridge.input_dir(), file))
        for note in stack.notes:
            log.info("Atelier: %s", note)
        rgb, alpha = _stack_out(stack)
        return io.NodeOutput(rgb, alpha, ", ".join(stack.names), ui=gallery(stack))


class AtelierCombineLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierCombineLayers",
            display_name="Combine Layers",
            category=CATEGORY,
            description="Flatten a chosen subset of layers in a chosen order into one picture (IMAGE) and its "
                        "opacity (MASK).",
            inputs=[
                io.Image.Input("layers", tooltip="Layer colours, bottom layer first."),
                io.Mask.Input("alphas", tooltip="Layer opacity, 1 = opaque: one per layer (or one for all)."),
                io.String.Input("order", default="",
                                tooltip="Layers to use, bottom first, numbered from 1: '3,1,2' puts layer 3 at the "
                                        "bottom and 2 on top; '1-3' is a range; layers not listed are hidden. "
                                        "Empty = all, in order."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, layers, alphas, order) -> io.NodeOutput:
        alphas = layered.match_alphas(layers, alphas)
        image, mask = layered.flatten(layers[..., :3].float().cpu(), alphas.float().cpu(),
                                     layered.parse_order(order, layers.shape[0]))
        return io.NodeOutput(bridge.images_out(image), mask)


NODES = [AtelierLayeredLoader, AtelierSplitLayers, AtelierExportLayers, AtelierLoadLayers, AtelierCombineLayers]
