"""FLUX files on disk: configs read off single-file headers, BFL -> diffusers keys, recognising and checking files."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from atelier import flux_files, weights
from atelier.errors import ModelFileError


def _config(tiny_dir: Path, part: str) -> dict:
    return json.loads((tiny_dir / part / "config.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------- configs from shapes


def test_transformer_config_from_the_bfl_file_matches_diffusers(tiny_dir, single_files):
    want = _config(tiny_dir, "transformer")
    got = flux_files.flux_transformer_config(single_files["transformer"])
    for key in ("in_channels", "out_channels", "num_layers", "num_single_layers", "num_attention_heads",
                "attention_head_dim", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
                "axes_dims_rope", "patch_size"):
        assert got[key] == want[key], key


def test_vae_config_from_the_ldm_file_matches_diffusers(tiny_dir, single_files):
    want = _config(tiny_dir, "vae")
    got = flux_files.flux_vae_config(single_files["vae"])
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
                "down_block_types", "up_block_types"):
        assert got[key] == want[key], key
    assert got["scaling_factor"] == pytest.approx(want["scaling_factor"])
    assert got["shift_factor"] == pytest.approx(want["shift_factor"])


def test_t5_config_from_the_file_matches_transformers(tiny_dir, single_files):
    want = _config(tiny_dir, "text_encoder_2")
    got = flux_files.t5_config(single_files["t5xxl"])
    for key in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_layers", "relative_attention_num_buckets",
                "is_gated_act"):
        assert got[key] == want[key], key
    assert got["feed_forward_proj"] == want["feed_forward_proj"] == "gated-gelu"


def test_clip_config_from_the_file_matches_transformers(tiny_dir, single_files):
    want = _config(tiny_dir, "text_encoder")
    got = flux_files.clip_text_config(single_files["clip_l"])
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "hidden_act"):
        assert got[key] == want[key], key


def test_config_readers_refuse_files_of_another_part(single_files):
    with pytest.raises(ModelFileError):
        flux_files.flux_transformer_config(single_files["vae"])
    with pytest.raises(ModelFileError):
        flux_files.flux_vae_config(single_files["transformer"])
    with pytest.raises(ModelFileError, match="T5"):
        flux_files.t5_config(single_files["clip_l"])
    with pytest.raises(ModelFileError, match="CLIP"):
        flux_files.clip_text_config(single_files["t5xxl"])


def test_rope_axes_of_flux():
    assert flux_files.rope_axes(128) == [16, 56, 56]


@pytest.mark.parametrize("head_dim", [16, 32, 64, 96, 128, 256])
def test_rope_axes_split_the_head_into_even_parts(head_dim):
    axes = flux_files.rope_axes(head_dim)
    assert len(axes) == 3
    assert sum(axes) == head_dim
    assert all(a > 0 and a % 2 == 0 for a in axes)
    assert axes[1] == axes[2]  # height and width get the same share


# ---------------------------------------------------------------------------------------- BFL -> diffusers


def _diffusers_transformer_sd(tiny_dir: Path) -> dict:
    return load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")


def _assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def test_bfl_to_diffusers_reproduces_the_diffusers_state_dict(tiny_dir, single_files):
    bfl = load_file(single_files["transformer"])
    assert "double_blocks.0.img_attn.qkv.weight" in bfl  # really BFL names, not diffusers'
    _assert_same_state(flux_files.bfl_to_diffusers(bfl), _diffusers_transformer_sd(tiny_dir))


def test_bfl_to_diffusers_strips_comfyuis_prefix(tiny_dir, single_files):
    bfl = {f"model.diffusion_model.{k}": v for k, v in load_file(single_files["transformer"]).items()}
    _assert_same_state(flux_files.bfl_to_diffusers(bfl), _diffusers_transformer_sd(tiny_dir))


def test_comfyui_030_norm_names_read_like_bfls(tiny_dir, single_files, tmp_path):
    """ComfyUI 0.30 saves the q/k norms as `…_norm.weight` (BFL: `…_norm.scale`); both load to the same weights."""
    bfl = load_file(single_files["transformer"])
    swap = {"scale": "weight", "weight": "scale"}
    renamed = {}
    for k, v in bfl.items():
        stem, _, end = k.rpartition(".")
        renamed[f"{stem}.{swap[end]}" if stem.endswith(("query_norm", "key_norm")) else k] = v
    assert renamed.keys() != bfl.keys()
    _assert_same_state(flux_files.bfl_to_diffusers(renamed), _diffusers_transformer_sd(tiny_dir))
    save_file(renamed, tmp_path / "renamed.safetensors")
    assert flux_files.flux_transformer_config(tmp_path / "renamed.safetensors") == \
        flux_files.flux_transformer_config(single_files["transformer"])


# ------------------------------------------------------------------------------------------- recognising


def test_the_tiny_fill_file_is_recognised(single_files):
    assert flux_files.is_flux_fill_transformer_file(single_files["transformer"])


def test_a_fill_file_with_comfyuis_prefix_is_recognised(single_files, tmp_path):
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in load_file(single_files["transformer"]).items()}, prefixed)
    assert flux_files.is_flux_fill_transformer_file(prefixed)


def test_a_non_fill_flux_file_is_not_a_fill_file(tmp_path):
    dev = tmp_path / "flux1-dev-like.safetensors"
    save_file({"img_in.weight": torch.zeros(8, 64), "img_in.bias": torch.zeros(8),
               "final_layer.linear.weight": torch.zeros(64, 8), "txt_in.weight": torch.zeros(8, 16)}, dev)
    assert not flux_files.is_flux_fill_transformer_file(dev)


def test_other_safetensors_are_not_fill_files(single_files):
    for part in ("vae", "clip_l", "t5xxl"):
        assert not flux_files.is_flux_fill_transformer_file(single_files[part])


def test_a_file_that_is_not_safetensors_is_not_a_fill_file(tmp_path):
    junk = tmp_path / "notes.safetensors"
    junk.write_text("this is not a safetensors file, just some text that is long enough", encoding="utf-8")
    assert not flux_files.is_flux_fill_transformer_file(junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert not flux_files.is_flux_fill_transformer_file(empty)


# ------------------------------------------------------------------------------------------------ headers


def test_read_safetensors_header_lists_every_tensor_with_its_shape(single_files):
    header = weights.read_safetensors_header(single_files["transformer"])
    tensors = load_file(single_files["transformer"])
    assert set(header) == set(tensors)
    for k, t in tensors.items():
        assert header[k]["shape"] == list(t.shape)


def test_read_safetensors_header_on_a_truncated_header_is_a_model_file_error(single_files, tmp_path):
    data = Path(single_files["transformer"]).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (4, 8 + n // 2):  # inside the length field; inside the JSON header
        part = tmp_path / f"cut{cut}.safetensors"
        part.write_bytes(data[:cut])
        with pytest.raises(ModelFileError) as e:
            weights.read_safetensors_header(part)
        assert part.name in str(e.value)
        assert "download" in e.value.fix.lower()


def test_read_safetensors_header_on_a_file_cut_in_its_tensor_data_is_a_model_file_error(single_files, tmp_path):
    data = Path(single_files["transformer"]).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    part = tmp_path / "partial-download.safetensors"
    part.write_bytes(data[: 8 + n + (len(data) - 8 - n) // 2])
    with pytest.raises(ModelFileError):
        weights.read_safetensors_header(part)


# ------------------------------------------------------------------------------------------ diffusers folder


def _link_copy(src: Path, dst: Path) -> Path:
    """A copy of the folder tree whose files are symlinks (cheap; deleting one leaves the original alone)."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def test_the_tiny_folder_is_a_complete_fill_folder(tiny_dir):
    flux_files.check_diffusers_folder(tiny_dir)
    assert flux_files.diffusers_pipeline_class(tiny_dir) == "FluxFillPipeline"


def test_a_folder_without_t5_weights_names_the_missing_part(tiny_dir, tmp_path):
    folder = _link_copy(tiny_dir, tmp_path / "partial")
    removed = list((folder / "text_encoder_2").glob("*.safetensors"))
    assert removed
    for f in removed:
        f.unlink()
    with pytest.raises(ModelFileError) as e:
        flux_files.check_diffusers_folder(folder)
    assert "text_encoder_2/*.safetensors" in e.value.received
    assert "text_encoder/" not in e.value.received  # only what is missing is named as missing
    assert (tiny_dir / "text_encoder_2").is_dir() and list((tiny_dir / "text_encoder_2").glob("*.safetensors"))


def test_a_folder_without_a_tokenizer_names_it(tiny_dir, tmp_path):
    folder = _link_copy(tiny_dir, tmp_path / "no_tokenizer")
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ModelFileError) as e:
        flux_files.check_diffusers_folder(folder)
    assert "tokenizer/vocab.json or tokenizer.json" in e.value.received


def test_a_flux_dev_folder_is_refused_by_name(tiny_dir, tmp_path):
    folder = _link_copy(tiny_dir, tmp_path / "dev")
    index = folder / "model_index.json"
    data = json.loads(index.read_text(encoding="utf-8"))
    index.unlink()  # a symlink to the original: replace it, do not write through it
    index.write_text(json.dumps(dict(data, _class_name="FluxPipeline")), encoding="utf-8")
    with pytest.raises(ModelFileError) as e:
        flux_files.check_diffusers_folder(folder)
    assert "FluxPipeline" in e.value.received
    assert "FluxFillPipeline" in e.value.expected
    assert flux_files.diffusers_pipeline_class(tiny_dir) == "FluxFillPipeline"


def test_a_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelFileError, match="model_index.json"):
        flux_files.check_diffusers_folder(tmp_path)
    assert flux_files.diffusers_pipeline_class(tmp_path) is None


def test_a_folder_with_a_broken_model_index_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelFileError, match="model_index.json"):
        flux_files.check_diffusers_folder(tmp_path)


# ------------------------------------------------------------------------------------------ config folders


def test_config_dir_writes_the_config_and_links_the_weights(single_files):
    cfg = flux_files.clip_text_config(single_files["clip_l"])
    folder = flux_files.config_dir("clip-l-test", single_files["clip_l"], cfg, weights=single_files["clip_l"])
    assert json.loads((folder / "config.json").read_text(encoding="utf-8")) == cfg
    assert (folder / "model.safetensors").resolve() == Path(single_files["clip_l"]).resolve()
    again = flux_files.config_dir("clip-l-test", single_files["clip_l"], cfg, weights=single_files["clip_l"])
    assert again == folder


def test_require_file_names_the_folder(tmp_path):
    with pytest.raises(ModelFileError) as e:
        flux_files.require_file(str(tmp_path / "missing.safetensors"), "t5xxl", "text_encoders")
    assert "models/text_encoders" in e.value.fix
    with pytest.raises(ModelFileError, match="nothing"):
        flux_files.require_file(None, "vae", "vae")
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"x")
    assert flux_files.require_file(str(real), "vae", "vae") == str(real)
