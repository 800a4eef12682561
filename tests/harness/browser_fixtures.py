"""Pytest fixtures of the browser tier: the real ComfyUI frontend in headless Chromium against the real server with
the pack (loaded as a pytest plugin by tests/conftest.py, beside tests/harness/comfy_fixtures.py whose server,
``client`` and ``comfy_base`` they use).

* ``browser`` (session): Playwright's Chromium (Debian's /usr/bin/chromium, headless, --no-sandbox). Skips the
  test, saying why, when Playwright or Chromium is missing (`bash .ci/setup_env.sh` installs both when root);
* ``page``: a new page on the server with the app ready (extensions loaded, graph set up) and empty browser
  storage, for ComfyUI's default user with the settings of tests/harness/frontend.py (SETTINGS); pages share one
  browser context (``browser_context``: HTTP and code caches). The page records console messages, page errors and
  failed requests: ``log_of(page).problems(since=mark)``;
* ``artifacts``: tests/browser/_artifacts/ (git-ignored): screenshots and results worth looking at. A failing test
  that used ``page`` leaves ``_artifacts/failed/<test>.png`` there and its page problems in the report;
* ``uploads`` (module): the pictures and the PSD the workflows' loaders name, uploaded to the server.

Helpers (import them from tests.harness.frontend): ``load_workflow(page, path_or_doc)`` (the drop handler's path),
``dialogs(page)``, ``missing_node_types(page)``, ``widgets(page)``, ``widget_problems(doc, widgets, object_info)``,
``set_widget(page, node_id, name, value)``, ``queue(page)`` (presses Run), ``wait_done(page, prompt_id)``,
``graph_to_prompt(page)``, ``show_node(page, node_id)``, ``text_box(page, node_id)``, ``screenshot_canvas(page,
path)``, ``screenshot_node(page, node_id, path)``, ``loaded_extensions(page)``.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness import frontend

ARTIFACTS = Path(__file__).resolve().parents[1] / "browser" / "_artifacts"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright (sync API); skipped with the reason when it cannot run here."""
    for old in (ARTIFACTS / "failed").glob("*.png"):  # failure screenshots are for this run only
        old.unlink()
    try:
        pw, b = frontend.start_playwright()
    except frontend.BrowserUnavailable as e:
        pytest.skip(f"browser tier skipped: {e}")
    try:
        yield b
    finally:
        b.close()
        pw.stop()


@pytest.fixture(scope="session")
def frontend_user(comfy_server) -> dict:
    """The settings of ComfyUI's default user that every page opens with (stored once per server)."""
    frontend.prepare_user(comfy_server.url)
    return dict(frontend.SETTINGS)


@pytest.fixture(scope="session")
def browser_context(browser, frontend_user):
    """One context for the session (shared caches); every page starts with empty browser storage."""
    context = frontend.new_context(browser)
    yield context
    context.close()


@pytest.fixture
def page(browser_context, comfy_server):
    """A new page on the server, app ready, with empty browser storage; closed after the test."""
    pg = frontend.open_app(browser_context, comfy_server.url)
    try:
        yield pg
    finally:
        pg.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Failing browser tests: the page's problems and a screenshot of the page (the server log's tail comes from
    comfy_fixtures' hook)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when == "call":
        pg = getattr(item, "funcargs", {}).get("page")
        if pg is not None:
            try:
                report.sections.append(("page problems", "\n".join(frontend.log_of(pg).problems()) or "none"))
                shot = ARTIFACTS / "failed" / (re.sub(r"[^\w.-]+", "_", item.name) + ".png")
                shot.parent.mkdir(parents=True, exist_ok=True)
                pg.screenshot(path=str(shot))
                report.sections.append(("page screenshot", str(shot)))
            except Exception as e:  # the page may be gone; the report matters more
                report.sections.append(("page screenshot", f"not taken: {e!r}"))


@pytest.fixture(scope="module")
def uploads(client) -> dict:
    """The pictures and the PSD the workflows' loaders name, uploaded the way the upload button does."""
    from tests.harness.workflow_inputs import input_files

    files = input_files()
    for name, data in files.items():
        assert client.upload_image(data, name) == name
    return files
