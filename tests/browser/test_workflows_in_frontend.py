"""Every shipped workflow, the artist's way: dropped on the canvas of the real frontend, run with the Run button.

For each workflows/*.json (UI format), in headless Chromium on a real ComfyUI with the pack:

1. drop the file on the canvas (the frontend's own drop handler: app.handleFile -> loadGraphData);
2. the frontend reports nothing: no missing-nodes dialog, no validation toast, no node drawn red, no console error,
   page error or failed request; the graph it built holds the file's widget values exactly (no value dropped,
   shifted or coerced), every widget of every node's schema and every input and link of the file
   (tests/harness/frontend.py: widget_problems);
3. the frontend's own UI -> API conversion (graphToPrompt) is the committed API twin (workflows/api/);
4. the only combos whose value the server does not offer are the model files an artist has to get (the real
   FLUX.1 Fill, Qwen VL, SAM 2.1 large, Qwen-Image-Layered); the test picks the tiny random models there and cuts
   steps / tokens (tests/harness/workflow_inputs.py: ARTIST_EDITS), as an artist changes widgets;
5. press Run: the prompt the page sends is the twin plus exactly those edits; /history reports success; every
   output node of the workflow has outputs; the page shows no error afterwards;
6. every Atelier node that returned text (every loader's summary among them) shows it, read-only, on the node.

Screenshots land in tests/browser/_artifacts/ (git-ignored): <workflow>_canvas.png (as dropped, real model names)
and <workflow>_result.png (after the run), plus the saved result pictures. With ATELIER_README_PICTURES=1 the
canvas screenshots are also written, small, to docs/img/workflow_<name>.png (the README's workflow section):

    ATELIER_README_PICTURES=1 ~/.cache/atelier/venv/bin/python -m pytest -c tests/pytest.ini tests/browser

Also here: the page loads cleanly with the pack's web extensions, and the templates browser lists the pack's
workflows and opens them.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from urllib.parse import urljoin

import pytest

from tests.harness import frontend as fe
from tests.harness.comfy_server import ComfyClient, load_api_workflow
from tests.harness.workflow_inputs import edits_for, place_models

REPO_ROOT = Path(__file__).resolve().parents[2]
UI_DIR = REPO_ROOT / "workflows"
API_DIR = UI_DIR / "api"
UI_FILES = sorted(UI_DIR.glob("*.json"))
WEB_DIR = REPO_ROOT / "web"
DOCS_IMG = REPO_ROOT / "docs" / "img"
README_WIDTH = 900  # px: README pictures are kept small
# Widgets a frontend extension adds for display that still travel in the prompt (the server ignores them):
# PreviewAny's text box ("preview", the text shown after a run). The API twins leave them out.
FRONTEND_ONLY_INPUTS = {("PreviewAny", "preview"), ("LoadVideo", "video-preview")}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def object_info(client) -> dict:
    return client.object_info()


@pytest.fixture(scope="module")
def choices(comfy_base, tiny_flux, tmp_path_factory) -> dict:
    """The tiny models in the server's models/ tree (before any page opens, so the combos list them)."""
    return place_models(comfy_base / "models", tiny_flux["choice_diffusers"], tmp_path_factory.getbasetemp())



def is_loader(class_type: str) -> bool:
    return class_type.startswith("Atelier") and class_type.endswith("Loader")


def server_view(prompt: dict) -> dict:
    """The prompt without FRONTEND_ONLY_INPUTS: what the server reads of it."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        for name in [k for k in node["inputs"] if (node["class_type"], k) in FRONTEND_ONLY_INPUTS]:
            del node["inputs"][name]
    return out


def node_ids(doc: dict) -> dict:
    """{class_type: node id (str)} for the node types a workflow holds once (the ones ARTIST_EDITS names)."""
    seen: dict = {}
    for n in doc["nodes"]:
        seen.setdefault(n["type"], []).append(str(n["id"]))
    return {t: ids[0] for t, ids in seen.items() if len(ids) == 1}


def readme_picture(src: Path, dst: Path) -> Path:
    """`src` scaled to README_WIDTH px wide at most, 256-colour PNG (≈ 100 KB for a large graph)."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.width > README_WIDTH:
            im = im.resize((README_WIDTH, round(im.height * README_WIDTH / im.width)), Image.LANCZOS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(dst, optimize=True)
    return dst


def template_thumbnail(src: Path, dst: Path, width: int = 400) -> Path:
    """The templates browser shows workflows/<name>.jpg on the workflow's card."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        im.resize((width, round(im.height * width / im.width)), Image.LANCZOS).save(dst, quality=82, optimize=True)
    return dst


# ---------------------------------------------------------------------------------- the pack's web extensions


def bad_web_imports() -> list:
    """web/js imports of ComfyUI's scripts that do not resolve to /scripts/... once served (/extensions/atelier/)."""
    bad = []
    for f in sorted((WEB_DIR / "js").rglob("*.js")):
        url = "http://host/extensions/atelier/" + f.relative_to(WEB_DIR).as_posix()
        for spec in re.findall(r"""from\s+["']([^"']*scripts/[^"']+)["']""", f.read_text(encoding="utf-8")):
            resolved = urljoin(url, spec).removeprefix("http://host")
            if not resolved.startswith("/scripts/"):
                bad.append(f"{f.relative_to(REPO_ROOT)}: {spec!r} resolves to {resolved}")
    return bad


def web_extension_names() -> dict:
    """{web/js file: the extension names it registers}, read from the source."""
    out = {}
    for f in sorted((WEB_DIR / "js").rglob("*.js")):
        text = f.read_text(encoding="utf-8")
        out[f.relative_to(REPO_ROOT).as_posix()] = re.findall(r"""registerExtension\(\s*\{\s*name:\s*["']([^"']+)""",
                                                              text)
    return out


def test_web_imports_resolve_to_the_frontend_scripts():
    """Files are served at /extensions/atelier/js/: '../../scripts/app.js' would 404 and the extension never load."""
    assert not bad_web_imports(), bad_web_imports()


def test_page_loads_cleanly_with_the_pack_extensions(page):
    # files that register no extension in the plain `registerExtension({name: ...})` form (shared modules) are
    # covered by the console check alone
    names = {f: ns for f, ns in web_extension_names().items() if ns}
    assert names, "no web/js file registers an extension in a form this test can read"
    loaded = set(fe.loaded_extensions(page))
    missing = {f: [n for n in ns if n not in loaded] for f, ns in names.items() if not set(ns) <= loaded}
    problems = fe.log_of(page).problems()
    assert not missing and not problems, (
        f"the pack's web extensions did not all load: {missing}; page problems at load: {problems}")
    assert not fe.dialogs(page), fe.dialogs(page)


def test_every_loader_is_in_a_shipped_workflow(object_info):
    """So the workflow test below sees every loader's summary text on its node after a run."""
    loaders = {name for name in object_info if is_loader(name)}
    used = {n["type"] for p in UI_FILES for n in json.loads(p.read_text(encoding="utf-8"))["nodes"]}
    assert len(loaders) >= 5 and loaders <= used, f"loaders in no workflow: {sorted(loaders - used)}"


# ---------------------------------------------------------------------------------- the templates browser


def test_templates_browser_lists_and_opens_the_pack_workflows(page, client, object_info, choices, uploads):
    listed = client._get("/workflow_templates").json()
    assert sorted(listed.get("atelier", [])) == sorted(p.stem for p in UI_FILES), (
        f"/workflow_templates lists {listed.get('atelier')} for the pack; workflows/ holds "
        f"{[p.stem for p in UI_FILES]}")

    mark = fe.log_of(page).mark()
    page.locator("button.templates-tab-button").click()  # the side bar's Templates button
    # a PrimeVue .p-dialog on frontend 1.32, a reka-ui dialog on 1.47: both have the dialog role
    dialog = page.get_by_role("dialog").filter(has_text="Templates")
    dialog.wait_for(state="visible", timeout=20_000)
    dialog.get_by_text("atelier", exact=True).first.click()  # EXTENSIONS -> atelier
    cards = dialog.locator("[data-testid^='template-workflow-']")
    cards.first.wait_for(state="visible", timeout=20_000)
    shown = sorted(t.removeprefix("template-workflow-") for t in
                   cards.evaluate_all("els => els.map(e => e.dataset.testid)"))
    assert shown == sorted(p.stem for p in UI_FILES), f"the templates dialog shows {shown} under atelier"

    # opening one loads it like a drop does: same nodes, nothing missing
    dialog.locator("[data-testid='template-workflow-flux_fill_inpaint']").click()
    doc = json.loads((UI_DIR / "flux_fill_inpaint.json").read_text(encoding="utf-8"))
    page.wait_for_function("(n) => window.app.graph.nodes.length === n && !document.querySelector('[role=dialog]')",
                           arg=len(doc["nodes"]), timeout=20_000)
    assert not fe.missing_node_types(page)
    assert not fe.widget_problems(doc, fe.widgets(page), object_info)
    assert not fe.dialogs(page), fe.dialogs(page)  # FLUX.1-Fill-dev is a folder: no missing-model file report
    # every card's thumbnail (workflows/<name>.jpg) is served: the dialog logs no failed media
    assert not fe.log_of(page).problems(mark)
    for p in UI_FILES:
        r = client._get(f"/api/workflow_templates/atelier/{p.stem}.jpg")
        assert r.status_code == 200 and r.content[:3] == b"\xff\xd8\xff", f"no thumbnail for {p.stem}"


# ---------------------------------------------------------------------------------- the checks are not blind


def _broken(doc: dict, how) -> dict:
    doc = copy.deepcopy(doc)
    how({n["type"]: n for n in doc["nodes"]})
    return doc


def test_the_checks_report_what_breaks_a_workflow(page, object_info, choices, uploads):
    """What the workflow test relies on sees real breakage: an unknown node type (missing-nodes dialog on frontend
    1.32, the error overlay on 1.47; a placeholder node drawn red), a widget value missing from the file (the rest
    shift by one), an input renamed since the file was saved."""
    base = json.loads((UI_DIR / "flux_fill_inpaint.json").read_text(encoding="utf-8"))
    twin = load_api_workflow(API_DIR / "flux_fill_inpaint.json")

    unknown = _broken(base, lambda n: n["SaveImage"].update(type="AtelierNoSuchNode"))
    fe.load_workflow(page, unknown, name="unknown_node.json")
    assert fe.missing_node_types(page) == ["AtelierNoSuchNode"]
    shown = fe.dialogs(page)
    assert any(d.startswith(("dialog:", "error overlay:")) and "AtelierNoSuchNode" in d for d in shown), shown
    fe.dismiss(page)

    shifted = _broken(base, lambda n: n["AtelierFluxFill"]["widgets_values"].pop(1))  # steps gone
    fe.load_workflow(page, shifted, name="shifted.json")
    problems = fe.widget_problems(shifted, fe.widgets(page), object_info)
    assert any("AtelierFluxFill" in p and "widgets_values" in p for p in problems), problems
    assert not fe.dialogs(page), "the frontend itself says nothing about shifted values (why the test checks them)"

    def rename(n):
        slot = next(s for s in n["AtelierFluxFill"]["inputs"] if s["name"] == "mask")
        slot["name"] = "inpaint_mask"

    renamed = _broken(base, rename)
    fe.load_workflow(page, renamed, name="renamed.json")
    problems = fe.widget_problems(renamed, fe.widgets(page), object_info)
    assert any("'inpaint_mask' is not in the node's schema" in p for p in problems), problems
    assert any("required input 'mask' is not connected" in p for p in problems), problems
    assert server_view(fe.graph_to_prompt(page)) != twin  # it would queue the link under the old name


# ---------------------------------------------------------------------------------- every workflow, run


@pytest.mark.parametrize("path", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_workflow_runs_from_the_page(path, page, client, object_info, choices, uploads, artifacts):
    flog = fe.log_of(page)
    mark = flog.mark()
    doc = fe.load_workflow(page, path)

    # 2. what the frontend says about the file, and what it built from it. Frontend 1.47 also reports model files
    # the server does not list (judged in 4.); 1.32 does not check them.
    shown = fe.dialogs(page, except_missing_models=True)
    assert not shown, f"{path.name}: the frontend showed {shown}"
    assert not fe.missing_node_types(page), f"{path.name}: missing node types {fe.missing_node_types(page)}"
    nodes = fe.widgets(page)
    problems = fe.widget_problems(doc, nodes, object_info)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
    assert not flog.problems(mark), f"{path.name}: page problems after the drop: {flog.problems(mark)}"

    # 3. the frontend's conversion is the committed API twin (on a newer ComfyUI plus the optional inputs its core
    # nodes gained since, at their defaults: the same run)
    twin = fe.with_newer_inputs(load_api_workflow(API_DIR / path.name), object_info)
    assert server_view(fe.graph_to_prompt(page)) == twin, f"{path.name}: the frontend converts it to another prompt than " \
                                            f"workflows/api/{path.name}"

    canvas = fe.screenshot_canvas(page, artifacts / f"{path.stem}_canvas.png")
    if os.environ.get("ATELIER_README_PICTURES"):
        readme_picture(canvas, DOCS_IMG / f"workflow_{path.stem}.png")
        template_thumbnail(canvas, UI_DIR / f"{path.stem}.jpg")

    # 4. what an artist must change: the model files they do not have, nothing else
    edits = edits_for(path.name, choices)
    ids = node_ids(doc)
    unlisted = fe.unlisted_combo_values(nodes)
    want = {(ids[ct], "model") for ct, values in edits.items() if "model" in values}
    assert set(unlisted) == want, (f"{path.name}: combos without their value among the options: {unlisted}; "
                                   f"expected only the model files {sorted(want)}")
    reported = fe.missing_models(page)  # None: this frontend does not check model files (1.32)
    if reported is not None:  # what it reports is among those, under the file's own value
        assert all((nid, widget) in want and unlisted[(nid, widget)] == value for nid, widget, value in reported), (
            f"{path.name}: the frontend reports missing model files {reported}; the ones missing are {unlisted}")
    expected = copy.deepcopy(twin)
    for class_type, values in edits.items():
        for name, value in values.items():
            fe.set_widget(page, ids[class_type], name, value)
            expected[ids[class_type]]["inputs"][name] = value
    if reported is not None:
        assert not fe.missing_models(page), f"{path.name}: still reported missing after the picks: {fe.missing_models(page)}"

    # 5. Run (every node, none from the server's cache of an earlier test: a cached node sends no text)
    client.forget_outputs()
    run_mark = flog.mark()
    prompt_id = fe.queue(page)
    assert server_view(flog.sent[-1]["prompt"]) == expected, f"{path.name}: the page sent another prompt than twin + edits"
    entry = fe.wait_done(page, prompt_id, timeout=300)
    assert ComfyClient.succeeded(entry), f"{path.name}: {ComfyClient.error_message(entry)}"
    outputs = entry.get("outputs") or {}
    for nid, node in twin.items():
        if object_info[node["class_type"]].get("output_node"):
            got = outputs.get(nid) or {}
            assert any(v for v in got.values()), f"{path.name}: output node {node['class_type']} #{nid} gave {got}"
    events = {e["type"] for e in fe.page_events(page, prompt_id)}
    assert "execution_success" in events, f"{path.name}: the page saw {events}"

    fe.screenshot_canvas(page, artifacts / f"{path.stem}_result.png")
    for nid, out in outputs.items():
        for i, ref in enumerate(out.get("images") or []):
            data = client.view(ref["filename"], ref.get("subfolder", ""), ref.get("type", "output"))
            (artifacts / f"{path.stem}_out_{nid}_{i}{Path(ref['filename']).suffix}").write_bytes(data)

    # 6. every Atelier node that returned text shows it on the node, read-only, display only: each loader its
    # summary (what it resolved), Caption its reply, ...
    texts = {nid: "\n".join(out["text"]) for nid, out in outputs.items()
             if out.get("text") and twin[nid]["class_type"].startswith("Atelier")}
    loaders = {nid for nid, node in twin.items() if is_loader(node["class_type"])}
    assert loaders <= set(texts), f"{path.name}: loaders that returned no summary text: {loaders - set(texts)}"
    for nid, want in texts.items():
        box = fe.text_box(page, nid, want)
        assert box["read_only"] and box["visible"] and not box["saved"], f"{path.name}: node {nid}'s text box: {box}"
        if nid in loaders:
            fe.screenshot_node(page, nid, artifacts / f"{path.stem}_summary_{twin[nid]['class_type']}.png")
    assert not fe.dialogs(page), f"{path.name}: after the run the frontend showed {fe.dialogs(page)}"
    assert not flog.problems(run_mark), f"{path.name}: page problems during the run: {flog.problems(run_mark)}"


# ---------------------------------------------------------------------------------- README pictures


def test_readme_shows_every_workflow_with_a_small_picture():
    """Every workflow has its canvas picture in docs/img, small, shown in the README (regenerate: see the top)."""
    from PIL import Image

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for path in UI_FILES:
        pic = DOCS_IMG / f"workflow_{path.stem}.png"
        assert pic.is_file(), f"no README picture for {path.name}: run this module with ATELIER_README_PICTURES=1"
        with Image.open(pic) as im:
            assert im.width <= README_WIDTH, f"{pic.name} is {im.width} px wide; README pictures are ≤ {README_WIDTH}"
        assert pic.stat().st_size <= 150_000, f"{pic.name} is {pic.stat().st_size} bytes; keep README pictures small"
        assert f"(docs/img/{pic.name})" in readme, f"README.md does not show {pic.name}"
        assert f"`{path.name}`" in readme, f"README.md does not name {path.name}"
