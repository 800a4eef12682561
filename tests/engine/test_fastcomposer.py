"""FastComposer engine on tiny random weights in the official checkpoint layout (tests/harness/tiny_fastcomposer.py).

Parity: alpha 1 = plain diffusers StableDiffusionPipeline on the prompt without markers; alpha 0 = the same with
prompt_embeds = the fused embeddings; the fused embeddings = an independent numpy implementation of the paper's
fusion applied to plain transformers' text and image embeddings; the step where the embeddings switch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atelier import fastcomposer as fc
from atelier import stage
from atelier.errors import InputError, ModelFileError
from atelier.progress import NullProgress
from tests.harness import tiny_fastcomposer as tf

PROMPT = "a man <subject> and a woman <subject> at the beach"
PLAIN = PROMPT.replace("<subject>", "")
SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tf.shared_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model(tiny):
    spec = fc.make_spec(str(tiny["checkpoint"]), str(tf.tokenizer_dir()))
    m = fc.load(fc.make_handle(spec, None))
    yield m
    m.close()


@pytest.fixture(scope="module")
def reference(tiny):
    return tf.reference_pipeline(tiny["reference_sd"])


@pytest.fixture(scope="module")
def subjects():
    """Two 32×32 pictures: the tiny encoder's own input size, so preprocessing is CLIP normalisation alone."""
    g = torch.Generator().manual_seed(3)
    return torch.rand(2, 32, 32, 3, generator=g)


def _plain(reference, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        out = reference(negative_prompt="", guidance_scale=5.0, num_inference_steps=3, width=SIZE, height=SIZE,
                        generator=torch.Generator("cpu").manual_seed(7), output_type="pt", **kwargs).images
    return out.permute(0, 2, 3, 1).float()


def _ours(model, subjects, alpha, progress=None) -> torch.Tensor:
    return fc.generate(model, PROMPT, subjects, negative_prompt="", alpha=alpha, steps=3, guidance=5.0, seed=7,
                       width=SIZE, height=SIZE, progress=progress)


# ------------------------------------------------------------------------------------------------ loading


def test_official_layout_has_no_missing_or_unexpected_keys(tiny):
    keys = fc._read_keys(tiny["checkpoint"])
    assert {k.split(".")[0] for k in keys} == set(fc.PARTS)
    assert any(".attentions.0.query." in k for k in keys), "the tiny file uses diffusers < 0.15 VAE names"
    plan = fc.plan_keys(keys, fc.expected_keys(fc.part_configs(tiny["checkpoint"])), base_available=False)
    assert plan.missing == [] and plan.unexpected == [] and plan.from_base == ()
    assert plan.ignored == 2  # the two position_ids buffers transformers 4.25 saved
    assert sum(len(m) for m in plan.mapping.values()) == len(keys) - 2


def test_safetensors_with_the_same_keys_loads_the_same_weights(tiny, tmp_path, model):
    from safetensors.torch import save_file

    sd = torch.load(tiny["checkpoint"], weights_only=True)
    path = tmp_path / "fastcomposer.safetensors"
    save_file(sd, str(path))
    tf.write_sidecar(path)
    parts, plan = fc.load_parts(fc.make_spec(str(path), str(tf.tokenizer_dir())), torch.float32)
    assert plan.missing == [] and plan.unexpected == []
    for a, b in zip(parts["unet"].state_dict().values(), model.pipe.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_loaded_parts_equal_the_reference_modules(model, tiny, reference):
    from transformers import CLIPVisionModelWithProjection

    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(model.pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert set(ours) == set(ref)
        assert all(torch.equal(ours[k], ref[k]) for k in ours), name
    img = CLIPVisionModelWithProjection.from_pretrained(str(tiny["reference_image_encoder"])).state_dict()
    ours = model.pipe.image_encoder.state_dict()
    assert set(ours) == set(img) and all(torch.equal(ours[k], img[k]) for k in ours)


# ------------------------------------------------------------------------------------------------ fusion


def _layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


_erf = np.vectorize(math.erf)


def _mlp(x, w, prefix, residual):
    h = _layer_norm(x, w[f"{prefix}.layernorm.weight"], w[f"{prefix}.layernorm.bias"])
    h = h @ w[f"{prefix}.fc1.weight"].T + w[f"{prefix}.fc1.bias"]
    h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))  # exact GELU
    h = h @ w[f"{prefix}.fc2.weight"].T + w[f"{prefix}.fc2.bias"]
    return h + x if residual else h


def numpy_fuse(text, subject, w):
    """The paper's fusion, from the released weights: LN(MLP2(MLP1([t; s]) + t)), MLP2 with its residual."""
    h = _mlp(np.concatenate([text, subject], -1), w, "mlp1", residual=False) + text
    h = _mlp(h, w, "mlp2", residual=True)
    return _layer_norm(h, w["layer_norm.weight"], w["layer_norm.bias"])


def _postfuse_weights(tiny):
    sd = torch.load(tiny["checkpoint"], weights_only=True)
    return {k[len("postfuse_module."):]: v.double().numpy() for k, v in sd.items() if k.startswith("postfuse_module.")}


def test_fusion_mlp_equals_numpy_implementation(model, tiny):
    w = _postfuse_weights(tiny)
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(5, tf.WIDTH)), rng.normal(size=(5, tf.WIDTH))
    with torch.inference_mode():
        ours = model.postfuse(torch.tensor(t, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)).double()
    delta = np.abs(ours.numpy() - numpy_fuse(t, s, w)).max()
    assert delta < 2e-5, delta


def test_prompt_markers_name_the_word_before():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tf.tokenizer_dir()), model_max_length=77)
    parsed = fc.parse_prompt(tok, PROMPT, 2)
    ids = tok(PLAIN).input_ids
    assert parsed.words == ("man", "woman")
    assert [tok.convert_ids_to_tokens(ids[p]) for p in parsed.positions] == ["man</w>", "woman</w>"]
    assert tok(parsed.text).input_ids == ids  # the text-only prompt is the prompt without markers


def test_fused_embeddings_equal_independent_computation(model, tiny, reference, subjects):
    """Text-only = plain diffusers' encode_prompt; at the marked words: numpy fusion with the image embeddings of
    plain transformers' CLIPVisionModelWithProjection; everywhere else untouched."""
    from transformers import CLIPVisionModelWithProjection

    cond = fc.encode(model, PROMPT, subjects, negative_prompt="", guidance=5.0)
    with torch.inference_mode():
        text, negative = reference.encode_prompt(PLAIN, "cpu", 1, True, "")
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(tiny["reference_image_encoder"]))
        mean = torch.tensor(fc.CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(fc.CLIP_STD).view(1, 3, 1, 1)
        image = encoder(pixel_values=(subjects.permute(0, 3, 1, 2) - mean) / std).image_embeds
    assert torch.equal(cond.text, text) and torch.equal(cond.negative, negative)
    pos = list(cond.prompt.positions)
    assert pos == [2, 5]
    others = [i for i in range(77) if i not in pos]
    assert torch.equal(cond.fused[0, others], text[0, others])
    expected = numpy_fuse(text[0, pos].double().numpy(), image.double().numpy(), _postfuse_weights(tiny))
    delta = np.abs(cond.fused[0, pos].double().numpy() - expected).max()
    assert delta < 2e-5, delta
    assert np.abs(expected - text[0, pos].double().numpy()).max() > 0.1, "the fusion must change the words"


# ------------------------------------------------------------------------------------------------ parity


def test_alpha_one_equals_plain_sd_on_the_prompt_without_markers(model, reference, subjects):
    progress = NullProgress()
    ours = _ours(model, subjects, 1.0, progress)
    plain = _plain(reference, prompt=PLAIN)
    delta = (ours - plain).abs().max().item()
    assert delta <= 1e-6, delta
    assert progress.done == 3


def test_alpha_zero_equals_plain_sd_with_the_fused_embeddings(model, reference, subjects):
    cond = fc.encode(model, PROMPT, subjects, negative_prompt="", guidance=5.0)
    ours = _ours(model, subjects, 0.0)
    plain = _plain(reference, prompt_embeds=cond.fused)
    delta = (ours - plain).abs().max().item()
    assert delta <= 1e-6, delta
    assert (ours - _plain(reference, prompt=PLAIN)).abs().max().item() > 1e-3, "fusing must change the picture"


def test_delayed_conditioning_switches_after_alpha_of_the_steps(model, subjects):
    """4 steps, alpha 0.5: the UNet sees the text-only prompt for 2 denoising steps, then the fused one (PNDM
    runs 5 UNet calls for 4 steps: its second timestep twice)."""
    cond = fc.encode(model, PROMPT, subjects, negative_prompt="", guidance=5.0)
    seen = []
    hook = model.pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((int(args[1]), kwargs["encoder_hidden_states"][1:].clone())),
        with_kwargs=True)
    progress = NullProgress()
    try:
        fc.generate(model, PROMPT, subjects, alpha=0.5, steps=4, guidance=5.0, seed=1, width=SIZE, height=SIZE,
                    progress=progress)
    finally:
        hook.remove()
    assert progress.done == 4
    distinct = sorted({t for t, _ in seen}, reverse=True)
    assert len(distinct) == 4 and len(seen) == 5
    for t, embeds in seen:
        want = cond.text if t in distinct[:2] else cond.fused
        assert torch.equal(embeds, want), t


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("prompt, n, words", [
    ("a man <subject> and a woman at the beach", 2, ["2 pictures", "1 markers"]),
    ("<subject> a man at the beach", 1, ["start of the prompt"]),
    ("a man <subject><subject> at the beach", 2, ["after another marker"]),
    ("a man at the beach", 1, ["<subject>"]),
    ("a man <subject> " + "very " * 80 + "tall", 1, ["77", "tokens"]),
])
def test_prompt_errors(model, prompt, n, words):
    with pytest.raises(InputError) as e:
        fc.generate(model, prompt, torch.rand(n, 32, 32, 3), steps=1, width=SIZE, height=SIZE)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_tiny_subject_picture_is_refused(model):
    with pytest.raises(InputError, match="1×1"):
        fc.generate(model, "a man <subject>", torch.rand(1, 1, 1, 3), steps=1, width=SIZE, height=SIZE)


def test_masks_crop_to_the_subject(model):
    """A mask picks the subject: the encoder sees its box on black, whatever lies outside."""
    img = torch.rand(1, 48, 64, 3)
    mask = torch.zeros(1, 48, 64)
    mask[0, 8:40, 16:48] = 1
    other = img.clone()
    other[0, :, :10] = 0.3  # outside the mask: must not matter
    a = fc.encode_subjects(model, img, mask)
    b = fc.encode_subjects(model, other, mask)
    assert torch.equal(a, b)
    c = fc.encode_subjects(model, img[:, 8:40, 16:48])
    assert (a - c).abs().max().item() < 1e-5
    with pytest.raises(InputError, match="empty mask"):
        fc.encode_subjects(model, img, torch.zeros(1, 48, 64))


def test_checkpoint_of_another_model_lists_keys_by_prefix(tmp_path):
    path = tf.write_other_model(tmp_path / "v1-5-pruned.bin")
    with pytest.raises(ModelFileError) as e:
        fc.make_handle(fc.make_spec(str(path), str(tf.tokenizer_dir())), None)
    text = str(e.value)
    for prefix in ("model.*", "first_stage_model.*", "cond_stage_model.*", "unexpected 4 keys", "missing",
                   "unet.", "postfuse_module.", "image_encoder."):
        assert prefix in text, (prefix, text)


def test_slim_checkpoint_without_base_says_to_pick_one(tiny, tmp_path):
    sd = torch.load(tiny["checkpoint"], weights_only=True)
    slim = {k: v for k, v in sd.items() if k.startswith(("image_encoder.", "postfuse_module.", "unet."))}
    path = tmp_path / "fastcomposer-slim.bin"
    torch.save(slim, path)
    tf.write_sidecar(path)
    with pytest.raises(ModelFileError) as e:
        fc.make_handle(fc.make_spec(str(path), str(tf.tokenizer_dir())), None)
    assert "vae, text_encoder" in str(e.value) and "base" in str(e.value)


def test_stage_registry_reuses_the_model(tiny, clean_registry):
    spec = fc.make_spec(str(tiny["checkpoint"]), str(tf.tokenizer_dir()))
    handle = fc.STAGE.make_handle(spec, None)
    m = stage.get(fc.STAGE, handle)
    assert stage.get(fc.STAGE, handle) is m and m.postfuse is not None
    assert clean_registry.release(spec) and m.pipe is None and m.postfuse is None
    with pytest.raises(Exception, match="released"):
        fc.generate(m, PROMPT, torch.rand(2, 32, 32, 3), steps=1, width=SIZE, height=SIZE)
