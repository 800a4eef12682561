"""The shared node-boundary checks (atelier/guards.py) and the four bad answers issue 15 found: NaN guidance in
FLUX Fill, a prompt with a lone UTF-16 surrogate, SAM2 points nested 100k deep, a layers ZIP whose manifest has
non-numeric bounds. Each must now be an Atelier error that names the input (or the file and field)."""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from atelier import character, fill, guards, layer_files, openpose, segmenter
from atelier.errors import InputError, SettingError


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_is_refused_naming_the_input(value):
    with pytest.raises(InputError) as e:
        guards.check_inputs({"steps": 4, "guidance": value, "prompt": "ok"})
    assert "'guidance'" in str(e.value) and "finite number" in str(e.value)


def test_finite_values_and_other_types_pass():
    guards.check_inputs({"guidance": 30.0, "steps": 2, "prompt": "한국어 🎨 " * 1000, "flag": True, "pipe": object()})


def test_flux_fill_nan_guidance_is_an_input_error_before_sampling():
    class NoPipe:  # sampling would fail loudly: the check must come first
        pipe = None
        multiple = 16

    image, mask = torch.rand(1, 32, 32, 3), torch.ones(1, 32, 32)
    with pytest.raises(InputError, match="'guidance'"):
        fill.inpaint(NoPipe(), image, mask, "a vase", steps=1, guidance=float("nan"))


def test_lone_surrogate_in_a_prompt_names_the_input_and_position():
    with pytest.raises(InputError) as e:
        guards.check_inputs({"prompt": "a cat \ud83d sitting"})
    msg = str(e.value)
    assert "'prompt'" in msg and "character 6" in msg and "TypeError" not in msg


def test_a_real_emoji_pair_is_fine():
    guards.check_inputs({"prompt": "a cat \U0001F431 sitting"})


@pytest.mark.parametrize("parse", [segmenter.parse_points, segmenter.parse_boxes])
def test_sam2_points_nested_100k_deep_is_an_input_error(parse):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(InputError, match="nested too deep"):
        parse(deep)
    with pytest.raises(InputError, match="nested"):  # the node boundary refuses it before any parser runs
        guards.check_inputs({"points": deep})


def test_deep_keypoints_and_keyframes_are_input_errors():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(InputError):
        openpose.parse_frames(deep)
    with pytest.raises(InputError, match="keyframe_prompts"):
        character.parse_keyframes("{\"0\": " + deep + "}")


def test_nesting_depth_ignores_brackets_inside_strings():
    assert guards.nesting_depth('[{"x": "[[[[[[", "y": 2}]') == 2
    assert guards.nesting_depth("[" * 70) == 70


def _zip_with_bounds(path, bounds):
    png = io.BytesIO()
    Image.fromarray(np.full((4, 4, 4), 200, np.uint8), "RGBA").save(png, format="PNG")
    doc = {"width": 16, "height": 16, "layers": [{"file": "layers/01.png", "name": "A", "bounds": bounds}]}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("manifest.json", json.dumps(doc))
        z.writestr("layers/01.png", png.getvalue())
    return path


@pytest.mark.parametrize("left", ["x", None, [1], "nan", True])
def test_layers_zip_with_non_numeric_bounds_names_file_and_field(tmp_path, left):
    path = _zip_with_bounds(tmp_path / "bad.zip", {"left": left, "top": 2, "right": 6, "bottom": 6})
    with pytest.raises(InputError) as e:
        layer_files.read_zip(path)
    msg = str(e.value)
    assert "bounds.left" in msg and "layers/01.png" in msg and "bad.zip" in msg


def test_layers_zip_with_numeric_string_bounds_still_reads(tmp_path):
    path = _zip_with_bounds(tmp_path / "ok.zip", {"left": "3", "top": 2.0, "right": 7, "bottom": 6})
    stack = layer_files.read_zip(path)
    assert stack.rgba.shape == (1, 16, 16, 4)
    assert stack.rgba[0, 2, 3, 3] == 200 and stack.rgba[0, 2, 2, 3] == 0


# ------------------------------------------------------------------------------------------- out of memory


def _cuda_oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)")


class _Spec:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Handle:
    def __init__(self, offload, **spec):
        self.offload = offload
        self.spec = _Spec(offload="auto", **spec)


def test_gpu_oom_on_a_run_node_names_the_loader_toggles_still_open():
    pipe = _Handle("none", quantization="none", vae_tiling=False, vae_slicing=False, attention_slicing=False)
    err = guards.translate("AtelierFluxFill", {"pipe": pipe, "steps": 2}, _cuda_oom())
    assert isinstance(err, SettingError)
    msg = str(err)
    for toggle in ("offload 'model'", "quantization 'nf4'", "vae_tiling on", "lower resolution", "on the loader"):
        assert toggle in msg, (toggle, msg)
    assert "Traceback" not in msg and "OutOfMemoryError: CUDA out of memory" in msg


def test_gpu_oom_leaves_out_toggles_already_at_their_lowest():
    pipe = _Handle("sequential", quantization="nf4", vae_tiling=True)
    msg = str(guards.translate("AtelierSplitLayers", {"pipe": pipe}, _cuda_oom()))
    assert "offload" not in msg and "quantization" not in msg and "vae_tiling" not in msg
    assert "lower resolution" in msg


def test_gpu_oom_on_a_loader_reads_its_own_inputs():
    msg = str(guards.translate("AtelierFluxFillLoader", {"offload": "model", "quantization": "none",
                                                         "vae_tiling": False}, _cuda_oom()))
    assert "offload 'sequential'" in msg and "quantization 'nf4'" in msg and "on the loader" not in msg


def test_runtime_error_text_of_an_oom_counts_and_host_memory_too():
    assert guards.is_out_of_gpu_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not guards.is_out_of_gpu_memory(RuntimeError("shape mismatch"))
    err = guards.translate("AtelierLoadLayers", {"file": "a.psd"}, MemoryError())
    assert isinstance(err, SettingError) and "host (RAM) memory" in str(err)


def test_other_errors_travel_unchanged():
    assert guards.translate("X", {}, KeyError("k")) is None
    assert guards.translate("X", {}, InputError("a", "b", "c")) is None
    err = guards.translate("X", {"points": "[[["}, RecursionError("maximum recursion depth exceeded"))
    assert isinstance(err, InputError) and "points" in str(err)


@pytest.mark.parametrize("size", [(4096, 16), (16, 4096), (1, 1), (30000, 28)])
def test_captioner_pads_strips_and_specks_to_what_the_vision_processor_takes(size):
    from PIL import Image

    from atelier import captioner

    out = captioner.pad_for_vision(Image.new("RGB", size, (255, 0, 0)))
    w, h = out.size
    assert w >= size[0] and h >= size[1] and min(w, h) >= captioner.MIN_SIDE
    assert max(w, h) / min(w, h) <= captioner.MAX_ASPECT
    assert out.getpixel(((w - size[0]) // 2, (h - size[1]) // 2)) == (255, 0, 0)  # the content, not resized


def test_truncated_flux_transformer_is_called_a_partial_download(tmp_path):
    import struct

    from atelier.errors import ModelFileError
    from atelier.types import FluxFillFiles

    header = json.dumps({"img_in.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}}).encode()
    path = tmp_path / "flux1-fill-cut.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 20)  # 48 bytes promised, 20 there
    files = FluxFillFiles(layout="single_file", path=str(path))
    with pytest.raises(ModelFileError, match="partial download"):
        fill.check_files(files)


@pytest.mark.parametrize("name", ["../diffusers/flux", "/etc", "a/../../b", ""])
def test_vlm_folder_names_that_leave_models_llm_are_refused(tmp_path, name):
    from atelier import captioner
    from atelier.errors import ModelFileError

    (tmp_path / "LLM").mkdir()
    (tmp_path / "diffusers" / "flux").mkdir(parents=True)
    with pytest.raises(ModelFileError, match="leave models/LLM"):
        captioner.resolve_folder(name, [tmp_path / "LLM"])


def test_unknown_combo_values_are_refused_naming_the_input():
    options = {"quantization": ["none", "int8", "nf4"], "device": ["auto", "cpu"], "model": ["u2netp.onnx"]}
    guards.check_choices({"quantization": "nf4", "model": "u2netp.onnx", "steps": 3}, options)
    with pytest.raises(InputError, match="quantization one of none, int8, nf4; got 'fp3'"):
        guards.check_choices({"quantization": "fp3"}, options)
    with pytest.raises(InputError, match="device one of auto, cpu; got 'tpu'"):
        guards.check_choices({"device": "tpu"}, options)
    guards.check_choices({"model": "other.onnx"}, options)  # model files: the loader resolves and explains


def test_export_prefix_too_long_and_pptx_strip_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="filename_prefix"):
        layer_files.output_paths(tmp_path, "x" * 300, [".psd"])
    strip = layer_files.LayerStack(np.zeros((1, 16, 4096, 4), np.uint8), ["a"])
    with pytest.raises(InputError, match="PPTX"):
        layer_files.write_pptx(strip, tmp_path / "s.pptx")
    assert not list(tmp_path.glob("*.pptx*"))


@pytest.mark.parametrize("loader", ["fastcomposer", "sd15"])
def test_text_file_named_bin_is_a_model_file_error(tmp_path, loader):
    from atelier import fastcomposer, sd15_files
    from atelier.errors import ModelFileError

    path = tmp_path / "corrupt.bin"
    path.write_text("this is a text file, not a model\n")
    load = fastcomposer._load_state_dict if loader == "fastcomposer" else sd15_files.load_state
    with pytest.raises(ModelFileError, match="corrupt.bin"):
        load(path)


def test_depth_pads_long_strips_and_crops_back():
    from PIL import Image

    from atelier import depth

    pil, (left, top) = depth._pad_strip(Image.new("RGB", (4096, 16), (9, 9, 9)))
    assert pil.size == (4096, 512) and (left, top) == (0, 248)
    same, offset = depth._pad_strip(Image.new("RGB", (64, 48)))
    assert same.size == (64, 48) and offset == (0, 0)


def test_grouped_ip_adapter_bin_still_reads(tmp_path):
    from atelier import sd15_files

    path = tmp_path / "ip.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(2)}},
               path)
    state = sd15_files.load_state(path)
    assert set(state) == {"image_proj", "ip_adapter"} and state["image_proj"]["proj.weight"].shape == (2, 2)


def test_safetensors_header_whose_offsets_lie_is_a_model_file_error(tmp_path):
    import struct

    from atelier.errors import ModelFileError
    from atelier.weights import read_safetensors_header

    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]},
                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    path = tmp_path / "lying.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4000)
    with pytest.raises(ModelFileError, match="lying.safetensors.*overlap"):
        read_safetensors_header(path)


def test_combine_order_errors_name_the_input_and_huge_ranges_are_refused_at_once():
    from atelier import layers

    for text in ("1,,x", "0", "99", "1-18446744073709551616", "2,2"):
        with pytest.raises(InputError, match="order"):
            layers.parse_order(text, 3)
    assert layers.parse_order("3-1", 3) == [2, 1, 0]
