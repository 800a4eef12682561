"""The VLM captioner engine: reply parsing (pure), prompt building, folder checks, and generation on tiny random
Qwen2-VL / Qwen2.5-VL folders compared with plain ``model.generate`` on the same processed inputs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from atelier import analysis, captioner, prompts
from atelier.analysis import clean_reply, parse_analysis
from atelier.errors import InputError, ModelFileError, SettingError
from atelier.progress import NullProgress
from atelier.prompts import analysis_prompt
from tests.harness import tiny_vlm

KEYS = ["scene", "lighting", "light_direction", "palette", "mood", "camera", "placement", "found"]

GOOD = """{
  "scene": "A sunlit kitchen with a wooden table.",
  "lighting": "warm afternoon daylight",
  "light_direction": "left",
  "palette": ["honey brown", "cream", "#2E5E4E"],
  "mood": "cosy",
  "camera": "eye level, 35mm, slight high angle",
  "placement": {"x": 0.35, "y": 0.55, "w": 0.3, "h": 0.35}
}"""


# ------------------------------------------------------------------------------------------- parse_analysis


def test_a_clean_json_reply_is_read_whole():
    a = parse_analysis(GOOD)
    assert list(a) == KEYS
    assert a["scene"] == "A sunlit kitchen with a wooden table."
    assert a["lighting"] == "warm afternoon daylight" and a["light_direction"] == "left"
    assert a["palette"] == ["honey brown", "cream", "#2E5E4E"]
    assert a["mood"] == "cosy" and a["camera"] == "eye level, 35mm, slight high angle"
    assert a["placement"] == {"x": 0.35, "y": 0.55, "w": 0.3, "h": 0.35}
    assert a["found"] == KEYS[:-1]
    json.dumps(a)  # what the node outputs


@pytest.mark.parametrize("wrap", [
    "```json\n{}\n```",
    "Sure! Here is the analysis:\n```\n{}\n```\nLet me know if you need more.",
    "Analysis: {} -- the object should go on the table.",
    "{}\n\nNote: the light is soft.",
])
def test_code_fences_and_text_around_the_json_are_ignored(wrap):
    assert parse_analysis(wrap.replace("{}", GOOD)) == parse_analysis(GOOD)


def test_python_style_quotes_trailing_commas_and_unquoted_keys_are_repaired():
    a = parse_analysis("{'scene': 'a beach', 'mood': 'calm', 'palette': ['blue', 'sand'],}")
    assert a["scene"] == "a beach" and a["mood"] == "calm" and a["palette"] == ["blue", "sand"]
    b = parse_analysis('{scene: "a street at night", lighting: "neon", placement: {x: 0.1, y: 0.5, w: 0.2, h: 0.3},}')
    assert b["scene"] == "a street at night" and b["lighting"] == "neon"
    assert b["placement"] == {"x": 0.1, "y": 0.5, "w": 0.2, "h": 0.3}


def test_a_reply_cut_off_at_max_new_tokens_keeps_the_complete_fields():
    cut = GOOD[: GOOD.index('"mood"') + len('"mood": "co')]
    a = parse_analysis(cut)
    assert a["scene"] == "A sunlit kitchen with a wooden table." and a["palette"] == ["honey brown", "cream", "#2E5E4E"]
    assert a["mood"] == "" and "mood" not in a["found"]  # the half-written value is dropped, not kept as "co"
    assert a["placement"] == analysis.DEFAULT_PLACEMENT and "placement" not in a["found"]
    b = parse_analysis('{"scene": "a kitchen", "palette": ["red", "ye')
    assert b["palette"] == ["red"]


def test_key_value_lines_and_markdown_are_read_when_there_is_no_json():
    text = """Here is what I see.
- **Lighting**: soft overcast light
- **Light direction**: from the right
* Colours: grey, moss green and white
Mood = quiet
Perspective: low angle, wide lens
Placement: x=0.6, y=0.5, w=0.25, h=0.4
"""
    a = parse_analysis(text)
    assert a["lighting"] == "soft overcast light" and a["light_direction"] == "from the right"
    assert a["palette"] == ["grey", "moss green", "white"]
    assert a["mood"] == "quiet" and a["camera"] == "low angle, wide lens"
    assert a["placement"] == {"x": 0.6, "y": 0.5, "w": 0.25, "h": 0.4}
    assert a["scene"] == "" and set(a["found"]) == {"lighting", "light_direction", "palette", "mood", "camera",
                                                    "placement"}


def test_yaml_style_lists_aliases_and_nested_wrappers():
    a = parse_analysis("palette:\n  - red\n  - gold\nmood: festive\n")
    assert a["palette"] == ["red", "gold"] and a["mood"] == "festive"
    b = parse_analysis('{"analysis": {"description": "a forest", "colors": "green, brown", "viewpoint": "top-down",'
                       ' "lighting": {"type": "dappled sunlight", "direction": "above"}}}')
    assert b["scene"] == "a forest" and b["palette"] == ["green", "brown"] and b["camera"] == "top-down"
    assert b["lighting"] == "type: dappled sunlight" and b["light_direction"] == "above"
    c = parse_analysis('{"palette": [{"name": "navy", "hex": "#001F3F"}, {"hex": "#FFFFFF"}]}')
    assert c["palette"] == ["navy (#001F3F)", "#FFFFFF"]


@pytest.mark.parametrize("placement, expected", [
    ('[0.1, 0.2, 0.3, 0.4]', {"x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}),
    ('{"x": "30%", "y": "50%", "w": "20%", "h": "40%"}', {"x": 0.3, "y": 0.5, "w": 0.2, "h": 0.4}),
    ('{"x": 30, "y": 50, "w": 20, "h": 40}', {"x": 0.3, "y": 0.5, "w": 0.2, "h": 0.4}),
    ('{"x0": 0.2, "y0": 0.3, "x1": 0.6, "y1": 0.9}', {"x": 0.2, "y": 0.3, "w": 0.4, "h": 0.6}),
    ('[0.5, 0.6, 0.9, 0.95]', {"x": 0.5, "y": 0.6, "w": 0.4, "h": 0.35}),  # corners: x+w would leave the image
    ('{"x": 0.9, "y": 0.9, "w": 0.5, "h": 0.5}', {"x": 0.5, "y": 0.5, "w": 0.5, "h": 0.5}),  # moved inside
    ('{"left": 0.1, "top": 0.2, "width": 0.3, "height": 0.4}', {"x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}),
])
def test_placement_forms_are_normalised_to_fractions(placement, expected):
    a = parse_analysis('{"placement": %s}' % placement)
    assert a["placement"] == pytest.approx(expected) and a["found"] == ["placement"]


def test_pixel_placements_and_nonsense_fall_back_to_the_default_region():
    for bad in ('{"x": 640, "y": 300, "w": 200, "h": 400}', '"left side"', "[1, 2]", "null", '{"x": true}'):
        a = parse_analysis('{"mood": "calm", "placement": %s}' % bad)
        assert a["placement"] == analysis.DEFAULT_PLACEMENT and a["found"] == ["mood"], bad


def test_a_reply_with_no_field_keeps_its_text_as_the_scene():
    a = parse_analysis("A quiet street after the rain, reflections everywhere.")
    assert a["found"] == [] and a["scene"] == "A quiet street after the rain, reflections everywhere."
    assert a["palette"] == [] and a["placement"] == analysis.DEFAULT_PLACEMENT
    for empty in ("", None, "   "):
        e = parse_analysis(empty)
        assert list(e) == KEYS and e["found"] == [] and e["scene"] == ""


def test_korean_values_and_keys():
    a = parse_analysis('{"scene": "햇살이 드는 부엌", "lighting": "따뜻한 오후 햇빛", "light_direction": "왼쪽", '
                       '"palette": ["갈색", "크림색"], "mood": "아늑함", "camera": "눈높이", '
                       '"placement": {"x": 0.3, "y": 0.5, "w": 0.3, "h": 0.4}}')
    assert a["scene"] == "햇살이 드는 부엌" and a["palette"] == ["갈색", "크림색"] and len(a["found"]) == 7
    b = parse_analysis("조명: 부드러운 빛\n분위기: 차분함\n색감: 회색, 초록")
    assert b["lighting"] == "부드러운 빛" and b["mood"] == "차분함" and b["palette"] == ["회색", "초록"]
    assert json.loads(analysis.analysis_json(a))["scene"] == "햇살이 드는 부엌"  # readable, not \\u escapes
    assert "햇살" in analysis.analysis_json(a)


def test_parse_analysis_never_raises_on_junk():
    rng = random.Random(0)
    alphabet = '{}[]":,\'` \n-*xywh0123456789.%abc lighting palette placement mood 조명'
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        a = parse_analysis(text)
        assert list(a) == KEYS
        p = a["placement"]
        assert 0 <= p["x"] <= 1 - p["w"] + 1e-9 and 0 <= p["y"] <= 1 - p["h"] + 1e-9
        assert all(isinstance(c, str) for c in a["palette"])
        json.dumps(a)


# ------------------------------------------------------------------------------------ prompts from replies


def test_the_flux_prompt_is_built_from_the_analysis():
    p = analysis_prompt(parse_analysis(GOOD))
    assert p == ("A sunlit kitchen with a wooden table, warm afternoon daylight, light coming from the left, "
                 "cosy mood, colour palette of honey brown, cream and #2E5E4E, eye level, 35mm, slight high angle")
    assert analysis_prompt({"lighting": "soft light", "light_direction": "unknown", "mood": "calm mood"}) == \
        "soft light, calm mood"
    assert analysis_prompt({"lighting": "부드러운", "light_direction": "왼쪽", "mood": "차분한", "palette": ["회색"]},
                           "ko") == "부드러운 조명, 왼쪽에서 오는 빛, 차분한 분위기, 색감: 회색"
    # nothing usable: the reply itself (cleaned)
    assert analysis_prompt(parse_analysis("  "), fallback="```\nA red barn\n```") == "A red barn"
    junk = "{broken"
    assert analysis_prompt(parse_analysis(junk), fallback=junk) == junk


def test_clean_reply():
    assert clean_reply("  A cat on a mat.\n") == "A cat on a mat."
    assert clean_reply('"A cat on a mat."') == "A cat on a mat."
    assert clean_reply("Prompt: a cat on a mat") == "a cat on a mat"
    assert clean_reply("```text\na cat\n```") == "a cat"
    assert clean_reply("") == "" and clean_reply(None) == ""


# ----------------------------------------------------------------------------------------- prompt building


@pytest.mark.parametrize("task", ["background_analysis", "caption", "inpaint_prompt"])
@pytest.mark.parametrize("language", ["en", "ko"])
def test_every_task_has_an_instruction_in_each_language(task, language):
    text = prompts.build_instruction(task, language)
    assert len(text) > 40
    korean = any("\uac00" <= ch <= "\ud7a3" for ch in text)
    assert korean == (language == "ko")
    if task == "background_analysis":  # the JSON keys stay English in both languages
        for key in ("scene", "lighting", "light_direction", "palette", "mood", "camera", "placement"):
            assert f'"{key}"' in text
    msgs = prompts.build_messages(task, language)
    assert msgs == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_custom_asks_the_instruction_and_needs_one():
    assert prompts.build_instruction("custom", "en", "  How many chairs?  ") == "How many chairs?\nAnswer in English."
    assert prompts.build_instruction("custom", "ko", "의자가 몇 개?").endswith("한국어로 답하세요.")
    with pytest.raises(InputError, match="an instruction for task 'custom'"):
        prompts.build_instruction("custom", "en", "   ")
    with pytest.raises(InputError, match="task one of background_analysis, caption, inpaint_prompt, custom"):
        prompts.build_instruction("poem", "en")
    with pytest.raises(InputError, match="language en or ko"):
        prompts.build_instruction("caption", "fr")


# ------------------------------------------------------------------------------------------ tiny models


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    return {kind: tiny_vlm.build(kind, root / f"tiny-{kind}") for kind in tiny_vlm.KINDS}


@pytest.fixture(scope="module")
def loaded(vlm_dirs):
    models = {kind: captioner.load(captioner.make_handle(captioner.VLMSpec(path=str(d)))) for kind, d in vlm_dirs.items()}
    yield models
    for m in models.values():
        m.close()


@pytest.fixture(scope="module")
def references(vlm_dirs):
    """Plain transformers on the same folders: the model class and AutoProcessor, nothing from Atelier."""
    import transformers

    out = {}
    for kind, d in vlm_dirs.items():
        model = getattr(transformers, tiny_vlm.CLASSES[kind][0]).from_pretrained(d, local_files_only=True).eval()
        out[kind] = (model, transformers.AutoProcessor.from_pretrained(d, local_files_only=True))
    return out


def image_batch(n: int = 1, h: int = 40, w: int = 60, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g).float() / 255.0  # what LoadImage gives


def test_the_folder_template_renders_the_image_slot_and_matches_qwen_format(loaded):
    for vlm in loaded.values():
        msgs = prompts.build_messages("caption", "en")
        text = prompts.render_chat(vlm.processor, msgs)
        assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")
        assert text == prompts.fallback_chat(msgs)


@pytest.mark.parametrize("kind", tiny_vlm.KINDS)
@pytest.mark.parametrize("task", ["caption", "background_analysis"])
def test_greedy_generation_equals_model_generate(loaded, references, kind, task):
    vlm = loaded[kind]
    model, processor = references[kind]
    images = image_batch(1, seed=3)
    progress = NullProgress()
    [reply] = captioner.caption(vlm, images, task, max_new_tokens=12, progress=progress)

    pil = captioner.to_pil(images[0])
    text = processor.apply_chat_template(prompts.build_messages(task, "en"), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[pil], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    want = processor.batch_decode(new[None], skip_special_tokens=True)[0]
    assert reply.text == want
    assert reply.tokens == new.shape[0] == progress.done  # one progress step per generated token
    assert reply.prompt == (clean_reply(want) if task == "caption"
                            else analysis_prompt(parse_analysis(want), fallback=want))
    assert list(reply.analysis) == KEYS


@pytest.mark.skipif(not tiny_vlm.available("qwen3_vl"), reason="this transformers has no Qwen3-VL (needs >= 4.57)")
def test_qwen3_vl_loads_and_equals_model_generate(tmp_path_factory):
    import transformers

    folder = tiny_vlm.build("qwen3_vl", tmp_path_factory.mktemp("llm3") / "tiny-qwen3_vl")
    assert captioner.check_folder(folder) == "qwen3_vl"
    vlm = captioner.load(captioner.make_handle(captioner.VLMSpec(path=str(folder))))
    try:
        assert vlm.family == "Qwen3-VL"
        images = image_batch(1, seed=7)
        [reply] = captioner.caption(vlm, images, "inpaint_prompt", max_new_tokens=8)
    finally:
        vlm.close()
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    text = processor.apply_chat_template(prompts.build_messages("inpaint_prompt"), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[captioner.to_pil(images[0])], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    want = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert reply.text == want and reply.prompt == clean_reply(want)


def test_the_pil_round_trip_is_exact_for_loaded_images():
    images = image_batch(1, seed=5)
    arr = torch.from_numpy(__import__("numpy").asarray(captioner.to_pil(images[0])).copy())
    assert torch.equal(arr, (images[0] * 255).round().to(torch.uint8))
    big = captioner.to_pil(torch.rand(1500, 1200, 3))
    assert big.size[0] * big.size[1] <= captioner.MAX_IMAGE_PIXELS and abs(big.size[0] / big.size[1] - 0.8) < 0.01


def test_a_batch_gives_one_reply_per_image_and_sampling_follows_the_seed(loaded):
    vlm = loaded["qwen2_5_vl"]
    images = torch.cat([image_batch(1, seed=1), image_batch(1, seed=2)])
    a = captioner.caption(vlm, images, "caption", max_new_tokens=6, seed=4, temperature=1.0)
    c = captioner.caption(vlm, images[1:], "caption", max_new_tokens=6, seed=5, temperature=1.0)
    assert len(a) == 2 and all(r.tokens == 6 for r in a)
    assert c[0].text == a[1].text  # image i samples with seed + i: same seed, same text
    d = captioner.caption(vlm, images[1:], "caption", max_new_tokens=6, seed=6, temperature=1.0)
    assert d[0].text != c[0].text  # another seed, another text
    greedy = captioner.caption(vlm, images[:1], "caption", max_new_tokens=6, seed=99)
    assert greedy[0].text == captioner.caption(vlm, images[:1], "caption", max_new_tokens=6, seed=1)[0].text


class StopAfter:
    """A Progress that raises on its third step, like ComfyUI's hook after Stop."""

    class Stopped(Exception):
        pass

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def step(self, n: int = 1) -> None:
        self.calls += 1
        if self.calls >= self.n:
            raise self.Stopped()


def test_a_progress_that_raises_stops_generation_at_that_token(loaded):
    vlm = loaded["qwen2_vl"]
    progress = StopAfter(3)
    with pytest.raises(StopAfter.Stopped):
        captioner.caption(vlm, image_batch(2), "caption", max_new_tokens=500, progress=progress)
    assert progress.calls == 3  # not one token more, and the second image never started
    # the model is fine afterwards
    [r] = captioner.caption(vlm, image_batch(1), "caption", max_new_tokens=4)
    assert r.tokens == 4


def test_bad_generation_settings_are_clear_errors(loaded):
    vlm = loaded["qwen2_vl"]
    with pytest.raises(InputError, match="an instruction for task 'custom'"):
        captioner.caption(vlm, image_batch(1), "custom", instruction="")
    with pytest.raises(InputError, match="temperature of 0"):
        captioner.caption(vlm, image_batch(1), "caption", temperature=-1)
    with pytest.raises(InputError, match="image of shape"):
        captioner.caption(vlm, torch.rand(1, 8, 8), "caption")


# ----------------------------------------------------------------------------------- folders and settings


def test_model_folders_are_found_one_or_two_levels_deep(vlm_dirs, tmp_path):
    root = tmp_path / "LLM"
    (root / "Qwen").mkdir(parents=True)
    shutil.copytree(vlm_dirs["qwen2_vl"], root / "tiny-qwen2")
    shutil.copytree(vlm_dirs["qwen2_5_vl"], root / "Qwen" / "tiny-qwen25")
    (root / "not-a-vlm").mkdir()
    (root / "not-a-vlm" / "config.json").write_text('{"model_type": "llama"}')
    (root / "loose.safetensors").write_bytes(b"")
    found = captioner.find_model_folders([root, tmp_path / "missing"])
    assert [n for n, _ in found] == ["Qwen/tiny-qwen25", "tiny-qwen2"]
    assert captioner.resolve_folder("Qwen/tiny-qwen25", [root]) == root / "Qwen" / "tiny-qwen25"
    assert captioner.find_model_folders([root], model_types=["qwen2_vl"]) == [("tiny-qwen2", root / "tiny-qwen2")]
    with pytest.raises(ModelFileError, match="no such folder"):
        captioner.resolve_folder("gone", [root])


def test_a_folder_without_weights_lists_what_is_expected(vlm_dirs, tmp_path):
    broken = shutil.copytree(vlm_dirs["qwen2_5_vl"], tmp_path / "half")
    tiny_vlm.strip_weights(broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(ModelFileError) as e:
        captioner.check_folder(broken)
    msg = str(e.value)
    assert "without model.safetensors (or model-0000X-of-0000N.safetensors + model.safetensors.index.json), " \
           "preprocessor_config.json" in msg
    assert "config.json" in msg.split("; got")[0] and "tokenizer.json" in msg.split("; got")[0]
    assert "tokenizer.json" not in msg.split("; got")[1].split(".")[0]  # present files are not called missing

    # a sharded download with one shard missing names that shard
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    shutil.copyfile(vlm_dirs["qwen2_5_vl"] / "model.safetensors", broken / "model-00001-of-00002.safetensors")
    shutil.copyfile(vlm_dirs["qwen2_5_vl"] / "preprocessor_config.json", broken / "preprocessor_config.json")
    with pytest.raises(ModelFileError, match="without model-00002-of-00002.safetensors$|without model-00002"):
        captioner.check_folder(broken)


def test_a_folder_of_another_model_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ModelFileError, match="model_type 'llava'"):
        captioner.check_folder(tmp_path)


def test_settings_are_resolved_without_loading(vlm_dirs):
    path = str(vlm_dirs["qwen2_vl"])
    handle = captioner.make_handle(captioner.VLMSpec(path=path, offload="model"))
    assert handle.offload == "none" and handle.dtype == "fp32" and handle.model_type == "qwen2_vl"  # CPU
    assert captioner.make_handle(captioner.VLMSpec(path=path, dtype="bf16")).dtype == "bf16"
    with pytest.raises(SettingError, match="offload one of auto, none, model"):
        captioner.make_handle(captioner.VLMSpec(path=path, offload="sequential"))
    with pytest.raises(SettingError, match="CUDA GPU"):
        captioner.make_handle(captioner.VLMSpec(path=path, quantization="nf4"))
    sizes = captioner.part_sizes(path)
    assert sizes["transformer"] > 151936 * 32 * 2 and 0 < sizes["text_encoders"] < sizes["transformer"]
    # on a GPU: everything fits -> none; too little free VRAM -> model (what does not fit stays in RAM)
    spec = captioner.VLMSpec(path=path, device="cuda:0")
    assert captioner.resolve(spec, free_vram=64 * 2**30)[0] == "none"
    assert captioner.resolve(spec, free_vram=2**20)[0] == "model"
    # bitsandbytes cannot stream 4-bit layers from RAM: nf4 stays on the GPU, and says why
    for offload in ("model", "auto"):
        nf4 = captioner.VLMSpec(path=path, device="cuda:0", quantization="nf4", offload=offload)
        mode, _, why, _ = captioner.resolve(nf4, free_vram=2**20)
        assert mode == "none" and "nf4 weights stay on the GPU" in why
    int8 = captioner.VLMSpec(path=path, device="cuda:0", quantization="int8", offload="model")
    assert captioner.resolve(int8, free_vram=64 * 2**30)[0] == "model"


def test_generation_settings_are_passed_as_keywords():
    class Model:
        class generation_config:  # noqa: N801 - stands in for the folder's GenerationConfig
            pad_token_id, eos_token_id = None, [151645, 151643]

    greedy = captioner.generation_kwargs(Model, 7, 0.0)
    assert greedy == {"max_new_tokens": 7, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                      "pad_token_id": 151645}
    hot = captioner.generation_kwargs(Model, 7, 1.0)
    assert hot["do_sample"] is True and hot["temperature"] == 1.0 and hot["top_k"] == 0 and hot["top_p"] == 0.9


def test_the_loaded_model_honours_the_registry_contract(loaded):
    """Last in this module: it closes the shared Qwen2-VL."""
    vlm = loaded["qwen2_vl"]
    assert vlm.device == torch.device("cpu") and vlm.offload == "none" and vlm.dtype == torch.float32
    assert vlm.resident_bytes > 1_000_000 and vlm.family == "Qwen2-VL"
    vlm.close()
    assert vlm.model is None and vlm.processor is None
    vlm.close()  # twice is fine
    with pytest.raises(SettingError, match="one that was released"):
        captioner.generate(vlm, captioner.to_pil(image_batch(1)[0]), "caption")


def test_every_language_row_asks_every_task_and_glues_an_analysis():
    assert prompts.LANGUAGES == ("en", "ko")  # the node's combo, in this order
    for language, row in prompts.PROMPTS.items():
        assert set(row.instructions) == set(prompts.TASKS) - {"custom"}, language
        for glue in (row.light, row.light_from, row.mood, row.palette):
            assert glue.count("{}") == 1, (language, glue)
    ko = analysis_prompt({"lighting": "따뜻한", "palette": ["빨강", "파랑"], "mood": "알 수 없음"}, "ko")
    assert ko == "따뜻한 조명, 색감: 빨강, 파랑"
