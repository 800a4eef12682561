"""SAM2 nodes: load a SAM 2 / 2.1 checkpoint (its size and version read off the weights) and segment objects from
points and boxes. Needs Meta's ``sam2`` package: importing the engine fails with ModuleNotFoundError('sam2')
without it, and the pack then leaves these two nodes out."""

from __future__ import annotations

import json

import numpy as np
from comfy_api.latest import io, ui

from ..atelier import segmenter  # imports sam2 at the top: a missing package surfaces here
from ..atelier.images import check_image, to_uint8
from ..atelier.types import DTYPES
from ..atelier.weights import file_stamp
from . import _bridge as bridge
from ._bridge import SAM2


# one colour per object in the editor's mask overlay (the node's UI output); alpha 0 outside every mask
OVERLAY_COLORS = np.array([(255, 64, 64), (64, 160, 255), (255, 200, 0), (160, 80, 255), (0, 200, 120),
                           (255, 120, 200)], dtype=np.uint8)
OVERLAY_ALPHA = 110


def editor_preview(image, masks, n_objects: int, prompts: tuple) -> dict:
    """What the point/box editor (web/js/atelier_sam2_editor.js) shows after a run: image 0 as the node received
    it and its objects' masks as one coloured overlay (object k in OVERLAY_COLORS[k]), the image's size in pixels
    (the previews may be scaled down; prompts are in the full size) and the prompt texts this run used (the editor
    dims the masks once the widgets differ)."""
    height, width = int(image.shape[1]), int(image.shape[2])
    objects = masks[:n_objects].float().cpu().numpy() > 0.5
    overlay = np.zeros((height, width, 4), dtype=np.uint8)
    for k, m in enumerate(objects):
        overlay[m, :3] = OVERLAY_COLORS[k % len(OVERLAY_COLORS)]
        overlay[m, 3] = OVERLAY_ALPHA
    rgb = to_uint8(image[0, ..., :3])
    picture, shade = bridge.ui_pngs([rgb, overlay], "atelier_sam2/editor")
    texts = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
    return {"atelier_sam2": [{"image": picture, "overlay": shade, "width": width, "height": height,
                              "objects": n_objects, "prompts": texts}]}


class AtelierSAM2Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSAM2Loader",
            display_name="SAM2 Loader",
            category="atelier/mask",
            description="Load a SAM 2 or SAM 2.1 checkpoint (tiny, small, base+ or large) from models/sam2; which "
                        "one it is, is read from the weights. Loaded models obey ComfyUI's Unload button.",
            inputs=[
                io.Combo.Input("model", options=bridge.sam2_choices(),
                               tooltip="A .pt (Meta's official files, read with weights_only=True) or .safetensors "
                                       "checkpoint in models/sam2: SAM 2.0 or 2.1, tiny to large."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU. On "
                                       "the CPU bf16/fp16 keep fp32 weights and compute under autocast."),
            ],
            outputs=[SAM2.Output(display_name="sam2")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return bridge.model_fingerprint("sam2", kwargs.get("model"))

    @classmethod
    def execute(cls, model, dtype) -> io.NodeOutput:
        path = bridge.sam2_path(model)
        spec = segmenter.SAM2Spec(path=path, dtype=dtype, device=bridge.device(), stamp=file_stamp(path))
        handle, text = bridge.load_stage(segmenter.STAGE, spec)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class AtelierSAM2Segment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSAM2Segment",
            display_name="SAM2 Segment",
            category="atelier/mask",
            description="Masks of the objects you point at: each box is one object (with the points added to it); "
                        "without boxes, all points together are one object. One mask per object; for an image "
                        "batch, the masks of image 0 (object 0, 1, ...), then of image 1, and so on.",
            inputs=[
                SAM2.Input("sam2", tooltip="From SAM2 Loader."),
                io.Image.Input("image", tooltip="The picture to segment; a batch is segmented image by image with "
                                                "the same prompts."),
                io.String.Input("points", default="", placeholder='[{"x": 120, "y": 80}]',
                                tooltip='Points on the object, JSON in pixels: [{"x": 120, "y": 80}, ...] (the '
                                        "format of KJNodes' Points Editor and ComfyUI's SAM3 nodes) or "
                                        "[[120, 80], ...]. Empty = none."),
                io.String.Input("negative_points", default="", placeholder='[{"x": 10, "y": 10}]',
                                tooltip="Points that are NOT the object, same format. They refine every object."),
                io.String.Input("boxes", default="", placeholder="[[x0, y0, x1, y1]]",
                                tooltip="Boxes around objects, JSON in pixels: [[x0, y0, x1, y1], ...] (top-left, "
                                        "bottom-right). One object per box. Empty = none."),
                io.Boolean.Input("multimask", default=False,
                                 tooltip="Let SAM propose three masks per object and keep the best-scoring one "
                                         "(helps with a single, ambiguous click)."),
            ],
            outputs=[io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def execute(cls, sam2, image, points, negative_points, boxes, multimask) -> io.NodeOutput:
        # prompts are checked before any model work, so a typo fails at once
        prompts = segmenter.parse_prompts(points, negative_points, boxes)
        image = check_image(image)
        segmenter.check_inside(prompts, image.shape[2], image.shape[1])
        with bridge.comfy_progress(image.shape[0] * prompts.n_objects) as progress:
            model = bridge.acquire(segmenter.STAGE, sam2)
            masks = segmenter.segment(model, image, prompts, multimask=multimask, progress=progress)
        return io.NodeOutput(masks, ui=editor_preview(image, masks, prompts.n_objects,
                                                           (points, negative_points, boxes)))


NODES = [AtelierSAM2Loader, AtelierSAM2Segment]
