"""Drive ComfyUI's real frontend (the comfyui-frontend-package the server serves) in headless Chromium.

The artist's path, step by step: open the page, drop a workflow file on the canvas, change a widget, press Run,
look at the result. Playwright for Python (sync API) drives Debian's ``chromium`` (/usr/bin/chromium, or
$ATELIER_CHROMIUM); Playwright's own browser download is never used. No pytest in here: tests/browser/conftest.py
wraps it in fixtures, and anything else (a script) can use it too.

Typical use (``page`` from :func:`open_app`, or the ``page`` fixture)::

    doc = load_workflow(page, Path("workflows/flux_fill_inpaint.json"))     # the drop handler's path
    assert not dialogs(page) and not missing_node_types(page)
    set_widget(page, 2, "model", "diffusers/flux-fill-tiny")               # what the artist would pick
    prompt_id = queue(page)                                                 # presses Run
    entry = wait_done(page, prompt_id)                                      # /history says success or error
    assert not log_of(page).problems()                                      # no console errors, page errors, 404s

What the frontend (1.32.9 with ComfyUI 0.3.75, 1.47.12 with 0.30.0) reports on its own, and where these helpers
look for it:

* missing node types: a "missing nodes" dialog (1.32) or the error overlay under the action bar (1.47), both in
  ``dialogs``; a placeholder node of an unregistered type, drawn red (``missing_node_types``);
* model files the server does not list (1.47 only): nodes drawn red, the error overlay, its missingModel store
  (``missing_models``); picking a file that exists clears them (``set_widget``);
* workflow schema / link problems: warning and error toasts (``dialogs`` lists toasts too);
* widget values: applied **positionally and silently**; the frontend never complains about a value too many, a
  value too few or a value in the wrong slot. ``widgets(page)`` returns what each node's widgets hold, and
  ``tests/browser`` compares that with the file and with the schema.
* a prompt the server rejects or a run that fails: an error dialog (``dialogs``), ``queue`` raises, ``wait_done``
  returns the /history entry with status "error".

Where 1.47 differs from 1.32 and these helpers cover both: the Run button (``queue`` looks for it by role inside
the action bar's ``queue-button`` test id, where 1.47 moved that id); text widgets (``widget.element``, 1.47
deprecates ``inputEl``); the frontend's own load-time warnings (``KNOWN_FRONTEND_ERRORS``: the legacy queue menu,
"graph accessed before initialization", ``open_maskeditor`` deprecated) are not counted as page problems; and
the loading mask a workflow drop can leave behind (the known PrimeVue BlockUI removeMask bug) is removed after
``load_workflow`` so that it cannot swallow the next click.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger("atelier.frontend")

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}

# Settings of the test user (ComfyUI's "default" user): things an artist may set, chosen for an offline machine.
SETTINGS = {
    "Comfy.TutorialCompleted": True,  # a new user gets the templates dialog on first load
    "Comfy.Notification.ShowVersionUpdates": False,  # no release check against api.comfy.org (offline)
    "Comfy.Minimap.Visible": False,  # keeps screenshots clean
    "Comfy.Graph.CanvasMenu": False,  # the zoom buttons over the canvas' corner, same reason
}
# Browser-side flags (localStorage) for banners that would cover the canvas in screenshots.
LOCAL_STORAGE = {"vueNodesBannerDismissed": "true", "comfy.vueNodesMigration.dismissed": "true"}

# Files the frontend asks for that a plain ComfyUI does not have: HTTP 404 by design, not a problem of the pack.
# {start of the path (with its query): why}
KNOWN_404 = {
    "/user.css": "optional user stylesheet",
    "/api/userdata/user.css": "optional user stylesheet",
    "/api/userdata/comfy.templates.json": "legacy saved node templates (none saved)",
    "/api/userdata?dir=workflows&": "the user has no saved workflows yet (no folder: 404)",
    "/api/userdata?dir=subgraphs": "the user has no saved subgraphs yet (no folder: 404)",
}
# Console errors of the frontend itself (not caused by the pack or the test machine): {regex on the text: why}.
KNOWN_FRONTEND_ERRORS = {
    r"TypeError: Cannot read properties of undefined \(reading 'id'\)\n\s+at onChange \(":
        "frontend 1.32.9, on every page load: useRenderModeSetting writes LiteGraph.Canvas.MinFontSizeForLOD "
        "before the core settings are registered (settingStore.set -> onChange(undefined))",
    r"NotFoundError: Failed to execute 'removeChild' on 'Node'.*\n\s+at Proxy\.removeMask "
    r"\([^)]*(primevue/blockui/|/vendor-primevue-)":
        "frontend 1.32.9 and 1.47.12 / PrimeVue BlockUI, now and then on a drop: the app's full-screen loading mask "
        "(App.vue, blocked while a dropped file loads) is removed twice when loading ends within its enter "
        "animation; 1.47 leaves a mask over the page then (settle_loading_mask removes that left-over)",
    r"\[ComfyUI\] The legacy queue/history menu is deprecated":
        "frontend 1.47.12 (ComfyUI 0.30.0), twice on every page load with no custom node at all: the legacy "
        "ComfyUI menu object still builds its queue and history ComfyList, whose constructor warns",
    r"ComfyApp graph accessed before initialization":
        "frontend 1.47.12, on every page load with no custom node at all: the app reads rootGraph during setup",
    r"\[MaskEditor\] ComfyApp\.open_maskeditor is deprecated":
        "frontend 1.47.12, on every page load with no custom node at all: its own mask editor shim touches the "
        "deprecated static",
}


def known_frontend_error(text: str) -> bool:
    return any(re.match(rx, text, re.DOTALL) for rx in KNOWN_FRONTEND_ERRORS)


class BrowserUnavailable(RuntimeError):
    """Playwright or Chromium is missing; the message says how to install it."""


def chromium_path() -> str:
    """$ATELIER_CHROMIUM, else `chromium` on PATH, else /usr/bin/chromium; raises BrowserUnavailable if none."""
    env = os.environ.get("ATELIER_CHROMIUM")
    for cand in ([env] if env else []) + [shutil.which("chromium"), "/usr/bin/chromium"]:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise BrowserUnavailable("no Chromium found (looked at $ATELIER_CHROMIUM, `chromium` on PATH, /usr/bin/chromium):"
                             " install Debian's `chromium` (`bash .ci/setup_env.sh` does it when run as root)")


def start_playwright():
    """(playwright, browser): Playwright's sync API driving the system Chromium, headless."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise BrowserUnavailable(f"Playwright for Python is not installed ({e}): `pip install -r "
                                 "tests/requirements.txt` (bash .ci/setup_env.sh does it)") from e
    exe = chromium_path()
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=LAUNCH_ARGS)
    except Exception as e:
        pw.stop()
        raise BrowserUnavailable(f"Chromium at {exe} did not start under Playwright: {e}") from e
    log.info("Chromium %s at %s", browser.version, exe)
    return pw, browser


def prepare_user(url: str, settings: dict | None = None) -> None:
    """Store SETTINGS (plus `settings`) for ComfyUI's default user through POST /api/settings."""
    body = dict(SETTINGS, **(settings or {}))
    r = requests.post(url.rstrip("/") + "/api/settings", json=body, timeout=30)
    r.raise_for_status()


# --------------------------------------------------------------------------------------------------------------
# What the page says: console, page errors, failed requests
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FrontendLog:
    """Everything a page reported, in order. ``mark()`` then ``problems(since=mark)`` looks at one step only."""

    entries: list = field(default_factory=list)  # (kind, text): console.<type>, pageerror, http <status>
    sent: list = field(default_factory=list)  # the bodies of POST /api/prompt the page sent (queue())
    queued: list = field(default_factory=list)  # the prompt ids the server gave back for them

    def add(self, kind: str, text: str) -> None:
        self.entries.append((kind, text))
        if kind in ("console.error", "console.warning", "pageerror") or kind.startswith("http"):
            log.debug("page %s: %s", kind, text[:500])

    def mark(self) -> int:
        return len(self.entries)

    def problems(self, since: int = 0, ignore: tuple = ()) -> list:
        """Console errors and warnings, uncaught page errors and HTTP errors from the server after `since`.

        Not counted: KNOWN_404 files, the browser's own "Failed to load resource" console line (the HTTP entry
        that comes with it names the URL and is judged instead), requests to other hosts (the machine is offline),
        KNOWN_FRONTEND_ERRORS, and messages containing any string of `ignore`."""
        out = []
        for kind, text in self.entries[since:]:
            if kind in ("console.error", "console.warning", "console.assert"):
                if text.startswith("Failed to load resource") or known_frontend_error(text):
                    continue
            elif kind.startswith("http"):
                if kind == "http 404" and text.startswith(tuple(KNOWN_404)):
                    continue
            elif kind not in ("pageerror", "requestfailed"):
                continue
            if any(s in text for s in ignore):
                continue
            out.append(f"{kind}: {text}")
        return out

    def texts(self, kind_prefix: str = "console", since: int = 0) -> list:
        return [t for k, t in self.entries[since:] if k.startswith(kind_prefix)]


_LOGS: weakref.WeakKeyDictionary[Any, FrontendLog] = weakref.WeakKeyDictionary()


def log_of(page) -> FrontendLog:
    """The FrontendLog that :func:`attach_log` (and :func:`open_app`) keeps for `page`."""
    return _LOGS[page]


def attach_log(page, server_url: str) -> FrontendLog:
    flog = FrontendLog()
    origin = server_url.rstrip("/")

    def on_response(resp):
        if resp.status >= 400 and resp.url.startswith(origin):
            flog.add(f"http {resp.status}", resp.url[len(origin):])

    page.on("console", lambda m: flog.add(f"console.{m.type}", m.text))
    page.on("pageerror", lambda e: flog.add("pageerror", f"{e}\n{getattr(e, 'stack', '') or ''}".strip()))
    def on_failed(req):
        failure = req.failure or ""
        if req.url.startswith(origin) and "ERR_ABORTED" not in failure:  # aborted: the page moved on
            flog.add("requestfailed", f"{req.url[len(origin):]} ({failure})")

    page.on("response", on_response)
    page.on("requestfailed", on_failed)
    _LOGS[page] = flog
    return flog


# --------------------------------------------------------------------------------------------------------------
# Opening the app
# --------------------------------------------------------------------------------------------------------------

_EVENT_RECORDER = """
() => {
  if (window.__atelier) return;
  window.__atelier = {events: []};
  for (const type of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted',
                      'execution_cached', 'executed']) {
    window.app.api.addEventListener(type, (e) => {
      const d = e.detail || {};
      window.__atelier.events.push({type, prompt_id: d.prompt_id ?? null, node: d.node ?? d.node_id ?? null});
    });
  }
}
"""


def open_app(context, server_url: str, timeout: float = 60) -> Any:
    """A new page on `server_url` with the app set up (extensions loaded, graph ready) and a FrontendLog."""
    page = context.new_page()
    attach_log(page, server_url)
    page.goto(server_url.rstrip("/") + "/", wait_until="load", timeout=timeout * 1000)
    page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.app.vueAppReady "
                           "&& window.app.extensionManager", timeout=timeout * 1000)
    page.evaluate(_EVENT_RECORDER)
    return page


def new_context(browser, **kw):
    """A browser context whose every new page starts with empty localStorage / sessionStorage (no workflow tabs
    restored from an earlier page) plus the flags of LOCAL_STORAGE, set before any script of the page runs.

    Pages of one context share the HTTP and compiled-code caches: opening the app again is ~1/3 faster."""
    context = browser.new_context(viewport=kw.pop("viewport", VIEWPORT), **kw)
    flags = json.dumps(LOCAL_STORAGE)
    context.add_init_script(f"""(() => {{
      if (window.top !== window) return;
      localStorage.clear(); sessionStorage.clear();
      const kv = {flags}; for (const k in kv) localStorage.setItem(k, kv[k]);
    }})()""")
    return context


def loaded_extensions(page) -> list:
    """Names of the frontend extensions registered (core ones and every pack's web/js files that loaded)."""
    return page.evaluate("() => window.app.extensions.map(e => e.name)")


# --------------------------------------------------------------------------------------------------------------
# Loading a workflow the way a drop does
# --------------------------------------------------------------------------------------------------------------


def _as_doc(wf: str | Path | dict) -> tuple[dict, str, str]:
    """(document, file name, text) for a path, a JSON string or a dict."""
    if isinstance(wf, Path) or (isinstance(wf, str) and not wf.lstrip().startswith("{")):
        p = Path(wf)
        text = p.read_text(encoding="utf-8")
        return json.loads(text), p.name, text
    if isinstance(wf, str):
        return json.loads(wf), "workflow.json", wf
    return wf, "workflow.json", json.dumps(wf)


def load_workflow(page, wf: str | Path | dict, name: str | None = None, timeout: float = 30) -> dict:
    """Drop a workflow file on the canvas, exactly as an artist's drag and drop delivers it; returns the document.

    A File in a DataTransfer goes through dragenter/dragover/drop on the canvas, so the frontend's own drop
    handler reads it (app.handleFile -> loadGraphData, with its missing-node and validation checks). Waits until
    the new workflow tab is active and holds the document's nodes."""
    doc, fname, text = _as_doc(wf)
    fname = name or fname
    stem = fname.rsplit(".", 1)[0]
    page.evaluate(
        """([text, name]) => {
          const canvas = document.getElementById('graph-canvas');
          const r = canvas.getBoundingClientRect();
          const at = {clientX: r.left + r.width / 2, clientY: r.top + r.height / 2, bubbles: true, cancelable: true};
          const dt = new DataTransfer();
          dt.items.add(new File([text], name, {type: 'application/json'}));
          for (const type of ['dragenter', 'dragover', 'drop'])
            canvas.dispatchEvent(new DragEvent(type, {...at, dataTransfer: dt}));
        }""", [text, fname])
    want = len(doc.get("nodes") or [])
    try:
        page.wait_for_function(
            """([stem, want]) => {
              const wf = window.app.extensionManager.workflow.activeWorkflow;
              return wf && wf.filename === stem && window.app.graph.nodes.length === want;
            }""", arg=[stem, want], timeout=timeout * 1000)
    except Exception as e:
        state = page.evaluate("() => ({tab: window.app.extensionManager.workflow.activeWorkflow?.filename ?? null, "
                              "nodes: window.app.graph.nodes.length})")
        raise AssertionError(f"dropping {fname}: expected the tab {stem!r} with {want} nodes within {timeout:.0f} s, "
                             f"got {state}; dialogs: {dialogs(page)}; page problems: {log_of(page).problems()}") from e
    settle_loading_mask(page)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return doc


def settle_loading_mask(page, timeout: float = 30, leave_s: float = 2) -> int:
    """Wait until the app's full-screen loading mask is gone; returns how many stale masks had to be removed.

    The app (App.vue) covers the page with PrimeVue's BlockUI (full screen) while its spinner is on, e.g. while a
    dropped file loads. A known frontend bug (KNOWN_FRONTEND_ERRORS, the 'removeMask' entry): when the load ends
    within the mask's enter animation, BlockUI's removal runs twice and throws (NotFoundError on removeChild); on
    frontend 1.47 a mask is then left in the DOM for good, in its leave state, over the whole page, taking every
    click. A mask still there `leave_s` seconds after the spinner went off and still marked leaving (its fade-out
    lasts a fraction of a second) is that bug's left-over, not the app being busy: it is removed, and logged. Any
    other mask is left alone (a click it blocks fails with the reason)."""
    page.wait_for_function("() => !window.app.extensionManager?.spinner", timeout=timeout * 1000)
    try:
        page.wait_for_function("() => !document.querySelector('.p-blockui-mask')", timeout=leave_s * 1000)
        return 0
    except Exception:  # Playwright's TimeoutError
        pass
    removed = page.evaluate("""() => {
      if (window.app.extensionManager?.spinner) return 0;  // loading again: a live mask
      const stale = [...document.querySelectorAll('.p-blockui-mask.p-overlay-mask-leave')];
      stale.forEach(m => m.remove());
      return stale.length;
    }""")
    if removed:
        log.warning("removed %d stale loading mask(s) left by the frontend's BlockUI removeMask bug", removed)
    return removed


# --------------------------------------------------------------------------------------------------------------
# What the frontend shows: dialogs, toasts, node state, widgets
# --------------------------------------------------------------------------------------------------------------


# The app's Pinia stores (1.47's error bookkeeping lives there and nowhere else in a structured form).
_STORES = "document.querySelector('#vue-app')?.__vue_app__?.config.globalProperties.$pinia?._s"


def dialogs(page, except_missing_models: bool = False) -> list:
    """Open dialogs, visible toasts and the error overlay as "kind: text" strings (the missing-nodes dialog, error
    dialogs, validation toasts, ...). Empty when the frontend has nothing to say.

    Dialogs: PrimeVue's (``.p-dialog``, frontend 1.32) and any other ``role=dialog`` (1.47's templates browser is a
    reka-ui dialog). Frontend 1.47 reports a workflow's missing nodes and missing model files in an error overlay
    under the action bar (``data-testid=error-overlay``) instead of a dialog: listed as "error overlay: ...". With
    `except_missing_models` the overlay is left out when every error it counts is a missing model file (see
    :func:`missing_models`: the caller judges those itself)."""
    return page.evaluate("""(exceptModels) => {
      const seen = [], text = e => e.innerText.trim().replace(/\\s+/g, ' ').slice(0, 800);
      for (const d of document.querySelectorAll('.p-dialog, [role=dialog]')) {
        if (d.parentElement?.closest('.p-dialog, [role=dialog]')) continue;  // inside one listed already
        if (d.offsetParent === null && getComputedStyle(d).position !== 'fixed') continue;
        seen.push('dialog: ' + text(d));
      }
      for (const t of document.querySelectorAll('.p-toast-message')) {
        const sev = [...t.classList].find(c => c.startsWith('p-toast-message-') && c !== 'p-toast-message-content');
        seen.push('toast ' + (sev || '').replace('p-toast-message-', '') + ': ' + text(t));
      }
      const overlay = document.querySelector('[data-testid=error-overlay]');
      if (overlay && overlay.checkVisibility()) {
        const s = STORES, errors = s?.get('executionError'), models = s?.get('missingModel');
        const onlyModels = errors && models && models.missingModelCount > 0 &&
                           errors.totalErrorCount === models.missingModelCount;
        if (!(exceptModels && onlyModels)) seen.push('error overlay: ' + text(overlay));
      }
      return seen;
    }""".replace("STORES", _STORES), except_missing_models)


def dismiss(page, timeout: float = 10) -> None:
    """Close what :func:`dialogs` lists, as the artist does: Escape for a dialog, the close button of frontend
    1.47's error overlay; waits until they are gone."""
    if page.locator(".p-dialog, [role=dialog]").count():
        page.keyboard.press("Escape")
    close = page.locator("[data-testid=error-overlay-dismiss]")
    if close.count() and close.first.is_visible():
        close.first.click()
    page.wait_for_function("() => !document.querySelector('.p-dialog, [role=dialog], [data-testid=error-overlay]')",
                           timeout=timeout * 1000)


def missing_node_types(page) -> list:
    """Node types of the loaded graph that the frontend does not know (it builds a placeholder node, drawn red).

    Judged by the registry (LiteGraph.registered_node_types), not by ``node.has_errors``: frontend 1.32 sets that
    flag for unknown types only, 1.47 also for a known node whose model combo names a file the server does not
    list (:func:`missing_models`)."""
    return page.evaluate("""() => window.app.graph.nodes
        .filter(n => !(n.type in LiteGraph.registered_node_types))
        .map(n => n.type)""")


def missing_models(page) -> list | None:
    """The model files the frontend itself reports missing after a load, as (node id, widget name, value) sorted;
    None where the frontend has no such check (1.32: it only warns about a workflow's ``models`` download list).

    Frontend 1.47 checks combos that name model files against the server's lists on load, draws those nodes red,
    opens the error overlay and keeps the list in its ``missingModel`` store; an artist picking a file that exists
    (:func:`set_widget`) clears the entry."""
    return page.evaluate("""() => {
      const s = STORES, m = s?.get('missingModel');
      if (!m) return null;
      return (m.missingModelCandidates || []).filter(c => c.isMissing !== false)
        .map(c => [String(c.nodeId), c.widgetName, c.name]).sort();
    }""".replace("STORES", _STORES))


def widgets(page) -> dict:
    """{node id (str): {"type", "widgets": [{name, type, value, serialize, options, min, max}], "inputs": [...],
    "widgets_values": what the frontend would save}} for every node of the graph."""
    return page.evaluate("""() => {
      const out = {};
      const saved = Object.fromEntries(window.app.graph.serialize().nodes.map(n => [String(n.id), n]));
      for (const n of window.app.graph.nodes) {
        out[String(n.id)] = {
          type: n.type,
          widgets: (n.widgets || []).map(w => ({
            name: w.name, type: w.type, value: w.value, serialize: w.serialize !== false,
            options: Array.isArray(w.options?.values) ? w.options.values : null,
            min: w.options?.min ?? null, max: w.options?.max ?? null,
          })),
          inputs: (n.inputs || []).map(i => ({name: i.name, type: i.type, link: i.link ?? null,
                                             widget: i.widget?.name ?? null})),
          outputs: (n.outputs || []).map(o => ({name: o.name, type: o.type})),
          widgets_values: saved[String(n.id)]?.widgets_values ?? null,
        };
      }
      return out;
    }""")


def graph_to_prompt(page) -> dict:
    """The API-format prompt the frontend would queue now ({node id: {class_type, inputs, _meta}})."""
    return page.evaluate("async () => (await window.app.graphToPrompt()).output")


def set_widget(page, node_id: int | str, name: str, value: Any) -> None:
    """Set a widget as the artist does (the widget's setValue: value, callback, then the node's onWidgetChanged,
    where frontend 1.47 clears the node's errors, a missing model file among them); a combo value must be an
    option."""
    err = page.evaluate("""([id, name, value]) => {
      const node = window.app.graph.getNodeById(Number(id));
      if (!node) return `no node ${id}`;
      const w = (node.widgets || []).find(w => w.name === name);
      if (!w) return `${node.type} #${id} has no widget ${name}; widgets: ${(node.widgets || []).map(w => w.name)}`;
      if (Array.isArray(w.options?.values) && !w.options.values.includes(value))
        return `${node.type}.${name}: ${JSON.stringify(value)} is not an option; options: ${JSON.stringify(w.options.values)}`;
      if (typeof w.setValue === 'function')  // what the canvas does on a click: callback, then node.onWidgetChanged
        w.setValue(value, {e: undefined, node, canvas: window.app.canvas});
      else {
        w.value = value;
        w.callback?.(value, window.app.canvas, node);
      }
      window.app.graph.setDirtyCanvas(true, true);
      return null;
    }""", [str(node_id), name, value])
    if err:
        raise AssertionError(f"set_widget: {err}")


def refresh_node_definitions(page, timeout: float = 60) -> None:
    """What pressing R does: reload /object_info so combos list files that appeared on disk since the page opened."""
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.RefreshNodeDefinitions')")
    page.wait_for_timeout(200)


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


class QueueRejected(AssertionError):
    pass


def queue(page, timeout: float = 30) -> str:
    """Press the Run button (the queue button of the action bar); returns the prompt id the server gave.

    Raises QueueRejected with the server's node_errors, or with the frontend's dialogs when nothing was sent."""
    # frontend 1.32 (ComfyUI 0.3.75): the test id is on the action bar's group, the Run button inside it;
    # frontend 1.47 (ComfyUI 0.30.0): the test id is on the Run button itself (text "Run" after a status icon)
    group = page.get_by_test_id("queue-button")
    button = group.get_by_role("button", name="Run", exact=True).or_(
        page.locator('button[data-testid="queue-button"]')).first
    settle_loading_mask(page)
    try:
        with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                                  timeout=timeout * 1000) as info:
            button.click()
    except Exception as e:
        raise QueueRejected(f"pressing Run sent no prompt within {timeout:.0f} s ({e}); dialogs: {dialogs(page)}; "
                            f"page problems: {log_of(page).problems()}") from e
    resp = info.value
    log_of(page).sent.append(resp.request.post_data_json)
    body = resp.json()
    if resp.status != 200 or not body.get("prompt_id"):
        raise QueueRejected(f"the server rejected the prompt the frontend queued (HTTP {resp.status}): "
                            f"{json.dumps(body)[:3000]}")
    if body.get("node_errors"):
        raise QueueRejected(f"prompt {body['prompt_id']} queued with node errors: {json.dumps(body['node_errors'])}")
    log_of(page).queued.append(body["prompt_id"])
    return body["prompt_id"]


def server_url_of(page) -> str:
    return page.evaluate("() => location.origin")


def wait_done(page, prompt_id: str | None = None, timeout: float = 300) -> dict:
    """Wait until /history has the prompt (by default the last one :func:`queue` sent) finished, success or error,
    and the page got the matching execution event.

    Returns the /history entry (see tests/harness/comfy_server.py for its shape)."""
    if prompt_id is None:
        if not log_of(page).queued:
            raise AssertionError("wait_done: this page has queued nothing (call queue(page) first)")
        prompt_id = log_of(page).queued[-1]
    url = server_url_of(page)
    deadline = time.monotonic() + timeout
    entry = None
    poll = 0.2
    while time.monotonic() < deadline:
        r = requests.get(f"{url}/history/{prompt_id}", timeout=30)
        r.raise_for_status()
        entry = r.json().get(prompt_id)
        status = (entry or {}).get("status") or {}
        if status.get("completed") or status.get("status_str"):
            break
        page.wait_for_timeout(poll * 1000)
        poll = min(poll * 1.5, 1.0)
    else:
        raise TimeoutError(f"prompt {prompt_id} not finished within {timeout:.0f} s; dialogs: {dialogs(page)}")
    left = max(deadline - time.monotonic(), 5)
    page.wait_for_function(
        """(id) => (window.__atelier?.events || []).some(e => e.prompt_id === id &&
             ['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type))""",
        arg=prompt_id, timeout=left * 1000)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return entry


def page_events(page, prompt_id: str | None = None) -> list:
    """The execution events the page received (type, prompt_id, node), optionally for one prompt."""
    ev = page.evaluate("() => window.__atelier?.events || []")
    return [e for e in ev if prompt_id is None or e["prompt_id"] == prompt_id]


def frames(page, n: int = 2) -> None:
    """Wait for `n` animation frames (the canvas and the DOM widgets over it redrawn)."""
    page.evaluate("(n) => new Promise(r => { const f = k => k ? requestAnimationFrame(() => f(k - 1)) : r(); f(n); })",
                  n)


def show_node(page, node_id: int | str, size: tuple | None = None) -> None:
    """Zoom 100 %, the node near the canvas' top-left corner (made `size` large if given): what an artist does to
    read or edit a node."""
    page.evaluate("""([id, size]) => {
      const node = window.app.graph.getNodeById(Number(id));
      if (size) node.setSize(size);
      const ds = window.app.canvas.ds;
      ds.scale = 1;
      ds.offset = [-node.pos[0] + 140, -node.pos[1] + 120];
      window.app.canvas.setDirty(true, true);
    }""", [str(node_id), list(size) if size else None])
    frames(page, 3)


def text_box(page, node_id: int | str, want: str | None = None, name: str = "atelier_info",
             timeout: float = 30) -> dict:
    """The read-only text box the pack's text extension shows on a node (web/js/atelier_common.js showText), as an
    artist sees it: the node is brought into view first (:func:`show_node`). Waits until the box holds `want` when
    given. Returns {value, read_only, saved (in widgets_values / the prompt), visible (on screen, inside the node,
    not covered: the element at its centre is the box)}; raises when the node never shows the box."""
    page.wait_for_function("""([id, name, want]) => {
      const w = (window.app.graph.getNodeById(Number(id))?.widgets || []).find(w => w.name === name);
      return w && (want === null || w.value === want);
    }""", arg=[str(node_id), name, want], timeout=timeout * 1000)
    show_node(page, node_id)
    return page.evaluate("""([id, name]) => {
      const node = window.app.graph.getNodeById(Number(id)), c = window.app.canvas, ds = c.ds;
      const w = node.widgets.find(w => w.name === name), el = w.element ?? w.inputEl, r = el.getBoundingClientRect();
      const cr = c.canvas.getBoundingClientRect(), b = node.boundingRect;
      const nx = cr.left + (b[0] + ds.offset[0]) * ds.scale, ny = cr.top + (b[1] + ds.offset[1]) * ds.scale;
      const inside = r.left >= nx - 1 && r.top >= ny - 1 && r.right <= nx + b[2] * ds.scale + 1 &&
                     r.bottom <= ny + b[3] * ds.scale + 1;
      const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
      return {value: w.value, read_only: el.readOnly,
              saved: w.serialize !== false || w.options?.serialize !== false,
              visible: el.isConnected && el.checkVisibility({opacityProperty: true, visibilityProperty: true}) &&
                       r.width > 20 && r.height > 10 && inside && (hit === el || el.contains(hit))};
    }""", [str(node_id), name])


# --------------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------------


def fit_view(page) -> None:
    """The canvas' Fit View command (key "."): every node in sight."""
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


_GRAPH_BOX = """(margin) => {
  const c = window.app.canvas, ds = c.ds, r = c.canvas.getBoundingClientRect();
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of window.app.graph.nodes) {
    const b = n.boundingRect;
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
  if (!isFinite(x0)) return null;
  const left = Math.max(r.left, r.left + (x0 + ds.offset[0]) * ds.scale - margin);
  const top = Math.max(r.top, r.top + (y0 + ds.offset[1]) * ds.scale - margin);
  const right = Math.min(r.right, r.left + (x1 + ds.offset[0]) * ds.scale + margin);
  const bottom = Math.min(r.bottom, r.top + (y1 + ds.offset[1]) * ds.scale + margin);
  return {x: left, y: top, width: right - left, height: bottom - top};
}"""


def screenshot_node(page, node_id: int | str, path: str | Path) -> Path:
    """A PNG of one node as it is on the screen now (with its DOM widgets)."""
    box = page.evaluate("""(id) => {
      const node = window.app.graph.getNodeById(Number(id)), c = window.app.canvas, ds = c.ds;
      const r = c.canvas.getBoundingClientRect(), b = node.boundingRect;
      return {x: r.left + (b[0] + ds.offset[0]) * ds.scale, y: r.top + (b[1] + ds.offset[1]) * ds.scale,
              width: b[2] * ds.scale, height: b[3] * ds.scale};
    }""", str(node_id))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip=box)
    return path


def screenshot_canvas(page, path: str | Path, fit: bool = True, focus: bool = True, crop: bool = True) -> Path:
    """A PNG of the canvas (with the DOM widgets drawn over it: text boxes, notes). `focus` hides the menus and
    side bars first (Focus Mode) and restores them afterwards; `fit` fits every node into view; `crop` keeps
    only the nodes' bounding box (plus a margin)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if focus:
        page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
    # full detail at any zoom (no low-quality boxes when a large graph is fitted), no FPS / node-count corner text
    saved = page.evaluate("""() => { const c = window.app.canvas; const s = [c.min_font_size_for_lod, c.show_info];
                                      c.min_font_size_for_lod = 0; c.show_info = false; c.setDirty(true, true);
                                      return s; }""")
    try:
        if fit:
            fit_view(page)
        page.wait_for_timeout(300)
        clip = page.evaluate(_GRAPH_BOX, 12) if crop else None
        page.screenshot(path=str(path), clip=clip)
    finally:
        page.evaluate("""(s) => { const c = window.app.canvas; c.min_font_size_for_lod = s[0]; c.show_info = s[1];
                                   c.setDirty(true, true); }""", saved)
        if focus:
            page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
    return path


# --------------------------------------------------------------------------------------------------------------
# Judging what the frontend made of a workflow document
# --------------------------------------------------------------------------------------------------------------

FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# COMFY_DYNAMICCOMBO_V3: a combo whose option brings its own inputs (ComfyUI 0.30's Save Video `codec`)
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COMFY_DYNAMICCOMBO_V3"}


def is_widget_spec(spec) -> bool:
    """Whether the frontend builds a widget (and a widgets_values entry) for an /object_info input spec."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False  # a socket only
    return isinstance(spec[0], list) or spec[0] in WIDGET_KINDS  # a list is a legacy COMBO


def schema_widget_names(info: dict) -> list:
    """Names of the inputs the frontend builds a widget for, in its order (input_order required, then optional)."""
    order = info.get("input_order") or {}
    names = []
    for group in ("required", "optional"):
        specs = (info.get("input") or {}).get(group) or {}
        names += [name for name in order.get(group) or list(specs) if is_widget_spec(specs[name])]
    return names


def _optional_widget_defaults(info: dict) -> dict:
    """{name: schema default} of the optional widget inputs of a node type (those with a default)."""
    specs = (info.get("input") or {}).get("optional") or {}
    out = {}
    for name in schema_widget_names(info):
        spec = specs.get(name)
        opts = spec[1] if spec is not None and len(spec) > 1 and isinstance(spec[1], dict) else {}
        if spec is not None and "default" in opts:
            out[name] = opts["default"]
    return out


def newer_inputs_at_default(saved: list, now: list, info: dict) -> bool:
    """True when `now` is `saved` plus trailing values that are the defaults of optional widget inputs: what the
    frontend makes of a file saved before the server's node gained those inputs (ComfyUI 0.30's Create Video
    `bit_depth`; new inputs go last). The node behaves as when the file was saved: absent optional inputs are their
    defaults."""
    if not (isinstance(saved, list) and isinstance(now, list)) or len(now) <= len(saved) or now[:len(saved)] != saved:
        return False
    names = schema_widget_names(info)
    added = names[len(names) - (len(now) - len(saved)):] if len(now) - len(saved) <= len(names) else None
    defaults = _optional_widget_defaults(info)
    return bool(added) and all(n in defaults and defaults[n] == v for n, v in zip(added, now[len(saved):]))


def with_newer_inputs(prompt: dict, object_info: dict) -> dict:
    """An API prompt plus, per node, the optional widget inputs its type has now and the prompt lacks, at their
    defaults: what the frontend queues for a twin written before the server's node gained them (see
    :func:`newer_inputs_at_default`). Unchanged where the twin was written against this server's schema."""
    import copy

    out = copy.deepcopy(prompt)
    for node in out.values():
        info = object_info.get(node["class_type"]) or {}
        for name, default in _optional_widget_defaults(info).items():
            node["inputs"].setdefault(name, default)
    return out


def widget_problems(doc: dict, nodes: dict, object_info: dict) -> list:
    """What went wrong between a workflow file and the graph the frontend built from it (`nodes` = widgets(page)).

    Checked per node: the type is known and the same; what the frontend would save again (widgets_values) is
    exactly what the file holds (nothing dropped, shifted or coerced: the frontend applies them positionally and
    never complains), or that plus trailing optional inputs the server's node gained since, at their defaults
    (:func:`newer_inputs_at_default`); every widget input of the node's schema has its widget; numbers are inside the widget's
    min/max; every input slot of the file exists under the same name and holds the same link; outputs keep their
    names; no input slot that the schema does not have (the frontend keeps a renamed input's link on a dead slot
    and queues it under the old name); every required socket connected. Combo values that are not among the
    options are NOT listed here: see :func:`unlisted_combo_values`."""
    problems = []
    if len(nodes) != len(doc.get("nodes") or []):
        problems.append(f"the file has {len(doc['nodes'])} nodes, the frontend built {len(nodes)}")
    for n in doc.get("nodes") or []:
        nid, where = str(n["id"]), f"{n['type']} #{n['id']}"
        fe = nodes.get(nid)
        if fe is None:
            problems.append(f"{where}: not in the frontend's graph")
            continue
        if fe["type"] != n["type"]:
            problems.append(f"{where}: the frontend made it a {fe['type']}")
        want = n.get("widgets_values")
        info = object_info.get(n["type"])
        if want is not None and fe["widgets_values"] != want and not (
                info and newer_inputs_at_default(want, fe["widgets_values"], info)):
            problems.append(f"{where}: widgets_values {want} come back as {fe['widgets_values']} "
                            f"(widgets: {[w['name'] for w in fe['widgets'] if w['serialize']]})")
        have = {w["name"]: w for w in fe["widgets"]}
        if info is None and n["type"] not in FRONTEND_ONLY_NODES:
            problems.append(f"{where}: the server does not know this node type")
        for name in schema_widget_names(info) if info else []:
            if name not in have:
                problems.append(f"{where}: no widget for input {name!r}; widgets: {sorted(have)}")
        for w in fe["widgets"]:
            v = w["value"]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and w["type"] == "number":
                if (w["min"] is not None and v < w["min"]) or (w["max"] is not None and v > w["max"]):
                    problems.append(f"{where}: {w['name']} = {v} outside [{w['min']}, {w['max']}]")
        fe_inputs = {i["name"]: i for i in fe["inputs"]}
        if info:  # a slot the schema does not have: the frontend keeps a renamed input's link on a dead slot
            known = {k for g in ("required", "optional") for k in ((info.get("input") or {}).get(g) or {})}
            for name, slot in fe_inputs.items():
                if name not in known and slot["widget"] is None:  # widget slots (the upload button's) are judged above
                    problems.append(f"{where}: input slot {name!r} is not in the node's schema (renamed or removed?); "
                                    f"the schema has {sorted(known)}")
            widget_names = set(schema_widget_names(info))
            for name in (info.get("input") or {}).get("required") or {}:
                if name not in widget_names and name in fe_inputs and fe_inputs[name]["link"] is None:
                    problems.append(f"{where}: required input {name!r} is not connected")
        for slot in n.get("inputs") or []:
            got = fe_inputs.get(slot["name"])
            if got is None:
                problems.append(f"{where}: input {slot['name']!r} of the file is gone; inputs now: {sorted(fe_inputs)}")
            elif got["link"] != slot.get("link"):
                problems.append(f"{where}: input {slot['name']!r} holds link {got['link']}, the file {slot.get('link')}")
        want_out = [o["name"] for o in n.get("outputs") or []]
        got_out = [o["name"] for o in fe["outputs"]]
        if want_out and got_out[: len(want_out)] != want_out:
            problems.append(f"{where}: outputs {want_out} in the file, {got_out} in the frontend")
    return problems


def unlisted_combo_values(nodes: dict) -> dict:
    """{(node id, widget name): value} for combos whose value is not among the options the server offers (a model
    file the artist does not have yet, a picture that was not uploaded, a renamed option...)."""
    out = {}
    for nid, fe in nodes.items():
        for w in fe["widgets"]:
            if w["options"] is not None and w["value"] not in w["options"]:
                out[(nid, w["name"])] = w["value"]
    return out
