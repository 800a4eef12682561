"""Pytest fixtures for every tier that needs a real ComfyUI server (tests/comfy, tests/compat, tests/browser).

Loaded once as a pytest plugin by tests/conftest.py, so the session fixtures are one per test process:
`pytest tests` boots ComfyUI once for all directories and stops it at the end of the session.

The ComfyUI tree comes from `bash .ci/setup_env.sh` ($ATELIER_COMFYUI or $ATELIER_CACHE/comfyui). When it is
missing the fixtures fail (never skip): CI must install it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.harness.comfy_server import (
    ComfyClient,
    ComfyServer,
    ComfyUINotInstalled,
    ServerStartError,
    WsListener,
    comfy_root,
)

log = logging.getLogger("atelier.tests.comfy")

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FOLDERS = ("diffusers", "diffusion_models", "text_encoders", "vae", "loras", "LLM", "sam2", "background_removal",
                 "fastcomposer", "checkpoints", "pose", "depth")
TINY_DIFFUSERS_NAME = "flux-fill-tiny"


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """The server's --base-directory, with an empty models/ tree the tests can drop files into."""
    base = tmp_path_factory.mktemp("comfy_base")
    for name in MODEL_FOLDERS:
        (base / "models" / name).mkdir(parents=True, exist_ok=True)
    return base


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    """A running ComfyUI (CPU) with this repository as custom_nodes/atelier; one per test process."""
    problem = None
    try:
        comfy_root()
    except ComfyUINotInstalled as e:
        problem = str(e)
    if problem:
        pytest.fail(problem, pytrace=False)
    server = ComfyServer(comfy_base, REPO_ROOT)
    try:
        server.start(timeout=240)
    except ServerStartError as e:
        problem = f"ComfyUI did not start: {e}"
    if problem:
        server.stop()
        pytest.fail(problem, pytrace=False)
    log.info("ComfyUI up at %s in %.1f s", server.url, server.boot_seconds)
    try:
        yield server
    finally:
        rc = server.stop()
        log.info("ComfyUI stopped (exit code %s); log at %s", rc, server.log_path)


@pytest.fixture(scope="session")
def client(comfy_server):
    c = ComfyClient(comfy_server.url)
    yield c
    c.close()


@pytest.fixture
def ws(comfy_server, client):
    """A websocket bound to `client`'s client_id, so it receives the events of prompts that client queues."""
    listener = WsListener(comfy_server.url, client.client_id)
    listener.wait_for("status", timeout=10)  # the server greets every new socket; after this it is registered
    yield listener
    listener.close()


@pytest.fixture
def server_log(comfy_server):
    """read(since=0) -> the server log from character offset `since`; len(read()) is a mark for later."""
    def read(since: int = 0) -> str:
        return comfy_server.log_text()[since:]
    return read


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used the server gets the server log's tail in its report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
        if server is not None:
            report.sections.append(("ComfyUI server log (last 60 lines)", server.log_tail(60)))


# ------------------------------------------------------------------------------------- tiny FLUX Fill models


@pytest.fixture(scope="session")
def tiny_flux(comfy_base):
    """The tiny random FLUX.1 Fill in both layouts inside the server's models/ tree.

    Returns a dict: diffusers (folder), choice_diffusers / choice_single (the loader's combo values), and the
    single-file paths (transformer, clip_l, t5xxl, vae).
    """
    from tests.harness import tiny_flux as tf

    models = comfy_base / "models"
    folder = tf.build_diffusers(models / "diffusers" / TINY_DIFFUSERS_NAME)
    paths = tf.export_single_files(folder, models)
    return {
        "diffusers": folder,
        "choice_diffusers": f"diffusers/{TINY_DIFFUSERS_NAME}",
        "choice_single": "diffusion_models/" + Path(tf.SINGLE_FILES["transformer"]).name,
        **paths,
    }
