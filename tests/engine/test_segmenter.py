"""SAM2 engine: prompt parsers, config recognition from weights, loading, and parity with Meta's predictor.

Parity runs the engine and ``sam2.build_sam.build_sam2`` + ``SAM2ImagePredictor`` (no Atelier code) on the same
random-weight SAM 2.1 tiny checkpoint, image and prompts: masks must be identical.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from atelier import segmenter
from atelier.errors import InputError, ModelFileError
from atelier.segmenter import ALL_ARCHS, Prompts, SAM2Arch, SAM2Model, SAM2Spec
from tests.harness import tiny_sam2

H, W = tiny_sam2.HEIGHT, tiny_sam2.WIDTH
example_image = tiny_sam2.example_image


# ------------------------------------------------------------------------------------------------ parsers


@pytest.mark.parametrize("text, want", [
    ('[{"x": 10, "y": 20}, {"x": 30.5, "y": 4}]', [(10.0, 20.0), (30.5, 4.0)]),
    ('[{"x": 10, "y": 20, "label": 1}]', [(10.0, 20.0)]),  # extra keys (editors add some) are ignored
    ("[[10, 20], [30.5, 4]]", [(10.0, 20.0), (30.5, 4.0)]),
    ('{"x": 1, "y": 2}', [(1.0, 2.0)]),
    ("[5, 6]", [(5.0, 6.0)]),
    ("", []), ("   ", []), ("[]", []), ("null", []), (None, []),
    ([{"x": 3, "y": 4}], [(3.0, 4.0)]),  # an already-parsed list
])
def test_parse_points_accepts_both_formats(text, want):
    assert segmenter.parse_points(text) == want


@pytest.mark.parametrize("text, needle", [
    ('[{"x": 10, "y": 20}', "not valid JSON"),
    ("[{'x': 10, 'y': 20}]", "not valid JSON"),
    ('[{"x": "ten", "y": 20}]', "entry 0"),
    ('[{"x": 10}]', "entry 0"),
    ("[[1, 2, 3]]", "entry 0"),
    ('[{"x": 1, "y": 2}, {"x": true, "y": 2}]', "entry 1"),
    ('[{"x": NaN, "y": 2}]', "entry 0"),
    ('"10,20"', "JSON list"),
])
def test_parse_points_errors_teach(text, needle):
    with pytest.raises(InputError) as e:
        segmenter.parse_points(text, "points")
    msg = str(e.value)
    assert needle in msg and "points" in msg
    assert e.value.fix  # every error says how to fix it


@pytest.mark.parametrize("text, want", [
    ("[[1, 2, 30, 40], [5, 6, 7, 8]]", [(1.0, 2.0, 30.0, 40.0), (5.0, 6.0, 7.0, 8.0)]),
    ("[1, 2, 30, 40]", [(1.0, 2.0, 30.0, 40.0)]),
    ("", []), ("[]", []), ("null", []),
])
def test_parse_boxes(text, want):
    assert segmenter.parse_boxes(text) == want


@pytest.mark.parametrize("text, needle", [
    ("[[10, 2, 10, 40]]", "x1 > x0"),
    ("[[10, 2, 5, 40]]", "x1 > x0"),
    ("[[1, 40, 30, 40]]", "y1 > y0"),
    ("[[1, 2, 3]]", "four numbers"),
    ("[[1, 2, 3, 4]", "not valid JSON"),
    ('{"x0": 1}', "JSON list"),
])
def test_parse_boxes_errors_teach(text, needle):
    with pytest.raises(InputError) as e:
        segmenter.parse_boxes(text)
    assert needle in str(e.value)


def test_empty_points_and_no_boxes_is_a_clear_error():
    with pytest.raises(InputError) as e:
        segmenter.parse_prompts("", "", "")
    assert "at least one point" in str(e.value) and "no points and no boxes" in str(e.value)
    with pytest.raises(InputError) as e:
        segmenter.parse_prompts("[]", '[{"x": 1, "y": 1}]', "[]")
    assert "only negative points" in str(e.value)


def test_objects_one_per_box_with_the_points_or_all_points_as_one():
    p = segmenter.parse_prompts('[{"x": 5, "y": 6}]', "[[1, 2]]", "[[0, 0, 10, 10], [20, 20, 30, 30]]")
    objs = p.objects()
    assert p.n_objects == 2 and len(objs) == 2
    for (coords, labels, box), want_box in zip(objs, ([0, 0, 10, 10], [20, 20, 30, 30]), strict=True):
        assert coords.tolist() == [[5, 6], [1, 2]] and labels.tolist() == [1, 0]
        assert box.tolist() == want_box
    p = segmenter.parse_prompts("[[5, 6], [7, 8]]", "[[1, 2]]", "")
    [(coords, labels, box)] = p.objects()
    assert p.n_objects == 1 and box is None
    assert coords.tolist() == [[5, 6], [7, 8], [1, 2]] and labels.tolist() == [1, 1, 0]
    [(coords, labels, box)] = segmenter.parse_prompts("", "", "[[0, 0, 4, 4]]").objects()
    assert coords is None and labels is None and box.tolist() == [0, 0, 4, 4]


@pytest.mark.parametrize("prompts, needle", [
    (Prompts(points=((W + 1, 5),)), "point 0 at (65, 5)"),
    (Prompts(points=((3, -1),)), "point 0 at (3, -1)"),
    (Prompts(points=((3, 3),), negative_points=((3, H + 0.5),)), "negative_points inside"),
    (Prompts(boxes=((0, 0, W + 10, 10),)), "box 0"),
    (Prompts(boxes=((-2, 0, 10, 10),)), "box 0"),
])
def test_prompts_outside_the_image_are_a_clear_error(prompts, needle):
    with pytest.raises(InputError) as e:
        segmenter.check_inside(prompts, W, H)
    assert needle in str(e.value) and f"{W}×{H}" in str(e.value)


def test_prompts_on_the_edges_are_inside():
    segmenter.check_inside(Prompts(points=((0, 0), (W, H)), boxes=((0, 0, W, H),)), W, H)


# ------------------------------------------------------------------------------------------- recognition


@pytest.mark.parametrize("arch", ALL_ARCHS, ids=lambda a: a.label)
def test_every_official_config_is_recognised_from_its_weights(arch):
    shapes = tiny_sam2.config_shapes(tiny_sam2.CONFIGS[(arch.version, arch.size)])
    assert segmenter.recognise(shapes) == arch
    assert arch.config_path.is_file()
    assert arch.config_name == tiny_sam2.CONFIGS[(arch.version, arch.size)]


def test_2_0_and_2_1_differ_only_in_the_2_1_keys():
    a = tiny_sam2.config_shapes("configs/sam2/sam2_hiera_t.yaml")
    b = tiny_sam2.config_shapes("configs/sam2.1/sam2.1_hiera_t.yaml")
    assert set(b) - set(a) == {"no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"}
    assert not set(a) - set(b)
    # either 2.1-only key is enough (some conversions drop unused video-only tensors)
    one = {k: v for k, v in b.items() if k != "no_obj_embed_spatial"}
    assert segmenter.recognise(one) == SAM2Arch("2.1", "tiny")


@pytest.mark.parametrize("shapes, needle", [
    ({}, "no tensors"),
    ({"image_encoder.blocks.0.attn.qkv.weight": (3, 1), "mask_decoder.iou_token.weight": (1, 256)}, "SAM 1"),
    ({"vision_encoder.backbone.patch_embed.projection.weight": (96, 3, 7, 7)}, "transformers"),
])
def test_other_models_are_a_clear_error(shapes, needle):
    with pytest.raises(ModelFileError) as e:
        segmenter.recognise(shapes, "'x.pt'")
    assert needle in str(e.value) and "SAM 2" in str(e.value)


def test_unknown_encoder_size_names_what_was_found():
    shapes = dict(tiny_sam2.config_shapes("configs/sam2.1/sam2.1_hiera_t.yaml"))
    shapes["image_encoder.trunk.patch_embed.proj.weight"] = (128, 3, 7, 7)
    with pytest.raises(ModelFileError) as e:
        segmenter.recognise(shapes, "'odd.pt'")
    assert "embed dim 128 and 12 blocks" in str(e.value) and "'odd.pt'" in str(e.value)


# ------------------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_sam2.write_checkpoints(tmp_path_factory.mktemp("sam2"))


@pytest.fixture(scope="module")
def model(ckpt):
    m = segmenter.load(segmenter.make_handle(SAM2Spec(path=str(ckpt["pt"]))))
    yield m
    m.close()


def test_handle_reads_the_checkpoint_without_building_it(ckpt):
    for path in ckpt.values():
        h = segmenter.make_handle(SAM2Spec(path=str(path)))
        assert h.arch == SAM2Arch("2.1", "tiny") and h.dtype == "fp32"
        assert h.weight_bytes == 38_962_754 * 4
    h = segmenter.make_handle(SAM2Spec(path=str(ckpt["pt"]), dtype="bf16"))
    assert h.dtype == "bf16" and h.weight_bytes == 38_962_754 * 4  # CPU: fp32 weights under bf16 autocast
    assert "SAM 2.1 tiny" in segmenter.summary(h)


def test_pt_and_safetensors_load_the_same_weights(ckpt, model):
    want = tiny_sam2.random_state_dict()
    other = segmenter.load(segmenter.make_handle(SAM2Spec(path=str(ckpt["safetensors"]))))
    try:
        for m in (model, other):
            got = m.sam.state_dict()
            assert set(got) == set(want)
            assert all(torch.equal(got[k], want[k]) for k in want)
            assert not any(t.is_meta for t in list(m.sam.parameters()) + list(m.sam.buffers()))
        assert model.resident_bytes == 38_962_754 * 4
        assert model.device == torch.device("cpu") and model.dtype == torch.float32
    finally:
        other.close()
    assert other.sam is None and other.predictor is None


def test_a_sam_2_0_checkpoint_builds_the_2_0_model(tmp_path):
    paths = tiny_sam2.write_checkpoints(tmp_path, seed=1, name="sam2_hiera_tiny_random",
                                        config_name="configs/sam2/sam2_hiera_t.yaml", formats=("safetensors",))
    h = segmenter.make_handle(SAM2Spec(path=str(paths["safetensors"])))
    assert h.arch == SAM2Arch("2.0", "tiny")
    m = segmenter.load(h)
    try:
        assert m.sam.no_obj_embed_spatial is None and not m.sam.proj_tpos_enc_in_obj_ptrs
        assert m.sam.sam_mask_decoder.dynamic_multimask_via_stability  # build_sam2's postprocessing settings
    finally:
        m.close()


def test_prefixed_keys_and_bad_files_are_handled(tmp_path):
    from safetensors.torch import save_file

    sd = {"model.image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}
    save_file(sd, str(tmp_path / "prefixed.safetensors"))
    assert list(segmenter.read_shapes(tmp_path / "prefixed.safetensors")) == ["image_encoder.trunk.patch_embed.proj.weight"]

    # old training checkpoints pickle objects such as argparse.Namespace: weights_only=True refuses them
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pt")
    with pytest.raises(ModelFileError) as e:
        segmenter.make_handle(SAM2Spec(path=str(tmp_path / "pickled.pt")))
    assert "weights_only=True" in str(e.value)
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError) as e:
        segmenter.make_handle(SAM2Spec(path=str(tmp_path / "other.pt")))
    assert "SAM 2 or SAM 2.1 checkpoint" in str(e.value) and "'w'" in str(e.value)
    with pytest.raises(ModelFileError):
        segmenter.make_handle(SAM2Spec(path=str(tmp_path / "missing.pt")))


def test_a_checkpoint_missing_a_weight_lists_it():
    sd = dict(tiny_sam2.random_state_dict())
    sd.pop("sam_mask_decoder.iou_token.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelFileError) as e:
        segmenter.build_model(SAM2Arch("2.1", "tiny"), sd, "'cut.pt'")
    msg = str(e.value)
    assert "1 missing: sam_mask_decoder.iou_token.weight" in msg and "1 unexpected" in msg


# -------------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def reference(ckpt):
    """Meta's predictor (build_sam2 + SAM2ImagePredictor) on the same weights, holding the example image."""
    return tiny_sam2.reference(ckpt["pt"]).set_image(example_image()).predictor


def ref_masks(predictor, prompts: Prompts, multimask: bool) -> list[np.ndarray]:
    out = []
    for coords, labels, box in prompts.objects():
        masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                             multimask_output=multimask)
        out.append(masks[int(np.argmax(scores))] if multimask else masks[0])
    return out


def image_tensor(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([i.astype(np.float32) / 255.0 for i in imgs]))


def test_masks_equal_the_predictor_for_boxes_and_points(model, reference):
    prompts = segmenter.parse_prompts('[{"x": 18, "y": 20}]', '[{"x": 50, "y": 10}]',
                                      "[[6, 8, 32, 34], [34, 26, 62, 46]]")
    got = segmenter.segment(model, image_tensor(example_image()), prompts, multimask=False)
    want = ref_masks(reference, prompts, multimask=False)
    assert got.shape == (2, H, W) and got.dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, torch.from_numpy(w.astype(np.float32)))
    assert not torch.equal(got[0], got[1])  # the two objects' masks differ: prompts reach the decoder


def test_masks_equal_the_predictor_for_points_with_multimask(model, reference):
    for text in ('[{"x": 18, "y": 20}, {"x": 20, "y": 22}]', "[[48, 36]]"):
        prompts = segmenter.parse_prompts(text, "[[5, 5]]", "")
        got = segmenter.segment(model, image_tensor(example_image()), prompts, multimask=True)
        [want] = ref_masks(reference, prompts, multimask=True)
        assert got.shape == (1, H, W)
        assert torch.equal(got[0], torch.from_numpy(want.astype(np.float32)))


def test_multimask_keeps_the_best_scoring_of_three(reference):
    coords, labels = np.array([[30.0, 24.0]], dtype=np.float32), np.array([1], dtype=np.int32)
    masks, scores, _ = reference.predict(point_coords=coords, point_labels=labels, multimask_output=True)
    assert masks.shape[0] == 3 and len(set(np.round(scores, 6))) == 3
    mask, score = segmenter.predict_object(reference, coords, labels, None, multimask=True)
    assert score == pytest.approx(float(scores.max())) and np.array_equal(mask, masks[int(np.argmax(scores))])
    mask1, _ = segmenter.predict_object(reference, coords, labels, None, multimask=False)
    single, _, _ = reference.predict(point_coords=coords, point_labels=labels, multimask_output=False)
    assert np.array_equal(mask1, single[0])


def test_same_image_twice_in_a_batch_reuses_the_embedding(model, reference, monkeypatch):
    segmenter.set_image(model, example_image().astype(np.float32) / 255.0)  # embedded (or already was)
    calls = []
    real = model.predictor.set_image
    monkeypatch.setattr(model.predictor, "set_image", lambda img: (calls.append(1), real(img)))
    prompts = segmenter.parse_prompts("", "", "[[6, 8, 32, 34], [34, 26, 62, 46]]")
    got = segmenter.segment(model, image_tensor(example_image(), example_image()), prompts)
    want = ref_masks(reference, prompts, multimask=False)
    assert got.shape == (4, H, W)
    for k in range(4):
        assert torch.equal(got[k], torch.from_numpy(want[k % 2].astype(np.float32)))
    assert len(calls) == 0  # the image held by the predictor is not embedded again


# ------------------------------------------------------------------------- batch order, progress, Stop


class FakePredictor:
    """Records prompts; each mask is filled with 10 * image id + object id, scores favour mask 1 of 3."""

    def __init__(self):
        self.image_id = None
        self.calls = []

    def set_image(self, img):
        self.image_id = int(round(float(img[0, 0, 0]) * 10))

    def predict(self, point_coords=None, point_labels=None, box=None, multimask_output=True):
        self.calls.append((self.image_id, None if box is None else box.tolist(), multimask_output))
        obj = 0 if box is None else int(box[0])
        h, w = 4, 5
        n = 3 if multimask_output else 1
        masks = np.zeros((n, h, w), dtype=bool)
        masks[1 if multimask_output else 0] = True
        masks[0, 0, 0] = bool((10 * self.image_id + obj) % 2)
        return masks, np.array([0.1, 0.9, 0.5][:n], dtype=np.float32), None


class StopAfter:
    def __init__(self, n):
        self.n, self.done = n, 0

    def step(self, k=1):
        self.done += k
        if self.done >= self.n:
            raise InterruptedError("stopped")


def fake_model() -> SAM2Model:
    return SAM2Model(sam=None, predictor=FakePredictor(), handle=None, dtype=torch.float32,
                     device=torch.device("cpu"))


def test_batch_order_is_image_major_and_progress_steps_per_object():
    m = fake_model()
    images = torch.stack([torch.full((4, 5, 3), v / 10) for v in (1, 2, 3)])
    prompts = Prompts(boxes=((0, 0, 2, 2), (1, 0, 3, 2)))
    progress = StopAfter(10**6)
    out = segmenter.segment(m, images, prompts, multimask=False, progress=progress)
    assert out.shape == (6, 4, 5) and progress.done == 6
    assert [c[:2] for c in m.predictor.calls] == [(i, [o, 0, o + 2, 2]) for i in (1, 2, 3) for o in (0, 1)]
    # mask i * n_objects + j is object j of image i
    for i, img in enumerate((1, 2, 3)):
        for j in range(2):
            assert out[i * 2 + j, 0, 0].item() == float((10 * img + j) % 2)


def test_multimask_is_passed_and_the_best_mask_kept():
    m = fake_model()
    out = segmenter.segment(m, torch.full((1, 4, 5, 3), 0.1), Prompts(points=((1, 1),)), multimask=True)
    assert m.predictor.calls == [(1, None, True)]
    assert out[0].bool().all()  # mask 1 (score 0.9) is all ones; masks 0 and 2 are not


def test_stop_between_objects():
    m = fake_model()
    with pytest.raises(InterruptedError):
        segmenter.segment(m, torch.full((2, 4, 5, 3), 0.1), Prompts(boxes=((0, 0, 2, 2), (1, 0, 3, 2))),
                          progress=StopAfter(2))
    assert len(m.predictor.calls) == 2


def test_points_outside_are_refused_before_any_work():
    m = fake_model()
    with pytest.raises(InputError):
        segmenter.segment(m, torch.zeros(1, 4, 5, 3), Prompts(points=((6, 1),)))
    assert m.predictor.calls == [] and m.predictor.image_id is None


@pytest.mark.parametrize("missing, name", [("sam2", "sam2"), ("hydra", "hydra-core")])
def test_a_missing_package_is_a_module_not_found_error_naming_it(monkeypatch, missing, name):
    """The pack's __init__ leaves the stage out on ModuleNotFoundError and tells users to pip install e.name."""
    import importlib
    import sys

    for mod in [m for m in sys.modules if m.split(".")[0] in ("sam2", missing)]:
        monkeypatch.delitem(sys.modules, mod)  # restored after the test
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail
    monkeypatch.delitem(sys.modules, "atelier.segmenter")
    with pytest.raises(ModuleNotFoundError) as e:
        importlib.import_module("atelier.segmenter")
    assert e.value.name == name


def test_parsers_accept_what_json_dumps_writes():
    pts = [{"x": 1.5, "y": 2}, {"x": 3, "y": 4}]
    assert segmenter.parse_points(json.dumps(pts)) == [(1.5, 2.0), (3.0, 4.0)]
