"""OpenPose's COCO-18 body format: conversion from BlazePose's 33 landmarks, the keypoints JSON, and the skeleton
maps OpenPose ControlNets were trained on.

Pure numpy + Pillow (no model, no optional package): the pose node draws poses made elsewhere with it too.

* **COCO-18 order** (OpenPose's body model): 0 nose, 1 neck, 2 right shoulder, 3 right elbow, 4 right wrist,
  5 left shoulder, 6 left elbow, 7 left wrist, 8 right hip, 9 right knee, 10 right ankle, 11 left hip, 12 left knee,
  13 left ankle, 14 right eye, 15 left eye, 16 right ear, 17 left ear. BlazePose has no neck: it is the midpoint of
  the shoulders (confidence: the lower of the two).
* **JSON**: the format OpenPose writes and ComfyUI pose packs exchange (POSE_KEYPOINT): one object per frame,
  ``{"canvas_width": W, "canvas_height": H, "people": [{"pose_keypoints_2d": [x0, y0, c0, x1, y1, c1, ...]}]}``
  with x, y in pixels of the canvas and c the confidence; a missing point is ``0, 0, 0``.
* **Skeleton maps**: the drawing convention of the OpenPose ControlNet annotator (ControlNet 1.1 / controlnet_aux
  ``draw_bodypose``): on black, the 17 limbs as filled ellipses ``stickwidth`` = 4 px wide in the limb's colour,
  the whole canvas then multiplied by 0.6, then every joint as a disc of radius 4 in its full colour.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputError

COCO18_NAMES: tuple[str, ...] = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye",
    "right_ear", "left_ear")

BLAZEPOSE_NAMES: tuple[str, ...] = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
    "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    "left_heel", "right_heel", "left_foot_index", "right_foot_index")

# COCO-18 point -> the BlazePose landmark(s) it comes from (the neck is the shoulders' midpoint)
COCO18_FROM_BLAZEPOSE: tuple[tuple[int, ...], ...] = (
    (0,), (11, 12), (12,), (14,), (16,), (11,), (13,), (15,), (24,), (26,), (28,), (23,), (25,), (27,), (5,), (2,),
    (8,), (7,))

# OpenPose's limbs as pairs of COCO-18 indices (0-based), in drawing order; the annotator draws the first 17 (the
# last two, ear-shoulder, exist in its table but are never drawn)
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13), (1, 0),
    (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
DRAWN_LIMBS = 17

# colour k: limb k and joint k
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))

STICK_WIDTH = 4
JOINT_RADIUS = 4
LIMB_DIM = 0.6  # the canvas is multiplied by this after the limbs, before the joints

_FORMAT = ('[{"canvas_width": W, "canvas_height": H, "people": [{"pose_keypoints_2d": [x, y, confidence, ...'
           ' 18 points]}]}, ...] (one object per frame, pixels)')


def coco18_from_blazepose(points: np.ndarray, min_confidence: float = 0.5,
                          size: tuple[int, int] | None = None) -> np.ndarray:
    """BlazePose landmarks ``[33, 3]`` (x px, y px, visibility) → COCO-18 ``[18, 3]`` (x, y, confidence).

    A point whose confidence is below ``min_confidence``, or (with ``size`` = (width, height)) that lies outside
    the picture, becomes ``0, 0, 0``."""
    points = np.asarray(points, dtype=np.float64)
    out = np.zeros((18, 3), dtype=np.float64)
    for k, src in enumerate(COCO18_FROM_BLAZEPOSE):
        sel = points[list(src)]
        x, y = sel[:, 0].mean(), sel[:, 1].mean()
        c = sel[:, 2].min()
        inside = size is None or (0 <= x < size[0] and 0 <= y < size[1])
        if c >= min_confidence and inside:
            out[k] = (x, y, c)
    return out


def frame_json(people: Sequence[np.ndarray], width: int, height: int, extra: Sequence[dict] | None = None) -> dict:
    """One frame in the OpenPose JSON format; ``extra``: more keys for each person (e.g. the 33 BlazePose points)."""
    persons = []
    for i, p in enumerate(people):
        entry = {"pose_keypoints_2d": [round(float(v), 3) for v in np.asarray(p, dtype=np.float64).reshape(-1)]}
        if extra is not None:
            entry.update(extra[i])
        persons.append(entry)
    return {"canvas_width": int(width), "canvas_height": int(height), "people": persons}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def parse_frames(text: Any, name: str = "keypoints_in") -> list[dict]:
    """Frames of OpenPose JSON → ``[{"width", "height", "people": [array [18, 3]]}]``.

    Accepts a list of frames, one frame object, or a list of people of one frame; ``pose_keypoints_2d`` holds 18
    points (x, y, confidence) in pixels of ``canvas_width`` × ``canvas_height`` (or, when every coordinate is in
    [0, 1] and no canvas is given, fractions of the picture)."""
    if isinstance(text, str):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InputError(f"{name} as JSON: {_FORMAT}", f"text that is not JSON ({type(e).__name__}: {e})",
                             "Connect the keypoints output of a pose node, or paste OpenPose JSON.") from e
    else:
        data = text
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise InputError(f"{name} as {_FORMAT}", f"{type(data).__name__} {json.dumps(data)[:80]}",
                         "Give a list with one object per frame.")
    if all(isinstance(d, dict) and "pose_keypoints_2d" in d for d in data):
        data = [{"people": data}]
    frames = []
    for i, frame in enumerate(data):
        if not isinstance(frame, dict) or not isinstance(frame.get("people", []), list):
            raise InputError(f"each frame of {name} as an object with 'people'", f"frame {i}: "
                             f"{json.dumps(frame)[:80]}", f"Write the frames as {_FORMAT}.")
        w, h = _number(frame.get("canvas_width")), _number(frame.get("canvas_height"))
        people = []
        for j, person in enumerate(frame.get("people", [])):
            flat = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
            vals = [_number(v) for v in flat] if isinstance(flat, list) else None
            if vals is None or len(vals) != 54 or any(v is None for v in vals):
                got = f"{len(flat)} numbers" if isinstance(flat, list) else json.dumps(person)[:80]
                raise InputError(f"'pose_keypoints_2d' of 54 numbers (18 points × x, y, confidence) in {name}",
                                 f"frame {i} person {j}: {got}", "Use the COCO-18 body format (OpenPose).")
            people.append(np.asarray(vals, dtype=np.float64).reshape(18, 3))
        frames.append({"width": w, "height": h, "people": people})
    return frames


def scale_people(frame: dict, width: int, height: int) -> list[np.ndarray]:
    """The frame's people in pixels of a ``width`` × ``height`` picture (from their canvas size, or fractions)."""
    out = []
    for p in frame["people"]:
        p = p.copy()
        cw, ch = frame["width"], frame["height"]
        present = p[:, 2] > 0
        if cw and ch:
            p[:, 0] *= width / cw
            p[:, 1] *= height / ch
        elif present.any() and np.all(p[present, :2] <= 1.0):
            p[:, 0] *= width
            p[:, 1] *= height
        out.append(p)
    return out


def _ellipse_polygon(cx: float, cy: float, half_length: int, half_width: int, angle_deg: int) -> list[tuple]:
    """The filled ellipse's outline, one vertex per degree (OpenCV's ellipse2Poly convention: integer axes and
    angle, rounded vertices)."""
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    pts = []
    for t in range(0, 361):
        r = math.radians(t)
        x, y = half_length * math.cos(r), half_width * math.sin(r)
        pts.append((round(cx + x * ca - y * sa), round(cy + x * sa + y * ca)))
    return pts


def render(people: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """OpenPose skeleton map ``[H, W, 3]`` uint8 of the people (each ``[18, 3]`` x px, y px, confidence; a point
    with confidence 0 is absent). Black when there is nobody."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (int(width), int(height)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for k in range(DRAWN_LIMBS):
        a, b = LIMBS[k]
        for p in people:
            if p[a, 2] <= 0 or p[b, 2] <= 0:
                continue
            (x0, y0), (x1, y1) = p[a, :2], p[b, :2]
            length = math.hypot(x1 - x0, y1 - y0)
            angle = int(math.degrees(math.atan2(y0 - y1, x0 - x1)))
            poly = _ellipse_polygon(int((x0 + x1) / 2), int((y0 + y1) / 2), int(length / 2), STICK_WIDTH, angle)
            draw.polygon(poly, fill=COLORS[k])
    arr = (np.asarray(canvas, dtype=np.float64) * LIMB_DIM).astype(np.uint8)
    canvas = Image.fromarray(arr)
    draw = ImageDraw.Draw(canvas)
    for k in range(18):
        for p in people:
            if p[k, 2] <= 0:
                continue
            x, y = int(p[k, 0]), int(p[k, 1])
            r = JOINT_RADIUS
            draw.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[k])
    return np.asarray(canvas, dtype=np.uint8).copy()
