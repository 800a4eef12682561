"""The VLM captioner on a real CUDA GPU with the tiny Qwen2.5-VL: every quantization × offload, parity with plain
``model.generate``, Stop, and memory release. The tokenizer comes from $ATELIER_QWEN_TOKENIZER where the machine has
no ComfyUI tree (see tests/harness/tiny_vlm.py)."""

from __future__ import annotations

import gc

import pytest
import torch

from atelier import captioner, prompts
from tests.harness import tiny_vlm

pytestmark = pytest.mark.gpu

MiB = 1024**2


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tiny_vlm.build("qwen2_5_vl", tmp_path_factory.mktemp("gpu_vlm") / "tiny-qwen2_5_vl")


def _image(seed=0):
    return torch.randint(0, 256, (1, 40, 60, 3), generator=torch.Generator().manual_seed(seed)).float() / 255


@pytest.mark.parametrize("offload", ["none", "model", "auto"])
@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_combo_generates_and_releases(vlm_dir, quantization, offload):
    for dtype in (torch.float32, torch.bfloat16):  # cuBLAS's workspace (32 MiB on Hopper) is not ours to count
        x = torch.ones(64, 64, device="cuda", dtype=dtype)
        (x @ x).sum().item()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    spec = captioner.VLMSpec(path=str(vlm_dir), quantization=quantization, offload=offload, device="cuda")
    handle = captioner.make_handle(spec)
    assert handle.offload in ("none", "model") and handle.dtype == "bf16"
    # a 4 MiB GPU share under offload=model (the model is ~10 MiB in bf16, its 9.3 MiB embedding first): nothing
    # fits, so the model stays in RAM (real splits are measured in benchmarks/bench_vlm.py at full size)
    vlm = captioner.load(handle, max_gpu_bytes=4 * MiB if offload == "model" else None)
    try:
        if offload == "model" and quantization == "nf4":  # bitsandbytes cannot stream 4-bit layers
            assert vlm.offload == "none" and any("nf4 weights stay on the GPU" in n for n in vlm.notes), vlm.notes
        elif offload == "model":
            assert any("in RAM" in n for n in vlm.notes), vlm.notes
        a = captioner.caption(vlm, _image(), "caption", max_new_tokens=6)
        b = captioner.caption(vlm, _image(), "caption", max_new_tokens=6)
        assert a[0].tokens == 6 and a[0].text == b[0].text  # greedy: the same text twice
        assert vlm.resident_bytes > 0
    finally:
        vlm.close()
    del vlm
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - base < 2 * MiB


def test_fp32_gpu_equals_model_generate(vlm_dir):
    import transformers

    vlm = captioner.load(captioner.make_handle(captioner.VLMSpec(path=str(vlm_dir), dtype="fp32", offload="none", device="cuda")))
    try:
        [reply] = captioner.caption(vlm, _image(3), "background_analysis", max_new_tokens=10)
    finally:
        vlm.close()
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).cuda()
    processor = transformers.AutoProcessor.from_pretrained(vlm_dir)
    text = processor.apply_chat_template(prompts.build_messages("background_analysis"), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[captioner.to_pil(_image(3)[0])], return_tensors="pt").to("cuda")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    want = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert reply.text == want


def test_stop_ends_generation_on_gpu(vlm_dir):
    class Stop(Exception):
        pass

    class StopAfter3:
        calls = 0

        def step(self, n=1):
            self.calls += 1
            if self.calls == 3:
                raise Stop()

    vlm = captioner.load(captioner.make_handle(captioner.VLMSpec(path=str(vlm_dir), device="cuda", offload="none")))
    progress = StopAfter3()
    try:
        with pytest.raises(Stop):
            captioner.caption(vlm, _image(), "caption", max_new_tokens=500, progress=progress)
        assert progress.calls == 3
        assert captioner.caption(vlm, _image(), "caption", max_new_tokens=3)[0].tokens == 3
    finally:
        vlm.close()
