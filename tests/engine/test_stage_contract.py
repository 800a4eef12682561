"""Every stage of atelier.stage.STAGE_MODULES through the one stage contract, on tiny models (real u²-net-p for the
background remover): spec → handle without loading, need_bytes, load through the registry, summary, release."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from atelier import stage as stage_mod
from atelier.registry import REGISTRY
from atelier.stage import STAGE_MODULES, Stage, stage_of
from atelier.types import FluxFillFiles, FluxFillSpec
from atelier.weights import file_stamp
from tests.harness import real_weights, tiny_layered, tiny_vlm


def _spec(group: str, base: Path, tiny_dir: Path):
    """A CPU spec of each stage on a tiny model."""
    if group == "flux_fill":
        return FluxFillSpec(files=FluxFillFiles(layout="diffusers", path=str(tiny_dir)))
    if group == "layered":
        from atelier.layers import LayeredSpec

        return LayeredSpec(path=str(tiny_layered.shared_folder(base)))
    if group == "vlm":
        from atelier.captioner import VLMSpec

        return VLMSpec(path=str(tiny_vlm.build("qwen2_5_vl", base / "contract-vlm")))
    if group == "bg_remover":
        from atelier import masker

        return masker.make_spec(str(real_weights.u2netp_onnx()))
    if group == "sam2":
        pytest.importorskip("sam2")
        from atelier import segmenter
        from tests.harness import tiny_sam2

        path = tiny_sam2.write_checkpoints(base / "contract-sam2")["pt"]
        return segmenter.SAM2Spec(path=str(path), stamp=file_stamp(path))
    if group == "pose":
        pose = pytest.importorskip("atelier.pose", reason="ai-edge-litert is not installed", exc_type=ImportError)
        return pose.make_spec(str(real_weights.blazepose_dir() / pose.LANDMARK_NAME))
    if group == "depth":
        from atelier.depth import DepthSpec
        from tests.harness import tiny_depth

        return DepthSpec(path=str(tiny_depth.build_depth_anything(base / "contract-depth")))
    if group == "fastcomposer":
        from atelier import fastcomposer
        from tests.harness import tiny_fastcomposer

        path = tiny_fastcomposer.shared_folder(base)["checkpoint"]
        return fastcomposer.make_spec(str(path), str(tiny_fastcomposer.tokenizer_dir()))
    if group == "character":
        from atelier.character import CharacterSpec
        from tests.harness import tiny_character

        t = tiny_character.build(base / "tiny-character")
        return CharacterSpec(model=str(t["sd15"]), controlnet=str(t["controlnet"]),
                             tokenizer=tiny_character.tokenizer_dir())
    if group == "tryon":
        from atelier import tryon
        from tests.harness import tiny_sdxl
        from tests.harness.comfy_server import comfy_root

        world = tiny_sdxl.build_world(base / "tiny_sdxl_models")
        return tryon.TryOnSpec(files=tryon.TryOnFiles(
            layout="single_file", path=str(world["checkpoint"]), controlnet=str(world["controlnet_file"]),
            ip_adapter=str(world["ip_safetensors"]), clip_vision=str(world["clip_vision"]),
            tokenizer=str(comfy_root() / "comfy" / "sd1_tokenizer")))
    if group == "redux":
        from atelier import flux_tryon
        from tests.harness import tiny_flux

        files = tiny_flux.build_redux(base / "contract-redux")
        return flux_tryon.ReduxSpec(redux=str(files["redux"]), siglip=str(files["siglip"]))
    raise AssertionError(f"no tiny model for the stage {group!r}: add one here when adding the stage")


def test_stage_table_is_complete():
    """Every engine module that defines a STAGE is in the table, under its own group name, once."""
    package = Path(stage_mod.__file__).parent
    found = {}
    for path in sorted(package.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "\nSTAGE = Stage(" in text:
            found[path.stem] = text
    assert set(found) == set(STAGE_MODULES.values()), "atelier/stage.py STAGE_MODULES must list every stage module"
    assert len(set(STAGE_MODULES)) == len(STAGE_MODULES)


def test_group_must_be_an_identifier():
    with pytest.raises(ValueError):
        Stage(group="flux fill", make_handle=None, need_bytes=None, load=None, summary=None)


@pytest.mark.parametrize("group", list(STAGE_MODULES))
def test_stage_contract(group, tiny_dir, tmp_path_factory, clean_registry):
    stage = stage_of(group)
    module = importlib.import_module(f"atelier.{STAGE_MODULES[group]}")
    assert module.STAGE is stage and stage.group == group
    spec = _spec(group, tmp_path_factory.getbasetemp(), tiny_dir)
    hash(spec)  # the registry key

    loads = REGISTRY.loads
    handle = stage.make_handle(spec, None)
    assert REGISTRY.loads == loads and REGISTRY.get(spec) is None, "make_handle must not load"
    assert dataclasses.is_dataclass(handle) and handle.spec == spec
    assert dataclasses.fields(handle) and type(handle).__dataclass_params__.frozen
    need = stage.need_bytes(handle, None)
    assert isinstance(need, int) and need >= 0
    line = stage.summary(handle, None)
    assert isinstance(line, str) and line and "\n" not in line

    model = stage_mod.get(stage, handle)
    assert REGISTRY.loads == loads + 1 and REGISTRY.get(spec) is model
    assert stage_mod.get(stage, handle) is model, "a second get reuses the loaded model"
    assert isinstance(model.resident_bytes, int) and model.resident_bytes >= 0
    assert str(model.device) == "cpu"
    assert isinstance(model.notes, list)
    text = stage.summary(handle, model)
    assert text.splitlines()[0] and all(n in text for n in model.notes)

    assert REGISTRY.release(spec)
    again = stage_mod.get(stage, handle)  # a handle whose model was released rebuilds it
    assert again is not model and REGISTRY.loads == loads + 2


def test_released_error_says_what_to_do():
    err = stage_mod.released("FLUX Fill pipeline")
    assert "released" in str(err) and "Queue the prompt again" in str(err)
