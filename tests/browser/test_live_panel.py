"""The live character panel in the real frontend, with Chromium's fake camera playing a generated .y4m: the panel
opens the webcam, sends frames, shows generated frames and the fps; frames never queue up (two in flight at most,
the server keeps only the newest waiting one)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.harness import frontend
from tests.harness.workflow_inputs import place_character_models

log = logging.getLogger("atelier.tests")

SIDE = 64


def write_y4m(path: Path, frames: int = 12, side: int = SIDE) -> Path:
    """A YUV4MPEG2 (4:2:0) clip: a bar moving across a grey field, what Chromium's fake camera plays in a loop."""
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{side} H{side} F10:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            y = np.full((side, side), 120, np.uint8)
            x = (i * side // frames) % side
            y[:, x:x + 6] = 235
            f.write(b"FRAME\n" + y.tobytes() + np.full(side * side // 2, 128, np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def camera_browser(browser, tmp_path_factory):
    """A second Chromium from the session's Playwright: the fake camera flags apply to a whole browser."""
    clip = write_y4m(tmp_path_factory.mktemp("camera") / "dance.y4m")
    cam = browser.browser_type.launch(executable_path=frontend.chromium_path(), headless=True, args=[
        *frontend.LAUNCH_ARGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={clip}"])
    yield cam
    cam.close()


def test_live_panel_with_the_fake_camera(camera_browser, comfy_server, client, comfy_base, tmp_path_factory,
                                         frontend_user):
    from tests.comfy.test_animate_api import graph

    choices = place_character_models(comfy_base / "models", tmp_path_factory.getbasetemp())
    entry = client.run(graph(choices, frames=1), timeout=600)  # the run the panel animates with
    assert client.succeeded(entry), client.error_message(entry)

    context = frontend.new_context(camera_browser)
    page = frontend.open_app(context, comfy_server.url)
    try:
        page.click(".atelier-live-tab-button")
        page.wait_for_selector(".atelier-live-webcam", timeout=30_000)
        page.wait_for_function("() => document.querySelector('.atelier-live-status')?.textContent"
                               ".includes('character:')", timeout=30_000)
        page.fill(".atelier-live-size", str(SIDE))
        page.select_option(".atelier-live-pose", "none")
        page.click(".atelier-live-webcam")
        try:  # eight frames shown, or the panel stopped itself (an error in its status line)
            page.wait_for_function("() => { const p = window.atelierLivePanel; return p && (p.frames >= 8 || "
                                   "(p.sent > 0 && !p.running)) }", timeout=240_000)
        finally:
            state = page.evaluate("() => { const p = window.atelierLivePanel; return {frames: p?.frames, "
                                  "sent: p?.sent, dropped: p?.dropped, inFlight: p?.inFlight, running: p?.running, "
                                  "status: document.querySelector('.atelier-live-status')?.textContent} }")
            log.info(f"live panel state: {state}")
        assert (state["frames"] or 0) >= 8, f"the panel stopped before 8 frames: {state}"
        assert page.input_value(".atelier-live-pose") == "none"  # starting the camera refreshes the list, keeps the pick
        panel = page.evaluate("() => { const p = window.atelierLivePanel; return {frames: p.frames, sent: p.sent, "
                              "dropped: p.dropped, inFlight: p.inFlight, delivered: p.delivered, model: p.modelFps,"
                              " w: document.querySelector('.atelier-live-output').naturalWidth,"
                              " fps: document.querySelector('.atelier-live-fps').textContent} }")
        page.click(".atelier-live-stop")
    finally:
        context.close()
    log.info(f"live panel: {panel}")
    assert panel["w"] == SIDE and "fps shown" in panel["fps"]
    assert panel["inFlight"] <= 2  # never more than one generating + one waiting
    assert panel["delivered"] > 0 and panel["model"] > 0
    # what was sent was shown, dropped (replaced by a newer frame) or is one of the two in flight: no backlog
    assert panel["sent"] - panel["frames"] - panel["dropped"] <= 2
