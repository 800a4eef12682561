"""The one conftest of the test tree. Every fixture is defined once, in a tests/harness module loaded here as a
pytest plugin (the repository root is on sys.path through pytest.ini's `pythonpath = ..`):

* tests.harness.engine_fixtures: the tiny random FLUX.1 Fill in both layouts, the plain-diffusers reference, an
  empty model registry (tests/engine, tests/gpu);
* tests.harness.comfy_fixtures: one real ComfyUI server per test process with the pack, its client, websocket,
  log and the tiny FLUX in its models/ tree (tests/comfy, tests/compat, tests/browser);
* tests.harness.browser_fixtures: headless Chromium, a page on the server, screenshots, the uploaded inputs
  (tests/browser);
* tests.harness.batch_fixtures: a local Ray cluster and CPU servers for the batch runner (tests/batch).

Session fixtures are built only when a test asks for them: `pytest tests/engine` never boots ComfyUI.
Markers by folder: tests under tests/browser are marked `browser` and run last (Playwright's sync API keeps its
event loop running in the main thread until the session's browser closes, so an `asyncio.run` in any test after
them would fail); tests marked `gpu` are skipped without CUDA.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.harness.engine_fixtures",
    "tests.harness.comfy_fixtures",
    "tests.harness.browser_fixtures",
    "tests.harness.batch_fixtures",
]

BROWSER_DIR = Path(__file__).resolve().parent / "browser"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if BROWSER_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)  # stable: browser tier last
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
            for item in gpu:
                item.add_marker(skip)
