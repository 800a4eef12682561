"""The pack's __init__.py (ComfyUI's entry) reports why a stage's nodes are off, with a stand-in comfy_api.

The real __init__.py is copied into a pack folder of stand-in stage modules and imported the way ComfyUI imports a
custom node folder (under its path as module name): a missing third-party package gives the one-line pip hint; a
missing module inside the pack, and any other error while a stage module is imported, give the traceback and name
the pack's module, never a pip package; the other stages still load.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import shutil
import sys
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

STAGE_MODULES = {
    # the one third-party import that is missing
    "fill": "import atelier_test_no_such_package  # noqa: F401\nNODES = []\n",
    # a relative import of a pack module that does not exist (e.g. a file renamed without its imports)
    "caption": "from ..atelier.no_such_stage import run  # noqa: F401\nNODES = []\n",
    # a name a pack module does not define
    "layers": "from ..atelier.broken_name import no_such_name  # noqa: F401\nNODES = []\n",
    # a pack module that raises while it is imported
    "mask": "from ..atelier import broken  # noqa: F401\nNODES = []\n",
    # an absolute import of the engine (works in the test tier only, where the repository root is on sys.path)
    "sam2": "import atelier_pack_probe.helpers  # noqa: F401\nNODES = []\n",
    # fine
    "placement": "NODES = ['placement node']\n",
}


@pytest.fixture
def fake_comfy_api(monkeypatch):
    latest = types.ModuleType("comfy_api.latest")

    class ComfyExtension:
        pass

    latest.ComfyExtension = ComfyExtension
    latest.io = types.SimpleNamespace(ComfyNode=object)
    root = types.ModuleType("comfy_api")
    root.latest = latest
    monkeypatch.setitem(sys.modules, "comfy_api", root)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    return latest


def import_pack(folder: Path):
    """As ComfyUI's load_custom_node does: the folder's path (dots escaped) is the module name."""
    name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        return module, name
    except BaseException:
        del sys.modules[name]
        raise


@pytest.fixture
def pack(tmp_path, fake_comfy_api):
    folder = tmp_path / "atelier_pack_probe"
    (folder / "nodes").mkdir(parents=True)
    (folder / "atelier").mkdir()
    shutil.copy(REPO_ROOT / "__init__.py", folder / "__init__.py")
    (folder / "nodes" / "__init__.py").write_text("")
    (folder / "atelier" / "__init__.py").write_text("")
    (folder / "atelier" / "broken.py").write_text("X = 1\nraise ValueError('a bug at import time')\n")
    (folder / "atelier" / "broken_name.py").write_text("something_else = 1\n")
    (folder / "helpers.py").write_text("")
    for stage, text in STAGE_MODULES.items():
        (folder / "nodes" / f"{stage}.py").write_text(text)
    module, name = import_pack(folder)
    yield module
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def node_list(module) -> list:
    async def run():
        return await (await module.comfy_entrypoint()).get_node_list()

    return asyncio.run(run())


def records_of(caplog, stage: str) -> list:
    return [r for r in caplog.records if r.name == "atelier" and f"the {stage} nodes are off" in r.getMessage()]


def test_each_failure_is_reported_for_what_it_is_and_the_other_stages_load(pack, caplog):
    with caplog.at_level(logging.INFO, logger="atelier"):
        nodes = node_list(pack)
    assert nodes == ["placement node"]

    [third_party] = records_of(caplog, "fill")
    assert third_party.levelno == logging.WARNING and third_party.exc_info is None  # one line, no traceback
    assert third_party.getMessage() == ("Atelier: the fill nodes are off: the Python package "
                                        "'atelier_test_no_such_package' is missing (pip install "
                                        "atelier_test_no_such_package; see README)")

    [inside] = records_of(caplog, "caption")
    text = inside.getMessage()
    assert inside.levelno == logging.ERROR and isinstance(inside.exc_info[1], ModuleNotFoundError)
    assert "Atelier's own module 'atelier.no_such_stage' is missing" in text
    assert "nodes/caption.py:1" in text and "pip install" not in text

    [name] = records_of(caplog, "layers")
    text = name.getMessage()
    assert name.levelno == logging.ERROR and type(name.exc_info[1]) is ImportError
    assert "ImportError in Atelier's module 'atelier.broken_name': cannot import name 'no_such_name'" in text
    assert "nodes/layers.py:1" in text and "pip install" not in text

    [raised] = records_of(caplog, "mask")
    text = raised.getMessage()
    assert raised.levelno == logging.ERROR and isinstance(raised.exc_info[1], ValueError)
    assert "atelier/broken.py:2" in text and "ValueError: a bug at import time" in text
    assert "pip install" not in text

    [absolute] = records_of(caplog, "sam2")
    text = absolute.getMessage()
    assert "Atelier's own module 'atelier_pack_probe" in text and "pip install" not in text


def test_the_traceback_is_in_the_log_output(pack, caplog):
    with caplog.at_level(logging.INFO, logger="atelier"):
        node_list(pack)
    # what ComfyUI's console shows: the formatted record with the traceback down to our module's line
    assert "Traceback (most recent call last)" in caplog.text
    assert "raise ValueError('a bug at import time')" in caplog.text
    assert "from ..atelier.no_such_stage import run" in caplog.text


def test_without_the_v3_api_one_clear_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))  # an old ComfyUI: no .latest
    monkeypatch.setitem(sys.modules, "comfy_api.latest", None)
    folder = tmp_path / "old_comfy_pack"
    folder.mkdir()
    shutil.copy(REPO_ROOT / "__init__.py", folder / "__init__.py")
    with caplog.at_level(logging.INFO, logger="atelier"):
        module, name = import_pack(folder)
    del sys.modules[name]
    assert not hasattr(module, "comfy_entrypoint") and module.WEB_DIRECTORY == "./web"
    assert [r.getMessage() for r in caplog.records if r.name == "atelier"] == [
        "Atelier needs ComfyUI >= 0.3.75 (the comfy_api.latest V3 node API); update ComfyUI to use it."]
