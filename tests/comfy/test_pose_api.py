"""Pose, garment-mask and depth nodes through a real ComfyUI server (HTTP API only).

BlazePose runs on its real weights (the .tflite files of PyPI's mediapipe==0.10.21 that .ci/setup_env.sh extracts
into $ATELIER_CACHE/pose, linked into the server's models/pose); depth on a tiny random Depth Anything folder in
models/depth. Bad inputs (no person, empty person mask, corrupt .tflite, incomplete depth folder) are clear errors and
the server lives on.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from atelier import openpose
from tests.harness import real_weights as rw
from tests.harness import tiny_depth
from tests.harness.comfy_server import ComfyClient

log = logging.getLogger("atelier.tests.pose_api")

LANDMARK = "pose_landmark_full.tflite"
FACE_BOX = (180, 60, 275, 175)  # hand-labelled on the astronaut (x0, y0, x1, y1)
TORSO_BOX = (80, 280, 270, 480)
C = {n: i for i, n in enumerate(openpose.COCO18_NAMES)}


@pytest.fixture(scope="module")
def pose_files(comfy_base):
    try:
        src = rw.blazepose_dir()
    except rw.WeightsUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    folder = comfy_base / "models" / "pose"
    for f in src.glob("*.tflite"):
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    return folder


@pytest.fixture(scope="module")
def astronaut(client) -> str:
    buf = io.BytesIO()
    Image.fromarray(rw.astronaut()).save(buf, format="PNG")
    return client.upload_image(buf.getvalue(), "atelier_pose_astronaut.png")


def _run_ok(client: ComfyClient, prompt: dict) -> dict:
    entry = client.run(prompt, timeout=300)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    return entry


def _run_error(client: ComfyClient, prompt: dict) -> str:
    entry = client.run(prompt, timeout=300)
    msg = ComfyClient.error_message(entry)
    assert msg is not None, "expected the prompt to fail"
    return msg


def _text(entry: dict, node: str) -> str:
    return entry["outputs"][node]["text"][0]


def pose_prompt(image: str, *, blank_second: bool = False, keypoints_in: str | None = None,
                model: str = LANDMARK) -> dict:
    src = ["1", 0]
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": image}}}
    if blank_second:
        prompt["6"] = {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1,
                                                              "color": 0x808080}}
        prompt["7"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["6", 0]}}
        src = ["7", 0]
    inputs = {"image": src, "model": model, "min_confidence": 0.5}
    if keypoints_in is not None:
        inputs["keypoints_in"] = keypoints_in
    prompt["2"] = {"class_type": "AtelierPose", "inputs": inputs}
    prompt["3"] = {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "atelier_pose"}}
    prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}
    return prompt


def garment_prompt(image: str, *, garment: str = "upper_body", expand: float = 0.0, protect_face: bool = True,
                   person_mask: float | None = None, blank: bool = False, model: str = LANDMARK) -> dict:
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "AtelierGarmentMask", "inputs": {
            "image": ["1", 0], "garment": garment, "expand": expand, "protect_face": protect_face,
            "protect_hands": True, "model": model}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "atelier_garment"}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["2", 2], "filename_prefix": "atelier_garment_prev"}},
    }
    if blank:
        prompt["1"] = {"class_type": "EmptyImage", "inputs": {"width": 320, "height": 256, "batch_size": 1,
                                                              "color": 0x808080}}
    if person_mask is not None:
        prompt["6"] = {"class_type": "SolidMask", "inputs": {"value": person_mask, "width": 512, "height": 512}}
        prompt["2"]["inputs"]["person_mask"] = ["6", 0]
    return prompt


def _box(box) -> np.ndarray:
    m = np.zeros((512, 512), dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------------------------ AtelierPose


@pytest.mark.parametrize("node,category,inputs,outputs", [
    ("AtelierPose", "atelier/animate", ["image", "model", "min_confidence", "keypoints_in"],
     ["pose_image", "keypoints"]),
    ("AtelierGarmentMask", "atelier/tryon",
     ["image", "garment", "expand", "protect_face", "protect_hands", "model", "person_mask", "sam2"],
     ["mask", "pose", "preview"]),
    ("AtelierDepth", "atelier/tryon", ["image", "model", "resolution"], ["depth"]),
])
def test_schema_is_the_public_contract(client, pose_files, node, category, inputs, outputs):
    info = client.object_info(node)
    assert info["category"] == category
    got = list(info["input"]["required"]) + list(info["input"].get("optional", {}))
    assert got == inputs
    assert info["output_name"] == outputs
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    if node != "AtelierDepth":
        assert LANDMARK in info["input"]["required"]["model"][1]["options"]


def test_pose_maps_and_keypoints_of_a_batch_with_an_empty_frame(client, pose_files, astronaut, comfy_server):
    entry = _run_ok(client, pose_prompt(astronaut, blank_second=True))
    maps = [m[..., :3] for m in client.images(entry, "3")]
    frames = json.loads(_text(entry, "4"))
    assert len(maps) == 2 and len(frames) == 2
    assert frames[1]["people"] == [] and maps[1].max() == 0, "a frame without a person gives a black map"
    people = frames[0]["people"]
    assert len(people) == 1 and frames[0]["canvas_width"] == 512
    kp = np.asarray(people[0]["pose_keypoints_2d"]).reshape(18, 3)
    assert len(people[0]["atelier_blazepose_33"]) == 33
    nose, rs, ls = kp[C["nose"]], kp[C["right_shoulder"]], kp[C["left_shoulder"]]
    log.info("server pose on the astronaut: nose %s, right shoulder %s, left shoulder %s", nose, rs, ls)
    assert nose[1] < rs[1] and nose[1] < ls[1] and rs[0] < nose[0] < ls[0]
    x0, y0, x1, y1 = FACE_BOX
    assert x0 <= nose[0] <= x1 and y0 <= nose[1] <= y1
    # the map is the OpenPose drawing of these keypoints: joints in their colours where they are
    for k in ("right_shoulder", "left_shoulder", "neck"):
        x, y = int(kp[C[k], 0]), int(kp[C[k], 1])
        assert maps[0][y, x].tolist() == list(openpose.COLORS[C[k]]), k
    assert np.array_equal(maps[0], openpose.render([kp], 512, 512))
    ui = entry["outputs"]["2"]
    assert "frame 1: no person found" in json.dumps(ui)
    assert comfy_server.alive()


def test_keypoints_in_are_drawn_without_the_model(client, pose_files, astronaut):
    kp = np.zeros((18, 3))
    kp[C["neck"]] = (100, 50, 1)
    kp[C["right_shoulder"]] = (60, 50, 1)
    text = json.dumps([openpose.frame_json([kp], 200, 100)])  # drawn at twice the size on the 512² picture
    entry = _run_ok(client, pose_prompt(astronaut, keypoints_in=text))
    m = client.images(entry, "3")[0][..., :3]
    expected = kp.copy()
    expected[:, 0] *= 512 / 200
    expected[:, 1] *= 512 / 100
    assert np.array_equal(m, openpose.render([expected], 512, 512))
    out = json.loads(_text(entry, "4"))
    assert np.allclose(np.asarray(out[0]["people"][0]["pose_keypoints_2d"]).reshape(18, 3), expected, atol=1e-3)


def test_bad_keypoints_json_and_corrupt_tflite_are_clear_errors(client, pose_files, astronaut, comfy_server):
    msg = _run_error(client, pose_prompt(astronaut, keypoints_in='[{"people": [{"pose_keypoints_2d": [1, 2]}]}]'))
    assert "54 numbers" in msg
    (pose_files / "broken_pose_landmark.tflite").write_bytes(b"\0" * 64)
    msg = _run_error(client, pose_prompt(astronaut, model="broken_pose_landmark.tflite"))
    assert "TensorFlow Lite" in msg and "broken_pose_landmark.tflite" in msg and "mediapipe==0.10.21" in msg
    assert comfy_server.alive()
    _run_ok(client, pose_prompt(astronaut))  # and the good model still works


# ----------------------------------------------------------------------------------------- AtelierGarmentMask


def test_garment_mask_covers_the_torso_not_the_face(client, pose_files, astronaut):
    masks = {}
    for expand in (0.0, 0.5, 1.0):
        entry = _run_ok(client, garment_prompt(astronaut, expand=expand))
        masks[expand] = client.images(entry, "4")[0][..., 0] > 127
    m0 = masks[0.0]
    torso, face = m0[_box(TORSO_BOX)].mean(), m0[_box(FACE_BOX)].mean()
    log.info("server garment mask (upper_body): torso %.3f, face %.3f; area for expand 0/0.5/1: %s", torso, face,
             [round(float(m.mean()), 3) for m in masks.values()])
    assert torso > 0.9 and face < 0.01
    assert not (masks[0.0] & ~masks[0.5]).any() and not (masks[0.5] & ~masks[1.0]).any()
    assert masks[1.0].sum() > 1.2 * masks[0.0].sum()
    pose_json = json.loads(_text(entry, "5"))
    assert len(pose_json[0]["people"]) == 1
    preview = client.images(entry, "7")[0]
    assert preview.shape[:2] == (512, 512)


def test_protect_face_holds_when_the_mask_is_relaxed(client, pose_files, astronaut):
    face = _box(FACE_BOX)
    loose = client.images(_run_ok(client, garment_prompt(astronaut, expand=1.0, protect_face=False)), "4")[0]
    kept = client.images(_run_ok(client, garment_prompt(astronaut, expand=1.0, protect_face=True)), "4")[0]
    lf, kf = (loose[..., 0] > 127)[face].mean(), (kept[..., 0] > 127)[face].mean()
    log.info("server garment mask expand 1: face covered %.3f unprotected, %.3f protected", lf, kf)
    assert lf > 0.05 and kf < 0.02


def test_person_mask_input_limits_the_mask(client, pose_files, astronaut):
    full = client.images(_run_ok(client, garment_prompt(astronaut, person_mask=1.0)), "4")[0][..., 0] > 127
    auto = client.images(_run_ok(client, garment_prompt(astronaut)), "4")[0][..., 0] > 127
    assert full.sum() >= auto.sum()  # an all-person mask cuts nothing off


@pytest.mark.parametrize("kw,needle", [
    ({"blank": True}, "no person in the picture"),
    ({"person_mask": 0.0}, "an empty mask"),
])
def test_garment_bad_inputs_are_clear_errors(client, pose_files, astronaut, comfy_server, kw, needle):
    msg = _run_error(client, garment_prompt(astronaut, **kw))
    assert needle in msg, msg
    assert comfy_server.alive()


# ------------------------------------------------------------------------------------------------ AtelierDepth


@pytest.fixture(scope="module")
def depth_model(comfy_base):
    return tiny_depth.build_depth_anything(comfy_base / "models" / "depth" / "depth-anything-tiny")


def depth_prompt(image: str, model: str = "depth-anything-tiny", resolution: int = 0) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "AtelierDepth", "inputs": {"image": ["1", 0], "model": model, "resolution": resolution}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "atelier_depth"}},
    }


def test_depth_equals_the_transformers_pipeline(client, depth_model, astronaut):
    from transformers import pipeline

    entry = _run_ok(client, depth_prompt(astronaut))
    ours = client.images(entry, "3")[0]
    ref = np.asarray(pipeline("depth-estimation", model=str(depth_model))(Image.fromarray(rw.astronaut()))["depth"])
    delta = int(np.abs(ours[..., 0].astype(int) - ref.astype(int)).max())
    log.info("server depth vs transformers pipeline (8-bit pictures): max delta %d", delta)
    assert ours.shape == (512, 512, 3) and delta <= 1
    assert np.array_equal(ours[..., 0], ours[..., 1])


def test_incomplete_depth_folder_is_a_clear_error(client, comfy_base, astronaut, comfy_server):
    broken = comfy_base / "models" / "depth" / "depth-no-weights"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text('{"model_type": "depth_anything", '
                                        '"architectures": ["DepthAnythingForDepthEstimation"]}')
    msg = _run_error(client, depth_prompt(astronaut, model="depth-no-weights"))
    assert "model.safetensors" in msg and "preprocessor_config.json" in msg
    assert comfy_server.alive()


def test_sam2_refinement_only_adds_near_the_region(client, pose_files, astronaut, comfy_base):
    """SAM2 (a random tiny SAM 2.1: its masks are arbitrary) prompted from the pose points: the refined mask keeps
    the pose region, adds only near it, and the face stays protected."""
    pytest.importorskip("sam2")
    from tests.harness import tiny_sam2

    ckpt = comfy_base / "models" / "sam2" / f"{tiny_sam2.NAME}.pt"
    if not ckpt.exists():  # the SAM2 API tests of the same session write the same file
        tiny_sam2.write_checkpoints(ckpt.parent, formats=("pt",))
    name = ckpt.name
    base = client.images(_run_ok(client, garment_prompt(astronaut)), "4")[0][..., 0] > 127
    prompt = garment_prompt(astronaut)
    prompt["8"] = {"class_type": "AtelierSAM2Loader", "inputs": {"model": name, "dtype": "fp32"}}
    prompt["2"]["inputs"]["sam2"] = ["8", 0]
    refined = client.images(_run_ok(client, prompt), "4")[0][..., 0] > 127
    log.info("server garment mask with SAM2 (random weights): %d px, without %d px", refined.sum(), base.sum())
    assert not (base & ~refined).any()
    assert not refined[_box(FACE_BOX)].any()
    assert not refined[:40].any()
