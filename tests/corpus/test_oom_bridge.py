"""The bridge's node guard (nodes/_bridge.py: guard) in-process on CPU, with a simulated CUDA out-of-memory.

The GPU twin (tests/gpu/test_gpu_oom.py) makes a real OOM under a hard VRAM cap; here a node raises
torch.OutOfMemoryError itself, so the translation, the unloading and the input checks are tested on every CI run.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.harness.comfy_server import comfy_root

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bridge():
    """nodes/_bridge.py imported as ComfyUI would (the pack as a package, ComfyUI's tree importable, --cpu)."""
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # also when another test imported cli_args before (args not parsed then)
        import comfy.model_management  # noqa: F401  (CPU from here on)

        if "atelier_pack" not in sys.modules:
            spec = importlib.util.spec_from_file_location("atelier_pack", REPO_ROOT / "__init__.py",
                                                          submodule_search_locations=[str(REPO_ROOT)])
            module = importlib.util.module_from_spec(spec)
            sys.modules["atelier_pack"] = module
            spec.loader.exec_module(module)
        return importlib.import_module("atelier_pack.nodes._bridge")
    finally:
        sys.argv = argv


def _node(bridge, run):
    from comfy_api.latest import io

    class FakeRun(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="AtelierFakeRun", inputs=[], outputs=[])

        @classmethod
        def execute(cls, **kwargs):
            return run(**kwargs)

    return bridge.guard(FakeRun)


class _Spec:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Handle:
    def __init__(self):
        self.offload = "none"
        self.spec = _Spec(quantization="none", offload="auto", vae_tiling=False)


def test_oom_becomes_a_setting_error_naming_the_toggles_and_models_are_unloaded(bridge, monkeypatch):
    calls = []
    mm = bridge.mm
    monkeypatch.setattr(mm, "unload_all_models", lambda: calls.append("unload"))
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: calls.append("empty_cache"))
    released = []
    monkeypatch.setattr(bridge.REGISTRY, "release_all", lambda: released.append(True) or 0)

    def run(**kwargs):
        big = torch.zeros(1024)  # noqa: F841  (a frame local the traceback would keep alive)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity "
                                     "of 23.55 GiB of which 1.2 GiB is free.")

    node = _node(bridge, run)
    with pytest.raises(bridge.guards.SettingError) as e:
        node.execute(pipe=_Handle(), steps=2, prompt="a vase")
    msg = str(e.value)
    for toggle in ("offload", "quantization", "vae_tiling", "lower resolution"):
        assert toggle in msg, (toggle, msg)
    assert "FakeRun" in msg and e.value.__cause__ is None and e.value.__context__ is None
    assert calls == ["unload", "empty_cache"] and released == [True]


def test_guard_refuses_nan_and_surrogates_before_the_node_runs(bridge):
    ran = []
    node = _node(bridge, lambda **kw: ran.append(kw))
    with pytest.raises(bridge.guards.InputError, match="'guidance'"):
        node.execute(guidance=float("nan"))
    with pytest.raises(bridge.guards.InputError, match="'prompt'"):
        node.execute(prompt="a \ud800 b")
    node.execute(guidance=3.5, prompt="꽃병 🌻")
    assert ran == [{"guidance": 3.5, "prompt": "꽃병 🌻"}]
    assert bridge.guard(node) is node  # idempotent


def test_other_errors_and_stop_pass_through_untouched(bridge):
    import comfy.model_management as mm

    def stop(**kwargs):
        raise mm.InterruptProcessingException()

    with pytest.raises(mm.InterruptProcessingException):
        _node(bridge, stop).execute()

    def key(**kwargs):
        raise KeyError("x")

    with pytest.raises(KeyError):
        _node(bridge, key).execute()


def test_guard_checks_combo_values_against_the_schema(bridge):
    from comfy_api.latest import io

    class FakeLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="AtelierFakeLoader", inputs=[
                io.Combo.Input("offload", options=["auto", "none", "model"], tooltip="t")], outputs=[])

        @classmethod
        def execute(cls, offload):
            return offload

    node = bridge.guard(FakeLoader)
    assert node.execute(offload="model") == "model"
    with pytest.raises(bridge.guards.InputError, match="offload one of auto, none, model; got 'disk'"):
        node.execute(offload="disk")
