"""Placement node: paste the extracted object into the background and make FLUX Fill's mask."""

from __future__ import annotations

from comfy_api.latest import io

from ..atelier import placement


class AtelierPlacementMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierPlacementMask",
            display_name="Placement Mask",
            category="atelier/compose",
            description="Paste an object (with its mask) into a background at x / y / scale and make the mask FLUX "
                        "Fill regenerates so it blends in: a band around it and a contact shadow (harmonize), or "
                        "the whole object (regenerate).",
            inputs=[
                io.Image.Input("background", tooltip="The scene."),
                io.Image.Input("object", tooltip="The object's picture (e.g. Remove Background's image)."),
                io.Mask.Input("object_mask", tooltip="The object's alpha, same size as the object picture."),
                io.Float.Input("x", default=0.5, min=-1.0, max=1.0, step=0.01,
                               tooltip="Object centre, 0 = left edge, 1 = right edge. -1 = auto: the analysis' "
                                       "suggested region (centre when there is none)."),
                io.Float.Input("y", default=0.8, min=-1.0, max=1.0, step=0.01,
                               tooltip="0 = top, 1 = bottom: the object's centre (anchor center) or the line it "
                                       "stands on (anchor bottom). -1 = auto from the analysis."),
                io.Float.Input("scale", default=0.4, min=0.01, max=4.0, step=0.01,
                               tooltip="Object height / background height."),
                io.Combo.Input("anchor", options=list(placement.ANCHORS), default="bottom",
                               tooltip="bottom keeps ground contact at y; center puts the object's centre there."),
                io.Combo.Input("mode", options=list(placement.MODES), default="harmonize",
                               tooltip="harmonize: regenerate a band around the object (and a shadow under it), "
                                       "keep its pixels; regenerate: redraw the whole object region."),
                io.Int.Input("band", default=16, min=0, max=512, tooltip="Width of the regenerated band, px."),
                io.Int.Input("feather", default=8, min=0, max=256,
                             tooltip="Soften the inpaint mask's outer edge, px."),
                io.Boolean.Input("shadow", default=True,
                                 tooltip="Also regenerate an ellipse under the object where its shadow falls."),
                io.String.Input("analysis", optional=True, force_input=True,
                                tooltip="Optional: the caption node's analysis JSON; x / y at -1 then use its "
                                        "suggested placement region."),
            ],
            outputs=[io.Image.Output(display_name="composite"), io.Mask.Output(display_name="inpaint_mask"),
                     io.Mask.Output(display_name="object_mask")],
        )

    @classmethod
    def execute(cls, background, object, object_mask, x, y, scale, anchor, mode, band, feather, shadow,
                analysis=None) -> io.NodeOutput:
        composite, inpaint, placed = placement.place(
            background, object, object_mask, x=x, y=y, scale=scale, anchor=anchor, mode=mode, band=band,
            feather=feather, shadow=shadow, analysis=analysis)
        return io.NodeOutput(composite, inpaint, placed)


NODES = [AtelierPlacementMask]
