"""Depth node: Depth Anything V2 / DPT (transformers folders in models/depth) → a depth IMAGE for depth
ControlNets (try-on)."""

from __future__ import annotations

from comfy_api.latest import io

from ..atelier import depth
from . import _bridge as bridge


class AtelierDepth(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierDepth",
            display_name="Depth (Depth Anything / DPT)",
            category="atelier/tryon",
            description="Relative depth of each picture (near = bright), the way transformers' depth-estimation "
                        "pipeline computes it, at the picture's size: the control image of a depth ControlNet.",
            inputs=[
                io.Image.Input("image", tooltip="The pictures (a batch gives one depth map each)."),
                io.Combo.Input("model", options=bridge.depth_choices(),
                               tooltip="A transformers depth folder in models/depth (config.json, "
                                       "model.safetensors, preprocessor_config.json), e.g. "
                                       "Depth-Anything-V2-Small-hf or dpt-hybrid-midas. No remote code."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=14,
                             tooltip="The side the model sees; 0 = the model's own (518 for Depth Anything). "
                                     "Depth Anything rounds it to a multiple of 14."),
            ],
            outputs=[io.Image.Output(display_name="depth")],
        )

    @classmethod
    def execute(cls, image, model, resolution) -> io.NodeOutput:
        path = bridge.depth_folder(model)
        spec = depth.DepthSpec(path=path, device=bridge.device(), stamp=depth.folder_stamp(path))
        with bridge.comfy_progress(image.shape[0]) as progress:
            handle = depth.make_handle(spec, bridge.free_vram())
            loaded = bridge.acquire(depth.STAGE, handle)
            out = depth.estimate(loaded, image, resolution=resolution, progress=progress)
        return io.NodeOutput(bridge.images_out(out))


NODES = [AtelierDepth]
