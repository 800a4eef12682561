"""SAM2 on a real CUDA GPU: every dtype runs (weights stored in that dtype, compute under autocast), fp32 masks
match Meta's predictor on the same GPU, and releasing the model gives its VRAM back."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from atelier import segmenter, stage
from atelier.registry import REGISTRY
from tests.harness import tiny_sam2

pytestmark = pytest.mark.gpu
log = logging.getLogger("atelier.tests")

PROMPTS = dict(points='[{"x": 20, "y": 22}]', negative_points="[[60, 4]]", boxes="[[6, 8, 34, 36], [36, 24, 62, 46]]")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_sam2.write_checkpoints(tmp_path_factory.mktemp("sam2_gpu"))


@pytest.fixture(autouse=True)
def clean():
    REGISTRY.release_all()
    yield
    REGISTRY.release_all()


def _image() -> torch.Tensor:
    return torch.from_numpy(tiny_sam2.example_image().astype(np.float32) / 255.0)[None]


def _iou(a, b) -> float:
    a, b = a > 0.5, b > 0.5
    u = (a | b).sum().item()
    return 1.0 if u == 0 else (a & b).sum().item() / u


def test_fp32_on_the_gpu_equals_the_predictor_on_the_gpu(ckpt):
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    prompts = segmenter.parse_prompts(**PROMPTS)
    model = stage.get(segmenter.STAGE, segmenter.make_handle(segmenter.SAM2Spec(str(ckpt["pt"]), "fp32", "cuda")))
    got = segmenter.segment(model, _image(), prompts)
    ref = SAM2ImagePredictor(build_sam2(tiny_sam2.CONFIG, str(ckpt["pt"]), device="cuda"))
    ref.set_image(tiny_sam2.example_image().astype(np.float32) / 255.0)
    for g, (coords, labels, box) in zip(got, prompts.objects(), strict=True):
        masks, _, _ = ref.predict(point_coords=coords, point_labels=labels, box=box, multimask_output=False)
        assert torch.equal(g, torch.from_numpy(masks[0].astype(np.float32)))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "auto"])
def test_half_precision_runs_with_half_weights(ckpt, dtype):
    prompts = segmenter.parse_prompts(**PROMPTS)
    full = segmenter.segment(stage.get(segmenter.STAGE, segmenter.make_handle(
        segmenter.SAM2Spec(str(ckpt["pt"]), "fp32", "cuda"))), _image(), prompts)
    handle = segmenter.make_handle(segmenter.SAM2Spec(str(ckpt["safetensors"]), dtype, "cuda"))
    model = stage.get(segmenter.STAGE, handle)
    assert {p.dtype for p in model.sam.parameters()} == {segmenter.resolve_dtype(handle.dtype, "cuda")}
    assert model.resident_bytes < 38_962_754 * 4 * 0.6
    assert segmenter.segment(model, _image(), prompts, multimask=True).shape == full.shape
    got = segmenter.segment(model, _image(), prompts)
    ious = [_iou(a, b) for a, b in zip(got, full, strict=True)]
    log.info("SAM2 %s on %s: IoU with fp32 per object %s", handle.dtype, torch.cuda.get_device_name(0), ious)
    assert min(ious) > 0.9


def test_release_gives_the_vram_back(ckpt):
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = stage.get(segmenter.STAGE, segmenter.make_handle(segmenter.SAM2Spec(str(ckpt["pt"]), "fp32", "cuda")))
    segmenter.segment(model, _image(), segmenter.parse_prompts(**PROMPTS))
    assert torch.cuda.memory_allocated() - before > 100 * 1024**2
    del model
    REGISTRY.release_all()
    assert torch.cuda.memory_allocated() - before < 8 * 1024**2
