"""BlazePose (MediaPipe Pose, full model) on its real ``.tflite`` weights, run with ``ai-edge-litert``.

The three files ship inside the PyPI wheel ``mediapipe==0.10.21`` under ``mediapipe/modules/``:
``pose_detection/pose_detection.tflite`` (the person detector), ``pose_landmark/pose_landmark_full.tflite`` (33
landmarks) and ``selfie_segmentation/selfie_segmentation.tflite`` (the person mask). The mediapipe package itself is
not used (it pins numpy < 2): this module implements its CPU graph for still images (``static_image_mode``):

1. **detector** on the whole picture letterboxed to 224² (values in [-1, 1], black bars): 2254 SSD anchors
   (5 layers, strides 8-16-32-32-32, scales 0.1484375…0.75, fixed size 1), boxes and 4 keypoints decoded against
   them (scale 224), sigmoid scores clipped at ±100, threshold 0.5, weighted non-maximum suppression (IoU 0.3);
2. **region of interest** from the best detection: centre = keypoint 0 (mid-hip), size = twice its distance to
   keypoint 1, rotated so that keypoint 1 points up (target angle 90°), made square on the long side, × 1.25;
3. **landmark model** on that rotated square cropped to 256² (values in [0, 1], edge pixels repeated): 39 × (x, y,
   z, visibility, presence) in crop pixels, sigmoid on visibility and presence, positions refined on the 64² heat
   map (7×7 window, where its peak confidence ≥ 0.5), a pose-presence flag (< 0.5 = nobody), then projected back to
   the picture through the rotation;
4. **person mask**: the selfie segmenter on the picture resized to 256² ([0, 1]), its probability map resized back.

Landmarks are returned in pixels: ``[33, 5]`` = x, y, z (pixels, relative to the hips' depth), visibility,
presence. Importing this module imports ``ai_edge_litert``: without it the import fails with
``ModuleNotFoundError`` naming the pip package, and the pack leaves only the pose nodes out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, ModelFileError
from .images import check_image
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

try:
    from ai_edge_litert.interpreter import Interpreter
except ModuleNotFoundError as e:  # the pip name differs from the module name
    raise ModuleNotFoundError("the pose nodes need 'ai-edge-litert' (pip install ai-edge-litert)",
                              name="ai-edge-litert") from e

log = logging.getLogger("atelier")

GROUP = "pose"
EXTENSIONS = (".tflite",)
DETECTOR_NAME = "pose_detection.tflite"
LANDMARK_NAME = "pose_landmark_full.tflite"
SEGMENTER_NAME = "selfie_segmentation.tflite"
WHEEL = "mediapipe==0.10.21"
_GET_IT = (f"Put pose_detection.tflite, pose_landmark_full.tflite and selfie_segmentation.tflite in models/pose: "
           f"they ship inside the PyPI wheel {WHEEL} under mediapipe/modules/ (python install.py --pose-models "
           "extracts them).")

# (role, input shape, output shapes) of the files this module reads; anything else is another model
_SIGNATURES = {
    "detector": ((1, 224, 224, 3), ((1, 2254, 12), (1, 2254, 1))),
    "landmark": ((1, 256, 256, 3), ((1, 195), (1, 1), (1, 256, 256, 1), (1, 64, 64, 39), (1, 117))),
    "segmenter": ((1, 256, 256, 3), ((1, 256, 256, 1),)),
}
_WHAT = {"detector": "BlazePose's person detector (pose_detection.tflite)",
         "landmark": "BlazePose's full landmark model (pose_landmark_full.tflite)",
         "segmenter": "MediaPipe's selfie segmenter (selfie_segmentation.tflite)"}

# --------------------------------------------------------------------------------------- detector constants

DET_SIZE = 224
DET_SCORE = 0.5
DET_NMS_IOU = 0.3
DET_CLIP = 100.0
LM_SIZE = 256
HEATMAP_KERNEL = 7
HEATMAP_MIN_CONFIDENCE = 0.5
PRESENCE_MIN = 0.5
ROI_SCALE = 1.25
N_LANDMARKS = 33


def ssd_anchors() -> np.ndarray:
    """The detector's 2254 anchor centres ``[N, 2]`` (x, y in [0, 1]); fixed anchor size 1 (MediaPipe's
    SsdAnchorsCalculator with num_layers 5, strides 8, 16, 32, 32, 32, aspect ratio 1, interpolated scale 1)."""
    strides = (8, 16, 32, 32, 32)
    n_layers = len(strides)
    out = []
    layer = 0
    while layer < n_layers:
        per_cell = 0
        last = layer
        while last < n_layers and strides[last] == strides[layer]:
            per_cell += 2  # aspect ratio 1.0 plus the interpolated scale
            last += 1
        side = math.ceil(DET_SIZE / strides[layer])
        for y in range(side):
            for x in range(side):
                out.extend([((x + 0.5) / side, (y + 0.5) / side)] * per_cell)
        layer = last
    return np.asarray(out, dtype=np.float64)


_ANCHORS = ssd_anchors()


def decode_detections(boxes: np.ndarray, scores: np.ndarray, min_score: float = DET_SCORE) -> list[dict]:
    """Raw detector outputs ``[2254, 12]``, ``[2254]`` → detections (normalised to the 224² input): ``box`` (xmin,
    ymin, xmax, ymax), ``keypoints`` [4, 2], ``score``; best first, after weighted non-maximum suppression."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(scores.astype(np.float64), -DET_CLIP, DET_CLIP)))
    keep = np.nonzero(scores >= min_score)[0]
    if keep.size == 0:
        return []
    raw = boxes[keep].astype(np.float64) / DET_SIZE
    anchors = _ANCHORS[keep]
    cx = raw[:, 0] + anchors[:, 0]
    cy = raw[:, 1] + anchors[:, 1]
    w, h = raw[:, 2], raw[:, 3]
    rects = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    kps = raw[:, 4:12].reshape(-1, 4, 2) + anchors[:, None, :]
    return weighted_nms(rects, kps, scores[keep])


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(rects: np.ndarray, kps: np.ndarray, scores: np.ndarray, iou: float = DET_NMS_IOU) -> list[dict]:
    """MediaPipe's weighted NMS: each kept detection is the score-weighted mean of the boxes and keypoints that
    overlap the best remaining one by more than ``iou``; it keeps the best one's score."""
    order = np.argsort(-scores, kind="stable")
    remaining = list(order)
    out = []
    while remaining:
        best = remaining[0]
        idx = np.asarray(remaining)
        overlap = _iou(rects[best], rects[idx])
        group = idx[overlap > iou]
        if group.size == 0:
            group = np.asarray([best])
        wts = scores[group][:, None]
        box = (rects[group] * wts).sum(0) / wts.sum()
        kp = (kps[group] * wts[:, :, None]).sum(0) / wts.sum()
        out.append({"box": box, "keypoints": kp, "score": float(scores[best])})
        remaining = [i for i in remaining if i not in set(group.tolist())]
    return out


@dataclass(frozen=True)
class Roi:
    """A rotated square in picture pixels: centre, side, rotation (radians, counter-clockwise positive in MediaPipe's
    y-down convention)."""

    cx: float
    cy: float
    size: float
    rotation: float


def roi_from_keypoints(center: tuple[float, float], scale_point: tuple[float, float]) -> Roi:
    """MediaPipe's AlignmentPointsRectsCalculator (target angle 90°) + RectTransformation (square long, × 1.25),
    in pixels."""
    (x0, y0), (x1, y1) = center, scale_point
    side = 2.0 * math.hypot(x1 - x0, y1 - y0)
    rotation = math.pi / 2 - math.atan2(-(y1 - y0), x1 - x0)
    rotation = rotation - 2 * math.pi * math.floor((rotation + math.pi) / (2 * math.pi))
    return Roi(cx=x0, cy=y0, size=side * ROI_SCALE, rotation=rotation)


def crop(image: np.ndarray, roi: Roi, out_size: int, border: str) -> np.ndarray:
    """Bilinear sample of the rotated square ``roi`` of ``image`` (HWC float) onto ``out_size``²: output pixel centre
    (u, v) ↦ roi centre + R(rotation) · ((u + 0.5) / out − 0.5, (v + 0.5) / out − 0.5) · side. ``border``: "zero"
    or "replicate"."""
    h, w = image.shape[:2]
    t = (np.arange(out_size, dtype=np.float64) + 0.5) / out_size - 0.5
    dx, dy = np.meshgrid(t * roi.size, t * roi.size)
    c, s = math.cos(roi.rotation), math.sin(roi.rotation)
    px = roi.cx + c * dx - s * dy
    py = roi.cy + s * dx + c * dy
    # grid_sample with align_corners=False: -1 / +1 are the outer edges of the border pixels
    grid = np.stack([2 * px / w - 1, 2 * py / h - 1], axis=-1)[None].astype(np.float32)
    src = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    out = torch.nn.functional.grid_sample(src, torch.from_numpy(grid), mode="bilinear",
                                          padding_mode="zeros" if border == "zero" else "border", align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def refine_from_heatmap(lm: np.ndarray, heatmap: np.ndarray, kernel: int = HEATMAP_KERNEL,
                        min_confidence: float = HEATMAP_MIN_CONFIDENCE) -> np.ndarray:
    """MediaPipe's RefineLandmarksFromHeatmapCalculator: each landmark (x, y in [0, 1] of the crop) moves to the
    confidence-weighted mean of the ``kernel``² heat-map window around it, when the window's peak confidence
    (sigmoid) reaches ``min_confidence``."""
    hh, hw, n = heatmap.shape
    out = lm.copy()
    conf = 1.0 / (1.0 + np.exp(-heatmap.astype(np.float64)))
    off = (kernel - 1) // 2
    for i in range(min(n, lm.shape[0])):
        col, row = int(lm[i, 0] * hw), int(lm[i, 1] * hh)
        if col < 0 or col >= hw or row < 0 or row >= hh:
            continue
        r0, r1 = max(0, row - off), min(hh, row + off + 1)
        c0, c1 = max(0, col - off), min(hw, col + off + 1)
        win = conf[r0:r1, c0:c1, i]
        total = win.sum()
        if win.max() >= min_confidence and total > 0:
            rows, cols = np.mgrid[r0:r1, c0:c1]
            out[i, 0] = (cols * win).sum() / hw / total
            out[i, 1] = (rows * win).sum() / hh / total
    return out


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# ------------------------------------------------------------------------------------------- spec / handle


@dataclass(frozen=True)
class PoseSpec:
    """The chosen files (the landmark model and, found beside it, the detector and the person segmenter);
    ``stamps`` (size, mtime of each) make a file replaced under the same name another spec."""

    landmark: str
    detector: str
    segmenter: str | None = None
    stamps: tuple = ()


@dataclass(frozen=True)
class PoseHandle:
    """ATELIER pose handle: the spec and the files' sizes (what runs on the CPU)."""

    spec: PoseSpec
    file_bytes: int


def file_stamp(path: str | os.PathLike | None) -> tuple[int, int]:
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    return (st.st_size, st.st_mtime_ns) if st else (0, 0)


def find_beside(landmark: str | os.PathLike, name: str, roots: list[str] | tuple[str, ...] = ()) -> str | None:
    """A companion file: ``name`` in the landmark file's folder, else in one of ``roots`` (e.g. every models/pose)."""
    for folder in [Path(landmark).parent, *map(Path, roots)]:
        p = folder / name
        if p.is_file():
            return str(p)
    return None


def make_spec(landmark: str, detector: str | None = None, segmenter: str | None = None,
              roots: list[str] | tuple[str, ...] = ()) -> PoseSpec:
    """A spec from the landmark file; the detector and segmenter default to the standard names beside it."""
    detector = detector or find_beside(landmark, DETECTOR_NAME, roots)
    if detector is None:
        raise ModelFileError(f"{_WHAT['detector']} beside '{Path(landmark).name}' (in {Path(landmark).parent})",
                             "no such file", _GET_IT)
    segmenter = segmenter or find_beside(landmark, SEGMENTER_NAME, roots)
    return PoseSpec(landmark=str(landmark), detector=str(detector), segmenter=segmenter and str(segmenter),
                    stamps=(file_stamp(landmark), file_stamp(detector), file_stamp(segmenter)))


def _check_file(path: str | None, role: str) -> int:
    if path is None or not os.path.isfile(path):
        raise ModelFileError(_WHAT[role], f"no file at '{path}'", _GET_IT)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ModelFileError(f"{_WHAT[role]}: a TensorFlow Lite flatbuffer (bytes 4-7 'TFL3')",
                             f"'{Path(path).name}' ({os.path.getsize(path)} bytes, starting {head[:8]!r})",
                             "The file is damaged or not a .tflite model; " + _GET_IT)
    return os.path.getsize(path)


def make_handle(spec: PoseSpec, free_vram: int | None = None) -> PoseHandle:
    """Check that the files are TFLite models (header only); loads nothing."""
    n = _check_file(spec.landmark, "landmark") + _check_file(spec.detector, "detector")
    if spec.segmenter is not None:
        n += _check_file(spec.segmenter, "segmenter")
    return PoseHandle(spec=spec, file_bytes=n)


def need_bytes(handle: PoseHandle, free_vram: int | None = None) -> int:
    return 0  # LiteRT runs on the CPU


# ---------------------------------------------------------------------------------------------- the model


def _interpreter(path: str, role: str) -> Any:
    name = f"'{Path(path).name}'"
    try:
        it = Interpreter(model_path=path, num_threads=max(1, min(4, os.cpu_count() or 1)))
        it.allocate_tensors()
    except Exception as e:  # noqa: BLE001 - any failure to read the flatbuffer is a file problem
        raise ModelFileError(f"{_WHAT[role]} that LiteRT can load", f"{name} that failed "
                             f"({type(e).__name__}: {str(e).strip()[:200]})",
                             "The file is damaged or another model; " + _GET_IT) from e
    want_in, want_out = _SIGNATURES[role]
    got_in = tuple(tuple(int(v) for v in d["shape"]) for d in it.get_input_details())
    got_out = tuple(tuple(int(v) for v in d["shape"]) for d in it.get_output_details())
    if got_in != (want_in,) or tuple(sorted(got_out)) != tuple(sorted(want_out)):
        raise ModelFileError(f"{_WHAT[role]}: input {list(want_in)}, outputs {[list(s) for s in want_out]}",
                             f"{name} with input {[list(s) for s in got_in]}, outputs {[list(s) for s in got_out]}",
                             "Pick the right file for this role; " + _GET_IT)
    return it


def _run(it: Any, x: np.ndarray) -> dict[tuple, np.ndarray]:
    it.set_tensor(it.get_input_details()[0]["index"], x[None].astype(np.float32))
    it.invoke()
    return {tuple(int(v) for v in d["shape"]): it.get_tensor(d["index"]).copy() for d in it.get_output_details()}


@dataclass
class Person:
    """One detected person: 33 landmarks ``[33, 5]`` (x px, y px, z px, visibility, presence), the detector's
    score, the pose-presence flag and the region the landmark model saw."""

    landmarks: np.ndarray
    score: float
    presence: float
    roi: Roi


@dataclass
class PoseModel:
    """The three LiteRT interpreters (registry entry: resident_bytes, device, notes, close())."""

    handle: PoseHandle
    detector: Any
    landmark: Any
    segmenter: Any | None
    notes: list[str] = field(default_factory=list)
    lock: Any = field(default_factory=threading.Lock, repr=False)
    device: str = "cpu"

    @property
    def resident_bytes(self) -> int:
        return 0 if self.landmark is None else self.handle.file_bytes

    def close(self) -> None:
        self.detector = self.landmark = self.segmenter = None

    def _check(self) -> None:
        if self.landmark is None:
            raise released("BlazePose model")


def load(handle: PoseHandle) -> PoseModel:
    spec = handle.spec
    log.info("Atelier: loading BlazePose from %s", Path(spec.landmark).parent)
    det = _interpreter(spec.detector, "detector")
    lm = _interpreter(spec.landmark, "landmark")
    seg = _interpreter(spec.segmenter, "segmenter") if spec.segmenter else None
    notes = [] if seg else [f"no {SEGMENTER_NAME} beside the landmark model: person masks need it "
                            "(or a person_mask input)"]
    return PoseModel(handle=handle, detector=det, landmark=lm, segmenter=seg, notes=notes)


def summary(handle: PoseHandle, model: PoseModel | None = None) -> str:
    spec = handle.spec
    parts = [Path(spec.landmark).name, Path(spec.detector).name] + ([Path(spec.segmenter).name] if spec.segmenter
                                                                    else [])
    return with_notes(f"BlazePose ({', '.join(parts)}), LiteRT on the CPU", model)


STAGE = Stage(group=GROUP, make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)


# ------------------------------------------------------------------------------------------------ running


def detect_people(model: PoseModel, rgb: np.ndarray) -> list[dict]:
    """The detector on one picture (HWC float [0, 1]) → detections with ``keypoints`` [4, 2] in picture pixels."""
    h, w = rgb.shape[:2]
    side = float(max(w, h))
    box = Roi(cx=w / 2, cy=h / 2, size=side, rotation=0.0)
    x = crop(rgb, box, DET_SIZE, border="zero") * 2.0 - 1.0
    with model.lock:
        out = _run(model.detector, x)
    dets = decode_detections(out[(1, 2254, 12)][0], out[(1, 2254, 1)][0, :, 0])
    for d in dets:  # letterbox square → picture pixels
        d["keypoints"] = d["keypoints"] * side + np.array([w / 2 - side / 2, h / 2 - side / 2])
        d["box"] = d["box"] * side + np.array([w / 2 - side / 2, h / 2 - side / 2] * 2)
    return dets


def landmarks_in_roi(model: PoseModel, rgb: np.ndarray, roi: Roi) -> tuple[np.ndarray, float]:
    """The landmark model on ``roi`` → (``[33, 5]`` in picture pixels, pose-presence flag)."""
    x = crop(rgb, roi, LM_SIZE, border="replicate")
    with model.lock:
        out = _run(model.landmark, x)
    raw = out[(1, 195)][0].reshape(39, 5).astype(np.float64)
    flag = float(out[(1, 1)][0, 0])
    lm = np.empty((39, 5))
    lm[:, 0:3] = raw[:, 0:3] / LM_SIZE
    lm[:, 3] = _sigmoid(raw[:, 3])
    lm[:, 4] = _sigmoid(raw[:, 4])
    lm = refine_from_heatmap(lm, out[(1, 64, 64, 39)][0])
    dx, dy = lm[:, 0] - 0.5, lm[:, 1] - 0.5
    c, s = math.cos(roi.rotation), math.sin(roi.rotation)
    pts = np.empty((N_LANDMARKS, 5))
    pts[:, 0] = roi.cx + (c * dx - s * dy)[:N_LANDMARKS] * roi.size
    pts[:, 1] = roi.cy + (s * dx + c * dy)[:N_LANDMARKS] * roi.size
    pts[:, 2] = lm[:N_LANDMARKS, 2] * roi.size
    pts[:, 3:5] = lm[:N_LANDMARKS, 3:5]
    return pts, flag


def estimate(model: PoseModel, rgb: np.ndarray) -> Person | None:
    """BlazePose on one picture (HWC float in [0, 1]): the most confident person, or None when there is nobody."""
    model._check()
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.float32)
    dets = detect_people(model, rgb)
    if not dets:
        return None
    det = dets[0]
    kp = det["keypoints"]
    roi = roi_from_keypoints(tuple(kp[0]), tuple(kp[1]))
    pts, flag = landmarks_in_roi(model, rgb, roi)
    if flag < PRESENCE_MIN:
        log.debug("Atelier: BlazePose: detection %.2f but pose flag %.2f: nobody", det["score"], flag)
        return None
    return Person(landmarks=pts, score=det["score"], presence=flag, roi=roi)


def segment_person(model: PoseModel, rgb: np.ndarray) -> np.ndarray:
    """The selfie segmenter's person probability ``[H, W]`` in [0, 1] for one picture (HWC float [0, 1])."""
    model._check()
    if model.segmenter is None:
        raise ModelFileError(f"{_WHAT['segmenter']} beside '{Path(model.handle.spec.landmark).name}'",
                             "no such file", "Connect a person_mask, or " + _GET_IT)
    h, w = rgb.shape[:2]
    src = torch.from_numpy(np.ascontiguousarray(rgb[..., :3], dtype=np.float32)).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(src, size=(LM_SIZE, LM_SIZE), mode="bilinear", align_corners=False,
                                        antialias=True)[0].permute(1, 2, 0).numpy()
    with model.lock:
        out = _run(model.segmenter, x)[(1, 256, 256, 1)]
    prob = torch.from_numpy(out[0, :, :, 0].astype(np.float32))[None, None]
    back = torch.nn.functional.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
    return back[0, 0].clamp(0.0, 1.0).numpy()


def estimate_batch(model: PoseModel, image: torch.Tensor, progress: Progress | None = None) -> list[Person | None]:
    """:func:`estimate` on every picture of an IMAGE batch; one progress step per picture."""
    progress = progress or NullProgress()
    image = check_image(image)
    out = []
    for i in range(image.shape[0]):
        out.append(estimate(model, image[i].detach().clamp(0, 1).cpu().numpy()))
        progress.step(1)
    return out


def no_person_error(index: int | None = None) -> InputError:
    where = "the picture" if index is None else f"picture {index}"
    return InputError("a picture with a person BlazePose can find (head and shoulders visible, not too small)",
                      f"no person in {where}", "Use a photo of the person wearing the garment's area, facing the "
                      "camera; crop it so the person fills a good part of the picture.")


# ------------------------------------------------------------------------------------------ node-level runs


def _blazepose_extra(person: Person) -> dict:
    return {"atelier_blazepose_33": [[round(float(v), 2) for v in p] for p in person.landmarks[:, [0, 1, 3]]]}


def pose_maps(model: PoseModel | None, image: torch.Tensor, min_confidence: float = 0.5, keypoints_in: str = "",
              progress: Progress | None = None) -> tuple[torch.Tensor, str, list[str]]:
    """OpenPose skeleton maps (IMAGE, the picture's size), COCO-18 keypoints JSON (one frame per picture) and notes.

    With ``keypoints_in`` (OpenPose JSON) the poses are drawn as given (scaled from their canvas to the picture;
    one map per JSON frame) and ``model`` is not used. A frame without a person gives a black map and a note."""
    from . import openpose

    progress = progress or NullProgress()
    image = check_image(image)
    b, h, w, _ = image.shape
    notes: list[str] = []
    frames: list[dict] = []
    maps = []
    if keypoints_in and keypoints_in.strip():
        for i, frame in enumerate(openpose.parse_frames(keypoints_in)):
            people = [np.where((p[:, 2:3] >= min_confidence) & (p[:, 2:3] > 0), p, 0.0)
                      for p in openpose.scale_people(frame, w, h)]
            if not any((p[:, 2] > 0).any() for p in people):
                notes.append(f"frame {i}: no person in keypoints_in")
            maps.append(openpose.render(people, w, h))
            frames.append(openpose.frame_json(people, w, h))
            progress.step(1)
    else:
        if model is None:
            raise InputError("a BlazePose model or keypoints_in", "neither", "Pick the model in models/pose.")
        for i in range(b):
            person = estimate(model, image[i].detach().clamp(0, 1).cpu().numpy())
            people, extra = [], []
            if person is not None:
                coco = openpose.coco18_from_blazepose(person.landmarks[:, [0, 1, 3]], min_confidence, (w, h))
                if (coco[:, 2] > 0).any():
                    people, extra = [coco], [_blazepose_extra(person)]
            if not people:
                notes.append(f"frame {i}: no person found" if person is None else
                             f"frame {i}: no keypoint reached min_confidence {min_confidence:g}")
            maps.append(openpose.render(people, w, h))
            frames.append(openpose.frame_json(people, w, h, extra))
            progress.step(1)
    out = torch.from_numpy(np.stack(maps).astype(np.float32) / 255.0)
    for n in notes:
        log.info("Atelier: pose: %s", n)
    return out, json.dumps(frames), notes


def garment_masks(model: PoseModel, image: torch.Tensor, garment: str, expand: float = 0.0,
                  protect_face: bool = True, protect_hands: bool = True, person_mask: torch.Tensor | None = None,
                  refine: Any = None, progress: Progress | None = None) -> tuple[torch.Tensor, str, torch.Tensor]:
    """Try-on masks for every picture: (MASK, keypoints JSON, preview IMAGE). ``person_mask`` (MASK, 1 = person;
    one for the batch or one per picture) replaces the selfie segmenter; ``refine(i, positive, negative)`` → bool
    mask (e.g. SAM2 from the pose points). A picture without a person is an error."""
    from . import garment as garments
    from . import openpose
    from .images import check_mask, match_mask_to_images

    if garment not in garments.GARMENTS:
        raise InputError(f"garment one of {', '.join(garments.GARMENTS)}", repr(garment), "Pick one in the list.")
    progress = progress or NullProgress()
    image = check_image(image)
    b, h, w, _ = image.shape
    given = None
    if person_mask is not None:
        given = match_mask_to_images(image, check_mask(person_mask, "person_mask"))
        if float(given.max()) <= 0.5:
            raise InputError("a person_mask with the person in it (1 = person)", "an empty mask",
                             "Connect the person's mask, or leave person_mask unconnected to compute it.")
    masks, previews, frames = [], [], []
    for i in range(b):
        rgb = image[i].detach().clamp(0, 1).cpu().numpy()
        person = estimate(model, rgb)
        if person is None:
            raise no_person_error(i if b > 1 else None)
        pm = given[i].cpu().numpy() if given is not None else segment_person(model, rgb)
        one = None if refine is None else (lambda pos, neg, i=i: refine(i, pos, neg))
        region = garments.garment_region(person.landmarks, pm, garment, expand, protect_face, protect_hands, one)
        coco = openpose.coco18_from_blazepose(person.landmarks[:, [0, 1, 3]], 0.5, (w, h))
        masks.append(region.astype(np.float32))
        previews.append(garments.preview(rgb, region, openpose.render([coco], w, h)))
        frames.append(openpose.frame_json([coco], w, h, [_blazepose_extra(person)]))
        progress.step(1)
    return (torch.from_numpy(np.stack(masks)), json.dumps(frames), torch.from_numpy(np.stack(previews)))
