"""Depth estimation parity: tiny random Depth Anything and DPT folders (save_pretrained) through atelier.depth give
what transformers' own depth-estimation pipeline gives on the same picture."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from atelier import depth
from atelier.errors import ModelFileError
from tests.harness import tiny_depth

log = logging.getLogger("atelier.tests.depth")


@pytest.fixture(scope="module", params=["depth_anything", "dpt"])
def folder(request, tmp_path_factory):
    build = tiny_depth.build_depth_anything if request.param == "depth_anything" else tiny_depth.build_dpt
    return build(tmp_path_factory.mktemp("depth") / request.param)


def _picture(h=40, w=60, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_parity_with_the_transformers_pipeline(folder):
    from transformers import pipeline

    model = depth.load(depth.make_handle(depth.DepthSpec(path=str(folder))))
    rgbs = [_picture(seed=0), _picture(seed=1)]
    image = torch.from_numpy(np.stack(rgbs).astype(np.float32) / 255.0)
    ours = depth.estimate(model, image)
    assert ours.shape == (2, 40, 60, 3) and torch.equal(ours[..., 0], ours[..., 2])
    pipe = pipeline("depth-estimation", model=str(folder))
    for i, rgb in enumerate(rgbs):
        ref = pipe(Image.fromarray(rgb))
        d = ref["predicted_depth"].float().numpy()
        d = (d - d.min()) / (d.max() - d.min())
        delta = float(np.abs(ours[i, ..., 0].numpy() - d).max())
        delta_png = float(np.abs(ours[i, ..., 0].numpy() - np.asarray(ref["depth"]) / 255.0).max())
        log.info("%s picture %d: max |ours - pipeline predicted_depth (normalised)| = %.2e; vs its 8-bit depth "
                 "picture %.4f", folder.name, i, delta, delta_png)
        assert delta < 1e-5 and delta_png <= 1 / 255 + 1e-6
        assert float(ours[i].min()) == 0.0 and float(ours[i].max()) == pytest.approx(1.0)


def test_resolution_is_what_the_model_sees(folder):
    model = depth.load(depth.make_handle(depth.DepthSpec(path=str(folder))))
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kw: seen.append(tuple(kw["pixel_values"].shape)),
                                                 with_kwargs=True)
    try:
        image = torch.from_numpy(_picture(56, 56).astype(np.float32) / 255.0)[None]
        a = depth.estimate(model, image, resolution=0)
        b = depth.estimate(model, image, resolution=112)
    finally:
        hook.remove()
    assert seen[0][-1] != 112 and seen[1][-2:] == (112, 112)
    assert a.shape == b.shape == (1, 56, 56, 3)


def test_missing_and_wrong_folders_are_clear_errors(folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="config.json.*model.safetensors"):
        depth.make_handle(depth.DepthSpec(path=str(empty)))
    (empty / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    (empty / "preprocessor_config.json").write_text("{}")
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelFileError, match=r"\.bin files are not read"):
        depth.make_handle(depth.DepthSpec(path=str(empty)))
    (empty / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="depth-estimation model"):
        depth.make_handle(depth.DepthSpec(path=str(empty)))
    assert depth.is_depth_folder(folder) and not depth.is_depth_folder(empty)
