"""BlazePose on its real weights (the three .tflite files of PyPI's mediapipe==0.10.21, extracted by .ci/setup_env.sh
into $ATELIER_CACHE/pose) through ai-edge-litert: scikit-image's astronaut gives COCO-18 points where they belong."""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest

pose = pytest.importorskip("atelier.pose", reason="ai-edge-litert is not installed", exc_type=ImportError)

from atelier import openpose  # noqa: E402
from atelier.errors import ModelFileError  # noqa: E402
from tests.harness import real_weights as rw  # noqa: E402

log = logging.getLogger("atelier.tests.pose")

# hand-labelled on the 512×512 astronaut (pixels): the face (forehead to chin, ear to ear) and the torso of the suit
FACE_BOX = (180, 60, 275, 175)  # x0, y0, x1, y1
C = {n: i for i, n in enumerate(openpose.COCO18_NAMES)}


@pytest.fixture(scope="module")
def pose_dir():
    try:
        return rw.blazepose_dir()
    except rw.WeightsUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def model(pose_dir):
    spec = pose.make_spec(str(pose_dir / pose.LANDMARK_NAME))
    return pose.load(pose.make_handle(spec))


@pytest.fixture(scope="module")
def astronaut():
    return rw.astronaut().astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def person(model, astronaut):
    p = pose.estimate(model, astronaut)
    assert p is not None, "BlazePose found nobody in the astronaut"
    return p


def test_anchors_match_the_detector_output():
    a = pose.ssd_anchors()
    assert a.shape == (2254, 2)
    assert np.allclose(a[0], (0.5 / 28, 0.5 / 28)) and np.allclose(a[1], a[0])  # two anchors per cell
    assert np.allclose(a[1568], (0.5 / 14, 0.5 / 14))  # stride 16 starts after 28² × 2
    assert np.allclose(a[-1], (6.5 / 7, 6.5 / 7))


def test_roi_rotation_convention():
    up = pose.roi_from_keypoints((100.0, 200.0), (100.0, 100.0))  # scale point above the hips: upright
    assert up.rotation == pytest.approx(0.0) and up.size == pytest.approx(2 * 100 * 1.25)
    right = pose.roi_from_keypoints((100.0, 200.0), (200.0, 200.0))  # lying with the head to the right
    assert right.rotation == pytest.approx(math.pi / 2)


def test_astronaut_coco18_points_where_they_belong(model, person, astronaut):
    h, w = astronaut.shape[:2]
    lm = person.landmarks
    coco = openpose.coco18_from_blazepose(lm[:, [0, 1, 3]], 0.5, (w, h))
    mask = pose.segment_person(model, astronaut)
    nose, neck = coco[C["nose"]], coco[C["neck"]]
    rs, ls = coco[C["right_shoulder"]], coco[C["left_shoulder"]]
    log.info("astronaut: detection %.3f, presence %.3f; nose %s, neck %s, right shoulder %s, left shoulder %s, "
             "eyes %s %s; person mask at the shoulders %.3f / %.3f, mean %.3f", person.score, person.presence,
             nose.round(1), neck.round(1), rs.round(1), ls.round(1), coco[C["right_eye"]].round(1),
             coco[C["left_eye"]].round(1), mask[int(rs[1]), int(rs[0])], mask[int(ls[1]), int(ls[0])], mask.mean())
    assert person.score > 0.5 and person.presence > 0.9
    for k in ("nose", "neck", "right_shoulder", "left_shoulder", "right_eye", "left_eye", "right_ear", "left_ear"):
        assert coco[C[k], 2] >= 0.9, f"{k} not confident: {coco[C[k]]}"
    x0, y0, x1, y1 = FACE_BOX
    for k in ("nose", "right_eye", "left_eye"):
        assert x0 <= coco[C[k], 0] <= x1 and y0 <= coco[C[k], 1] <= y1, f"{k} off the face: {coco[C[k]]}"
    assert nose[1] < rs[1] - 60 and nose[1] < ls[1] - 60, "the nose is well above the shoulders"
    assert coco[C["right_eye"], 1] < nose[1] and coco[C["left_eye"], 1] < nose[1]
    assert rs[0] < nose[0] < ls[0], "facing the camera: her right shoulder is on the picture's left"
    assert coco[C["right_eye"], 0] < coco[C["left_eye"], 0]
    assert np.allclose(neck[:2], (rs[:2] + ls[:2]) / 2)
    for p in (rs, ls, nose, neck):
        assert mask[int(p[1]), int(p[0])] > 0.9, "keypoint outside the person mask"
    # the picture's top corners are background (flag, wall) and the legs are out of the picture
    assert mask[:40, :40].mean() < 0.1 and mask[:40, -40:].mean() < 0.1
    for k in ("right_knee", "left_knee", "right_ankle", "left_ankle"):
        assert coco[C[k], 2] == 0


def test_rotated_picture_gives_the_same_face(model, person, astronaut):
    """The landmark model runs on the rotated region: a picture turned 90° gives the face points turned with it."""
    w = astronaut.shape[1]
    turned = pose.estimate(model, np.ascontiguousarray(np.rot90(astronaut)))
    assert turned is not None
    assert abs(turned.roi.rotation) > 1.0, "the region follows the body's rotation"
    expected = np.stack([person.landmarks[:, 1], w - person.landmarks[:, 0]], axis=1)
    err = np.linalg.norm(turned.landmarks[:11, :2] - expected[:11], axis=1)
    log.info("rotated astronaut: face landmark error %.1f px max, %.1f mean", err.max(), err.mean())
    assert err.max() < 15


def test_no_person_gives_none(model):
    assert pose.estimate(model, np.full((256, 320, 3), 0.5, dtype=np.float32)) is None


def test_corrupt_and_wrong_files_are_clear_errors(pose_dir, tmp_path):
    for name in (pose.DETECTOR_NAME, pose.SEGMENTER_NAME):
        shutil.copy(pose_dir / name, tmp_path / name)
    bad = tmp_path / pose.LANDMARK_NAME
    bad.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelFileError, match="TFL3"):
        pose.make_handle(pose.make_spec(str(bad)))
    # a valid header and a truncated body: LiteRT refuses it when loading
    bad.write_bytes((pose_dir / pose.LANDMARK_NAME).read_bytes()[:4096])
    handle = pose.make_handle(pose.make_spec(str(bad)))
    with pytest.raises(ModelFileError, match="LiteRT"):
        pose.load(handle)
    # another model under the landmark model's name
    shutil.copy(pose_dir / pose.SEGMENTER_NAME, bad)
    with pytest.raises(ModelFileError, match="pose_landmark_full"):
        pose.load(pose.make_handle(pose.make_spec(str(bad))))
    # no detector beside it
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(pose_dir / pose.LANDMARK_NAME, lonely / pose.LANDMARK_NAME)
    with pytest.raises(ModelFileError, match="pose_detection"):
        pose.make_spec(str(lonely / pose.LANDMARK_NAME))


def test_released_model_says_so(pose_dir):
    m = pose.load(pose.make_handle(pose.make_spec(str(pose_dir / pose.LANDMARK_NAME))))
    m.close()
    with pytest.raises(Exception, match="released"):
        pose.estimate(m, np.zeros((64, 64, 3), dtype=np.float32))


def test_without_litert_only_the_pose_engine_fails_naming_the_package(monkeypatch):
    """The pack's __init__ leaves nodes/pose.py out on ModuleNotFoundError and tells users to pip install e.name;
    the OpenPose drawing, garment shapes and depth do not need LiteRT."""
    import importlib
    import sys

    for mod in [m for m in sys.modules if m.split(".")[0] == "ai_edge_litert"]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # makes `import ai_edge_litert` fail
    monkeypatch.delitem(sys.modules, "atelier.pose")
    with pytest.raises(ModuleNotFoundError) as e:
        importlib.import_module("atelier.pose")
    assert e.value.name == "ai-edge-litert"
    for name in ("atelier.openpose", "atelier.garment", "atelier.depth"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        importlib.import_module(name)
