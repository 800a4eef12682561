"""BiRefNet (RMBG-2.0 / BiRefNet general / lite) without remote code: key sets, parity with upstream, file loading.

The fixtures in ``data/`` are names, shapes and numbers only, made once with the upstream code outside this repo:

* ``birefnet_keys_<variant>.json``: ``state_dict()`` names and shapes of the upstream model instantiated locally
  (``rmbg2``: briaai/RMBG-2.0's birefnet.py; ``general`` and ``lite``: ZhengPeng7/BiRefNet's models/birefnet.py
  with ``bb`` = swin_v1_l / swin_v1_t). Every published checkpoint of these variants has exactly these tensors.
* ``birefnet_reference.json``: the upstream forward's output on :func:`random_weights` and :func:`test_image`
  (the functions below, imported by the generator so both sides use the same numbers), reduced to an 8×8 average
  pool. Our module must reproduce it; nothing in it comes from ``atelier``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from atelier import birefnet
from atelier.birefnet import BiRefNetConfig, build_birefnet, describe, is_birefnet_state_dict
from atelier.errors import InputError, ModelFileError

DATA = Path(__file__).parent / "data"
VARIANTS = {"rmbg2": "swin_v1_l", "general": "swin_v1_l", "lite": "swin_v1_t"}


def official_shapes(variant: str) -> dict[str, list[int]]:
    return json.loads((DATA / f"birefnet_keys_{variant}.json").read_text(encoding="utf-8"))["tensors"]


def meta_state(variant: str) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for a checkpoint's tensors (integer buffers as int64, like the files)."""
    integer = ("relative_position_index", "num_batches_tracked")
    return {k: torch.empty(v, device="meta", dtype=torch.long if k.endswith(integer) else torch.float32)
            for k, v in official_shapes(variant).items()}


def random_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for every tensor but the Swin relative-position index (a fixed function of the
    window); scaled so a random BiRefNet stays finite and its deformable offsets move by about a pixel."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if name.endswith("relative_position_index"):
            continue
        if name.endswith("num_batches_tracked"):
            out[name] = torch.zeros(shape, dtype=torch.long)
            continue
        if name.endswith("running_var"):
            out[name] = 0.5 + torch.rand(shape, generator=g)
            continue
        r = torch.randn(shape, generator=g)
        if name.endswith("running_mean"):
            out[name] = 0.1 * r
        elif len(shape) == 1 and name.endswith(".weight"):   # LayerNorm / BatchNorm scale
            out[name] = 1.0 + 0.1 * r
        elif name.endswith(".bias"):
            out[name] = 0.05 * r
        elif name.endswith("relative_position_bias_table"):
            out[name] = 0.5 * r
        else:
            out[name] = r / math.sqrt(math.prod(shape[1:]))
    return out


def test_image(size: int, seed: int) -> torch.Tensor:
    """A smooth random 1×3×size×size 'ImageNet-normalised' image."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 3, size // 8, size // 8, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


test_image.__test__ = False  # a helper, not a test


def relative_position_index(window: int) -> torch.Tensor:
    """Swin's index, written out independently of atelier: (dy + w − 1)·(2w − 1) + (dx + w − 1)."""
    n = window * window
    idx = torch.empty(n, n, dtype=torch.long)
    for q in range(n):
        for k in range(n):
            dy, dx = q // window - k // window, q % window - k % window
            idx[q, k] = (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
    return idx


def full_random_state(variant: str, seed: int) -> dict[str, torch.Tensor]:
    shapes = official_shapes(variant)
    sd = random_weights(shapes, seed)
    for name, shape in shapes.items():
        if name.endswith("relative_position_index"):
            sd[name] = relative_position_index(math.isqrt(shape[0]))
    return sd


# ------------------------------------------------------------------------------------------------ key sets


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_module_has_exactly_the_official_tensors(variant):
    model = build_birefnet(config=BiRefNetConfig.preset(VARIANTS[variant]), device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = official_shapes(variant)
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_is_recognised_from_the_shapes(variant):
    sd = meta_state(variant)
    cfg = birefnet.config_from_state_dict(sd)
    assert cfg == BiRefNetConfig.preset(VARIANTS[variant])
    assert is_birefnet_state_dict(sd)
    assert is_birefnet_state_dict("_orig_mod." + k for k in sd)  # torch.compile'd training saves
    text = describe(sd)
    assert ("Swin-L" if variant != "lite" else "Swin-T (BiRefNet_lite)") in text
    assert ("220.2 M" if variant != "lite" else "44.3 M") in text


def test_other_files_are_refused_with_a_teaching_error():
    assert not is_birefnet_state_dict(["model.diffusion_model.x.weight", "decoder.conv_out1.0.weight"])
    with pytest.raises(ModelFileError) as err:
        build_birefnet({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)})
    assert "BiRefNet checkpoint" in err.value.expected
    assert "first_stage_model.decoder.conv_in.weight" in err.value.received
    assert "RMBG-2.0" in err.value.fix
    assert describe({"a.weight": torch.zeros(2)}).startswith("not a BiRefNet checkpoint")


def test_an_incomplete_file_names_what_is_missing():
    sd = meta_state("lite")
    del sd["decoder.ipt_blk3.conv_out.weight"]
    sd["decoder.conv_out1.0.bias"] = torch.empty(2, device="meta")
    with pytest.raises(ModelFileError) as err:
        build_birefnet(sd)
    assert "1 missing: decoder.ipt_blk3.conv_out.weight" in err.value.received
    assert "decoder.conv_out1.0.bias (2,) (expected (1,))" in err.value.received
    assert "Swin-T" in err.value.expected


# -------------------------------------------------------------------------------------- parity with upstream


def _reference(case: str) -> dict:
    return json.loads((DATA / "birefnet_reference.json").read_text(encoding="utf-8"))["cases"][case]


@pytest.mark.parametrize("case", ["lite_patch_major", "lite_channel_major"])
def test_forward_matches_upstream_on_random_weights(case):
    ref = _reference(case)
    sd = random_weights(official_shapes(ref["variant"]), ref["seed"])
    model = build_birefnet(sd, patch_order=ref["patch_order"])   # index left out: recomputed
    with torch.inference_mode():
        out = model(test_image(ref["size"], ref["seed"]))
    assert out.shape == (1, 1, ref["size"], ref["size"])
    pooled = F.adaptive_avg_pool2d(out, 8)[0, 0]
    want = torch.tensor(ref["pooled8"])
    scale = want.abs().max().item()
    assert torch.allclose(pooled, want, rtol=1e-4, atol=1e-4 * scale), (pooled - want).abs().max()
    assert out.std().item() == pytest.approx(ref["std"], rel=1e-3)


def test_patch_orders_differ_only_in_the_tile_stacking():
    image = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)
    a = birefnet.image_tiles(image, 4, 4, "patch_major")
    b = birefnet.image_tiles(image, 4, 4, "channel_major")
    assert a.shape == b.shape == (2, 3 * 2 * 3, 4, 4)
    # patch_major: column by column, each tile's three colours together
    assert torch.equal(a[:, 3:6], image[:, :, 4:8, 0:4])
    # channel_major: red plane's tiles row by row first
    assert torch.equal(b[:, 1], image[:, 0, 0:4, 4:8])
    assert torch.equal(b[:, 6], image[:, 1, 0:4, 0:4])


def test_recomputed_relative_position_index_is_swins():
    assert torch.equal(birefnet.WindowAttention(8, 2, 7).relative_position_index, relative_position_index(7))
    assert torch.equal(birefnet.WindowAttention(8, 2, 12).relative_position_index, relative_position_index(12))


def test_bfloat16_runs():
    """torchvision's deformable convolution has no bfloat16 kernel (CPU or CUDA); that op runs in float32.
    (float16 has kernels; on an H100 it gave logits within 5e-4 of float32 CPU on random Swin-L weights.)"""
    model = build_birefnet(random_weights(official_shapes("lite"), 1))
    image = test_image(32, 1)
    with torch.inference_mode():
        want = model(image)
        got = model.to(torch.bfloat16)(image.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_input_size_must_be_a_multiple_of_32():
    model = build_birefnet(config=BiRefNetConfig.preset("swin_v1_t"))
    with pytest.raises(InputError, match="multiples of 32"):
        model(torch.zeros(1, 3, 100, 96))


# ------------------------------------------------------------------------------------------------- files


def test_loads_strictly_from_a_safetensors_file(tmp_path):
    sd = full_random_state("lite", seed=3)
    path = tmp_path / "model.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, str(path))

    from safetensors.torch import load_file
    loaded = load_file(str(path))
    assert describe(loaded).endswith("float16")
    model = build_birefnet(loaded)
    assert model.config == BiRefNetConfig.preset("swin_v1_t") and not model.training
    ours = model.state_dict()
    assert set(ours) == set(sd)
    for k, v in sd.items():
        want = v.half().float() if v.is_floating_point() else v
        assert torch.equal(ours[k], want), k
    with torch.inference_mode():
        assert torch.isfinite(model(test_image(32, 0))).all()
