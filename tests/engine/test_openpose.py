"""The OpenPose skeleton convention (golden): COCO-18 order, limb pairs, colours and drawing order of the OpenPose
ControlNet annotator, written here from the published convention (ControlNet 1.1 / controlnet_aux draw_bodypose:
1-based limbSeq, 18 colours, 17 limbs drawn at 0.6 intensity, joints as radius-4 discs at full colour)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atelier import openpose
from atelier.errors import InputError

# the annotator's table, 1-based as published
LIMB_SEQ_1BASED = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
                   [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
COLOURS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
           [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
           [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
COCO18 = ["nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
          "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye",
          "right_ear", "left_ear"]


def test_tables_are_the_openpose_convention():
    assert list(openpose.COCO18_NAMES) == COCO18
    assert [list(p) for p in openpose.LIMBS] == [[a - 1, b - 1] for a, b in LIMB_SEQ_1BASED]
    assert [list(c) for c in openpose.COLORS] == COLOURS
    assert openpose.DRAWN_LIMBS == 17 and openpose.STICK_WIDTH == 4 and openpose.JOINT_RADIUS == 4
    assert openpose.LIMB_DIM == 0.6


def test_blazepose_to_coco18_mapping():
    names = openpose.BLAZEPOSE_NAMES
    assert len(names) == 33
    for k, src in enumerate(openpose.COCO18_FROM_BLAZEPOSE):
        if COCO18[k] == "neck":
            assert {names[i] for i in src} == {"left_shoulder", "right_shoulder"}
        else:
            assert [names[i] for i in src] == [COCO18[k]]
    pts = np.zeros((33, 3))
    pts[:, 0] = np.arange(33) * 10.0
    pts[:, 1] = 5.0
    pts[:, 2] = 0.9
    pts[12, 2] = 0.3  # right shoulder unsure: the right shoulder and the neck drop out
    out = openpose.coco18_from_blazepose(pts, min_confidence=0.5)
    assert out[0].tolist() == [0.0, 5.0, 0.9]
    assert out[2].tolist() == [0, 0, 0] and out[1].tolist() == [0, 0, 0]
    assert out[5].tolist() == [110.0, 5.0, 0.9]  # left shoulder = landmark 11
    inside = openpose.coco18_from_blazepose(pts, 0.5, size=(100, 100))
    assert inside[15].tolist() == [20.0, 5.0, 0.9] and inside[4].tolist() == [0, 0, 0]  # wrist at x 160: outside


def _skeleton(size: int = 512) -> np.ndarray:
    """A plausible standing figure, COCO-18, confidence 1."""
    pts = [(256, 80), (256, 150), (200, 150), (170, 230), (150, 300), (312, 150), (342, 230), (362, 300),
           (225, 300), (220, 390), (215, 470), (287, 300), (292, 390), (297, 470), (240, 65), (272, 65),
           (225, 75), (287, 75)]
    p = np.ones((18, 3))
    p[:, :2] = np.asarray(pts, dtype=np.float64) * size / 512
    return p


def _alone(p: np.ndarray, keep: tuple[int, ...]) -> np.ndarray:
    q = p.copy()
    q[[k for k in range(18) if k not in keep], 2] = 0
    return q


@pytest.mark.parametrize("i", range(17))
def test_each_limb_in_its_colour_at_0_6_then_joints_at_full(i):
    a, b = openpose.LIMBS[i]
    p = np.zeros((18, 3))
    p[a] = (100, 150, 1)
    p[b] = (300, 250, 1)
    img = openpose.render([p], 400, 400)
    assert img.shape == (400, 400, 3) and img.dtype == np.uint8
    assert img[200, 200].tolist() == [int(c * 0.6) for c in COLOURS[i]], f"limb {i} ({COCO18[a]}-{COCO18[b]})"
    assert img[150, 100].tolist() == COLOURS[a] and img[250, 300].tolist() == COLOURS[b]
    # the limb is an ellipse 2 × 4 px wide: 6 px across the limb it is black
    n = np.array([-100.0, 200.0]) / np.hypot(100, 200)
    assert img[int(200 + 6 * n[1]), int(200 + 6 * n[0])].tolist() == [0, 0, 0]


def test_drawing_order_and_undrawn_limbs():
    p = _skeleton()
    img = openpose.render([p], 512, 512)
    # the neck joint (drawn after every limb) sits on top of the five limbs that meet there
    assert img[150, 256].tolist() == COLOURS[1]
    # right shoulder and right ear alone: the table's shoulder-ear limb (index 17) is never drawn
    only = openpose.render([_alone(p, (2, 16))], 512, 512)
    mid = ((p[2, :2] + p[16, :2]) / 2).astype(int)
    assert only[mid[1], mid[0]].tolist() == [0, 0, 0]
    assert (only.sum(-1) > 0).sum() < 2 * 81 + 10  # two radius-4 discs, nothing else
    # two people: both drawn
    other = p.copy()
    other[:, 0] += 100
    two = openpose.render([p, other], 512, 512)
    assert two[150, 356].tolist() == COLOURS[1] and two[150, 256].tolist() == COLOURS[1]


def test_absent_points_and_empty_frames():
    assert openpose.render([], 64, 48).sum() == 0 and openpose.render([], 64, 48).shape == (48, 64, 3)
    p = _skeleton(256)
    p[1, 2] = 0  # no neck: the 5 limbs from the neck and the neck joint disappear
    img = openpose.render([p], 256, 256)
    for i, (a, b) in enumerate(openpose.LIMBS[:17]):
        if 1 in (a, b):
            mx, my = (p[a, :2] + p[b, :2]) / 2
            assert img[int(my), int(mx)].tolist() != [int(c * 0.6) for c in COLOURS[i]]


def test_json_round_trip_and_scaling():
    p = _skeleton(512)
    frame = openpose.frame_json([p], 512, 512)
    text = json.dumps([frame, openpose.frame_json([], 512, 512)])
    frames = openpose.parse_frames(text)
    assert len(frames) == 2 and frames[1]["people"] == []
    assert np.allclose(frames[0]["people"][0], p, atol=1e-3)
    half = openpose.scale_people(frames[0], 256, 128)[0]
    assert np.allclose(half[:, 0], p[:, 0] / 2, atol=1e-3) and np.allclose(half[:, 1], p[:, 1] / 4, atol=1e-3)
    # a bare list of people and normalised coordinates are read too
    norm = p.copy()
    norm[:, :2] /= 512
    bare = openpose.parse_frames(json.dumps([{"pose_keypoints_2d": norm.reshape(-1).tolist()}]))
    assert np.allclose(openpose.scale_people(bare[0], 512, 512)[0], p, atol=1e-3)


@pytest.mark.parametrize("bad", ["not json", "[]", '[{"people": [{"pose_keypoints_2d": [1, 2, 3]}]}]',
                                 '[{"people": "nobody"}]', '[{"people": [{"pose_keypoints_2d": ["a"]}]}]'])
def test_bad_keypoints_json_is_a_clear_error(bad):
    with pytest.raises(InputError, match="keypoints_in"):
        openpose.parse_frames(bad)
