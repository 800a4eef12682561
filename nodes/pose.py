"""Pose nodes on BlazePose's real weights (LiteRT): OpenPose skeleton maps for ControlNets (AtelierPose) and
try-on garment masks (AtelierGarmentMask). Importing the engine imports ``ai_edge_litert``: without the package the
pack leaves these two nodes out with one log line."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..atelier import garment as garments
from ..atelier import pose  # imports ai_edge_litert at the top: a missing package surfaces here
from . import _bridge as bridge
from ._bridge import SAM2

_MODEL_TIP = ("BlazePose's landmark model in models/pose (pose_landmark_full.tflite), with pose_detection.tflite "
              "beside it (and selfie_segmentation.tflite for person masks): the files inside PyPI's "
              "mediapipe==0.10.21 wheel; `python install.py --pose-models` extracts them.")


def _model(name: str) -> pose.PoseModel:
    handle = pose.make_handle(bridge.pose_spec(name))
    return bridge.acquire(pose.STAGE, handle)


class AtelierPose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierPose",
            display_name="Pose (BlazePose → OpenPose)",
            category="atelier/animate",
            description="Body pose of the person in each frame with BlazePose (real MediaPipe weights, run by "
                        "LiteRT on the CPU), drawn as the OpenPose skeleton maps OpenPose ControlNets expect, and "
                        "the COCO-18 keypoints as OpenPose JSON. A frame without a person gives a black map.",
            inputs=[
                io.Image.Input("image", tooltip="Frames (an IMAGE batch from video nodes) or a single picture."),
                io.Combo.Input("model", options=bridge.pose_choices(), tooltip=_MODEL_TIP),
                io.Float.Input("min_confidence", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Keypoints whose visibility is below this are left out (not drawn, 0 in "
                                       "the JSON)."),
                io.String.Input("keypoints_in", multiline=True, default="", optional=True,
                                tooltip="OpenPose JSON (one object per frame, pose_keypoints_2d in pixels of "
                                        "canvas_width × canvas_height) to draw instead of detecting: poses made "
                                        "elsewhere. One map per JSON frame, at the size of `image`."),
            ],
            outputs=[io.Image.Output(display_name="pose_image"), io.String.Output(display_name="keypoints")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return bridge.model_fingerprint("pose", kwargs.get("model"))

    @classmethod
    def execute(cls, image, model, min_confidence, keypoints_in="") -> io.NodeOutput:
        drawing = bool(keypoints_in and keypoints_in.strip())
        with bridge.comfy_progress(image.shape[0]) as progress:
            loaded = None if drawing else _model(model)
            maps, text, notes = pose.pose_maps(loaded, image, min_confidence, keypoints_in, progress=progress)
        summary = f"{maps.shape[0]} pose map(s)" + "".join(f"\n{n}" for n in notes)
        return io.NodeOutput(bridge.images_out(maps), text, ui=ui.PreviewText(summary))


class AtelierGarmentMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierGarmentMask",
            display_name="Garment Mask (Try-On)",
            category="atelier/tryon",
            description="The area a new garment may take on the person, from BlazePose's skeleton and a person "
                        "mask: no DensePose or human-parsing model. Outputs the mask (1 = repaint), the keypoints "
                        "(OpenPose JSON, plus BlazePose's 33 points) and a preview.",
            inputs=[
                io.Image.Input("image", tooltip="The person (a batch gives one mask per picture)."),
                io.Combo.Input("garment", options=list(garments.GARMENTS), default="upper_body",
                               tooltip="upper_body: torso and sleeves; lower_body: hips and legs; dress: torso, "
                                       "sleeves and a skirt to the knees; full_body: upper and lower body."),
                io.Float.Input("expand", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Relaxes the silhouette so longer and looser garments fit: wider sleeves "
                                       "and legs, lower hems, a higher collar, more room around the body. The mask "
                                       "only grows as this grows."),
                io.Boolean.Input("protect_face", default=True, tooltip="Never repaint the face."),
                io.Boolean.Input("protect_hands", default=True, tooltip="Never repaint the hands."),
                io.Mask.Input("person_mask", optional=True,
                              tooltip="The person's silhouette (1 = person); without it the selfie segmenter "
                                      "(selfie_segmentation.tflite in models/pose) computes it."),
                SAM2.Input("sam2", optional=True,
                           tooltip="From SAM2 Loader: refines the region with SAM2 prompted from the pose points "
                                   "(garment points positive, the face negative)."),
                io.Combo.Input("model", options=bridge.pose_choices(), tooltip=_MODEL_TIP),
            ],
            outputs=[io.Mask.Output(display_name="mask"), io.String.Output(display_name="pose"),
                     io.Image.Output(display_name="preview")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return bridge.model_fingerprint("pose", kwargs.get("model"))

    @classmethod
    def execute(cls, image, garment, expand, protect_face, protect_hands, model, person_mask=None,
                sam2=None) -> io.NodeOutput:
        refine = None
        if sam2 is not None:
            from ..atelier import segmenter

            sam = bridge.acquire(segmenter.STAGE, sam2)

            def refine(i, positive, negative):
                prompts = segmenter.Prompts(points=tuple(positive), negative_points=tuple(negative))
                return segmenter.segment(sam, image[i:i + 1], prompts)[0].numpy() > 0.5

        with bridge.comfy_progress(image.shape[0]) as progress:
            loaded = _model(model)
            mask, text, preview = pose.garment_masks(loaded, image, garment, expand, protect_face, protect_hands,
                                                     person_mask=person_mask, refine=refine, progress=progress)
        return io.NodeOutput(mask, text, bridge.images_out(preview))


NODES = [AtelierPose, AtelierGarmentMask]
