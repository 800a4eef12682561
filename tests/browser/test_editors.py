"""The pack's editors in the real frontend (headless Chromium), driven with the mouse and the Run button.

* SAM2 point and box editor (web/js/atelier_sam2_editor.js) on the shipped sam2_points workflow: the editor shows
  the Load Image's picture before any run; left click, right click, drag, click on a point and on a box's × write
  the `points` / `negative_points` / `boxes` widgets in the node's JSON; those values are what the frontend saves
  (widgets_values), exports (graphToPrompt) and queues (the POST /prompt body, the prompt in /history); the mask
  that comes back changes when the clicks change, and the editor then shows the node's own picture.
* Layer gallery (web/js/atelier_layers.js): Load Layers and Split Into Layers show every layer with its
  index and name; the text box (web/js/atelier_text.js) and Export Layers' download buttons work beside it.
* Caption: the reply appears read-only on the node (web/js/atelier_text.js), outside widgets_values and the
  prompt; a new Caption node starts with its seed "fixed" (web/js/atelier_caption.js), a saved workflow keeps the
  control value it saved.

The tiny models have random weights: the tests check that the prompts reach the node and the pictures follow
them, not the quality of a mask or a caption.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from tests.harness import frontend as fe
from tests.harness.comfy_server import ComfyClient
from tests.harness.workflow_inputs import place_models

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO_ROOT / "workflows"
SEGMENT = "4"  # sam2_points.json: LoadImage 2 -> SAM2 Loader 3 -> SAM2 Segment 4 -> MaskToImage 5 -> SaveImage 6
PROMPT_WIDGETS = ("points", "negative_points", "boxes")
EDIT_SIZE = (820, 760)  # the SAM2 node made large, as an artist does to edit on it
TOLERANCE = 2  # image px: a click lands on the screen pixel grid, the editor rounds to the image's


@pytest.fixture(scope="module")
def choices(comfy_base, tmp_path_factory) -> dict:
    """The tiny models in the server's models/ tree, before any page opens (so the combos list them)."""
    return place_models(comfy_base / "models", "", tmp_path_factory.getbasetemp())


def editor(page, node_id: str) -> dict:
    return page.evaluate("""(id) => {
      const node = window.app.graph.getNodeById(Number(id));
      const el = node.atelierSam2Editor.element;
      return {source: el.dataset.source, width: Number(el.dataset.imageWidth),
              height: Number(el.dataset.imageHeight), stale: node.atelierSam2Editor.stale(),
              status: node.atelierSam2Editor.status.textContent,
              values: Object.fromEntries(['points', 'negative_points', 'boxes'].map(
                  n => [n, node.widgets.find(w => w.name === n).value]))};
    }""", node_id)


def at(page, node_id: str, x: float, y: float) -> tuple[float, float]:
    """Where image pixel (x, y) is on the screen now (the editor's own mapping, letterboxed canvas)."""
    p = page.evaluate("([id, x, y]) => window.app.graph.getNodeById(Number(id)).atelierSam2Editor.imageToClient(x, y)",
                      [node_id, x, y])
    assert p is not None, "the editor has no picture to map onto"
    return p["x"], p["y"]


def click(page, node_id: str, x: float, y: float, button: str = "left") -> None:
    page.mouse.click(*at(page, node_id, x, y), button=button)
    fe.frames(page)


def drag(page, node_id: str, a: tuple, b: tuple) -> None:
    page.mouse.move(*at(page, node_id, *a))
    page.mouse.down()
    page.mouse.move(*at(page, node_id, *b), steps=6)
    page.mouse.up()
    fe.frames(page)


def near(got: list, want: list) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= TOLERANCE for g, w in zip(got, want, strict=True))


def points_of(text: str) -> list:
    return [[p["x"], p["y"]] for p in json.loads(text)] if text else []


def boxes_of(text: str) -> list:
    return json.loads(text) if text else []


def masks(client: ComfyClient, entry: dict) -> list:
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    return [m[..., 0] for m in client.images(entry, "6")]


# ------------------------------------------------------------------------------------------------- SAM2


def test_sam2_clicks_become_widget_values_the_prompt_and_the_mask(page, client, choices, uploads, artifacts):
    flog = fe.log_of(page)
    fe.load_workflow(page, WORKFLOWS / "sam2_points.json")
    fe.set_widget(page, "3", "model", choices["AtelierSAM2Loader"])
    fe.show_node(page, SEGMENT, EDIT_SIZE)
    page.wait_for_function("""(id) => { const el = window.app.graph.getNodeById(Number(id)).atelierSam2Editor.element;
                              return el.dataset.source === 'upstream' && Number(el.dataset.imageWidth) > 0; }""",
                           arg=SEGMENT, timeout=30_000)
    state = editor(page, SEGMENT)
    assert (state["width"], state["height"]) == (640, 480)  # the Load Image's file, before any run
    # the workflow's saved prompts are drawn and counted: 2 points, 1 negative
    assert "2 point(s), 1 negative, 0 box(es)" in state["status"], state["status"]

    page.locator(".atelier-sam2-clear").click()
    fe.frames(page)
    assert editor(page, SEGMENT)["values"] == {"points": "", "negative_points": "", "boxes": ""}

    click(page, SEGMENT, 320, 250)  # left: on the object
    click(page, SEGMENT, 560, 60, button="right")  # right: not the object
    drag(page, SEGMENT, (200, 130), (440, 420))  # a box around the vase
    click(page, SEGMENT, 100, 400)  # a second point ...
    v = editor(page, SEGMENT)["values"]
    assert near(points_of(v["points"])[0], [320, 250]) and len(points_of(v["points"])) == 2
    click(page, SEGMENT, *points_of(v["points"])[1])  # ... removed by clicking on it
    v = editor(page, SEGMENT)["values"]
    assert len(points_of(v["points"])) == 1 and near(points_of(v["points"])[0], [320, 250])
    assert len(points_of(v["negative_points"])) == 1 and near(points_of(v["negative_points"])[0], [560, 60])
    [box] = boxes_of(v["boxes"])
    assert near(box, [200, 130, 440, 420])
    fe.screenshot_node(page, SEGMENT, artifacts / "sam2_editor_before_run.png")
    # exactly the format the node documents (and the workflows ship)
    (px, py), (x0, y0, x1, y1) = points_of(v["points"])[0], box
    assert v["points"] == f'[{{"x": {px}, "y": {py}}}]'
    assert v["boxes"] == f"[[{x0}, {y0}, {x1}, {y1}]]"

    # saved with the workflow, in the API export, and in the prompt the Run button sends
    saved = fe.widgets(page)[SEGMENT]["widgets_values"]
    assert saved == [v["points"], v["negative_points"], v["boxes"], False]
    exported = fe.graph_to_prompt(page)[SEGMENT]["inputs"]
    assert {k: exported[k] for k in PROMPT_WIDGETS} == v and "atelier_sam2_editor" not in exported
    first_id = fe.queue(page)
    sent = flog.sent[-1]["prompt"][SEGMENT]["inputs"]
    assert {k: sent[k] for k in PROMPT_WIDGETS} == v
    first = fe.wait_done(page, first_id)
    assert {k: first["prompt"][2][SEGMENT]["inputs"][k] for k in PROMPT_WIDGETS} == v
    [mask_a] = masks(client, first)
    assert mask_a.shape == (480, 640)

    # after the run the editor shows the node's own picture and masks, for exactly these prompts
    page.wait_for_function("(id) => window.app.graph.getNodeById(Number(id)).atelierSam2Editor.element"
                           ".dataset.source === 'run'", arg=SEGMENT, timeout=30_000)
    assert editor(page, SEGMENT)["stale"] is False
    fe.frames(page)
    fe.screenshot_node(page, SEGMENT, artifacts / "sam2_editor_after_run.png")

    # other clicks: another mask; the old masks are dimmed until the next run
    page.locator(".atelier-sam2-clear").click()
    drag(page, SEGMENT, (40, 300), (250, 470))
    click(page, SEGMENT, 150, 400)
    state = editor(page, SEGMENT)
    assert state["stale"] is True and state["values"]["negative_points"] == ""
    second_id = fe.queue(page)
    assert {k: flog.sent[-1]["prompt"][SEGMENT]["inputs"][k] for k in PROMPT_WIDGETS} == state["values"]
    [mask_b] = masks(client, fe.wait_done(page, second_id))
    assert not np.array_equal(mask_a, mask_b), "other prompts gave the same mask: the clicks did not reach SAM2"
    page.wait_for_function("(id) => !window.app.graph.getNodeById(Number(id)).atelierSam2Editor.stale()",
                           arg=SEGMENT, timeout=30_000)
    assert not flog.problems(), flog.problems()


def test_sam2_box_is_removed_with_its_x_and_typed_text_is_drawn(page, choices, uploads):
    fe.load_workflow(page, WORKFLOWS / "sam2_points.json")
    fe.show_node(page, SEGMENT, EDIT_SIZE)
    page.wait_for_function("(id) => Number(window.app.graph.getNodeById(Number(id)).atelierSam2Editor.element"
                           ".dataset.imageWidth) > 0", arg=SEGMENT, timeout=30_000)
    fe.set_widget(page, SEGMENT, "boxes", "[[100, 100, 300, 200], [350, 250, 600, 400]]")  # typed by hand
    fe.frames(page)
    assert "2 box(es)" in editor(page, SEGMENT)["status"]
    click(page, SEGMENT, 300, 100)  # the first box's × (its top-right corner)
    assert editor(page, SEGMENT)["values"]["boxes"] == "[[350, 250, 600, 400]]"
    # text that is not JSON is reported and never overwritten by a click
    fe.set_widget(page, SEGMENT, "points", "[{x: 1")
    click(page, SEGMENT, 50, 50)
    state = editor(page, SEGMENT)
    assert state["values"]["points"] == "[{x: 1" and "points: not valid JSON" in state["status"]


def test_sam2_edits_are_recorded_like_any_other_edit(page, uploads):
    """Each click is one change of the workflow: marked modified, and Ctrl+Z takes back exactly that click."""
    fe.load_workflow(page, WORKFLOWS / "sam2_points.json")
    fe.show_node(page, SEGMENT, EDIT_SIZE)
    page.wait_for_function("(id) => Number(window.app.graph.getNodeById(Number(id)).atelierSam2Editor.element"
                           ".dataset.imageWidth) > 0", arg=SEGMENT, timeout=30_000)
    page.locator(".atelier-sam2-clear").click()
    fe.frames(page)
    modified = "() => window.app.extensionManager.workflow.activeWorkflow.isModified"
    assert page.evaluate(modified) is True
    click(page, SEGMENT, 320, 250)
    assert len(points_of(editor(page, SEGMENT)["values"]["points"])) == 1
    page.keyboard.press("Control+z")
    page.wait_for_function("(id) => window.app.graph.getNodeById(Number(id)).widgets[0].value === ''",
                           arg=SEGMENT, timeout=10_000)
    assert editor(page, SEGMENT)["values"] == {"points": "", "negative_points": "", "boxes": ""}


# ----------------------------------------------------------------------------------------------- layers


def gallery(page, node_id: str) -> list:
    return page.evaluate("""(id) => {
      const node = window.app.graph.getNodeById(Number(id));
      const w = (node.widgets || []).find(w => w.name === 'atelier_layer_gallery');
      if (!w) return null;
      return [...w.element.querySelectorAll('.atelier-layer-card')].map(c => {
        const img = c.querySelector('img');
        return {index: Number(c.dataset.index), name: c.dataset.name,
                caption: c.querySelector('.atelier-layer-caption').textContent,
                loaded: img.complete && img.naturalWidth > 0,
                checker: getComputedStyle(img.parentElement).backgroundImage.includes('conic-gradient')};
      });
    }""", node_id)


def wait_gallery(page, node_id: str, count: int) -> list:
    page.wait_for_function("""([id, n]) => {
      const w = (window.app.graph.getNodeById(Number(id)).widgets || []).find(w => w.name === 'atelier_layer_gallery');
      const imgs = w ? [...w.element.querySelectorAll('.atelier-layer-card img')] : [];
      return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0);
    }""", arg=[node_id, count], timeout=60_000)
    return gallery(page, node_id)


def test_load_layers_gallery_shows_every_layer_with_index_and_name(page, client, uploads):
    assert client.upload_image(uploads["atelier_layers_example.psd"], "atelier_gallery_test.psd")
    fe.load_workflow(page, WORKFLOWS / "layer_edit_roundtrip.json")
    fe.set_widget(page, "1", "file", "atelier_gallery_test.psd")  # a file of its own: never a cached result
    assert gallery(page, "1") is None  # nothing before a run
    entry = fe.wait_done(page, fe.queue(page))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    shown = wait_gallery(page, "1", 3)
    assert [(g["index"], g["name"], g["caption"]) for g in shown] == [
        (1, "Sky", "1 · Sky"), (2, "Red box", "2 · Red box"), (3, "Blue label", "3 · Blue label")]
    assert all(g["loaded"] and g["checker"] for g in shown)
    assert fe.widgets(page)["1"]["widgets_values"] == ["atelier_gallery_test.psd"]  # display only
    assert set(fe.graph_to_prompt(page)["1"]["inputs"]) == {"file"}
    assert not fe.log_of(page).problems(), fe.log_of(page).problems()


def test_split_gallery_beside_the_text_and_the_export_downloads(page, client, choices, uploads):
    fe.load_workflow(page, WORKFLOWS / "layer_split.json")
    fe.set_widget(page, "2", "model", choices["AtelierLayeredLoader"])
    for name, value in (("layers", 2), ("steps", 2), ("seed", 1234)):  # a seed of its own: never cached
        fe.set_widget(page, "3", name, value)
    entry = fe.wait_done(page, fe.queue(page), timeout=600)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    shown = wait_gallery(page, "3", 2)
    assert [(g["index"], g["name"]) for g in shown] == [(1, "Layer 1"), (2, "Layer 2")]
    assert all(g["loaded"] for g in shown)
    nodes = fe.widgets(page)
    info = {w["name"]: w for w in nodes["3"]["widgets"]}
    assert str(info["atelier_info"]["value"]).startswith("prompt:")  # the node's text (atelier_text.js)
    assert not info["atelier_info"]["serialize"] and not info["atelier_layer_gallery"]["serialize"]
    for export in ("4", "5"):
        labels = page.evaluate("(id) => window.app.graph.getNodeById(Number(id)).widgets"
                               ".filter(w => w.name.startsWith('atelier_download_')).map(w => w.label)", export)
        assert len(labels) == 1 and labels[0].startswith("Download split_"), labels
    prompt = fe.graph_to_prompt(page)
    assert not [k for k in prompt["3"]["inputs"] if k.startswith("atelier_")]
    assert not [k for k in prompt["4"]["inputs"] if k.startswith("atelier_")]
    assert not fe.log_of(page).problems(), fe.log_of(page).problems()


# ---------------------------------------------------------------------------------------------- caption


def test_caption_text_appears_read_only_and_new_nodes_start_with_a_fixed_seed(page, client, choices, uploads):
    doc = json.loads((WORKFLOWS / "caption_only.json").read_text(encoding="utf-8"))
    saved = copy.deepcopy(doc)
    cap = next(n for n in saved["nodes"] if n["type"] == "AtelierCaption")
    cap["widgets_values"][5] = "randomize"  # a workflow saved with randomize keeps it
    fe.load_workflow(page, saved, name="caption_randomize.json")
    cid = str(cap["id"])
    control = ("(id) => window.app.graph.getNodeById(Number(id)).widgets.find(w => w.name === 'seed')"
               ".linkedWidgets[0].value")
    assert page.evaluate(control, cid) == "randomize"
    fe.set_widget(page, "3", "model", choices["AtelierVLMLoader"])
    fe.set_widget(page, cid, "max_new_tokens", 9)
    fe.set_widget(page, cid, "seed", 4321)  # inputs of its own: never a cached result
    flog = fe.log_of(page)
    entry = fe.wait_done(page, fe.queue(page))
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    [want] = entry["outputs"][cid]["text"]
    box = fe.text_box(page, cid, want)  # the reply, on the Caption node
    assert box["read_only"] and box["visible"] and not box["saved"], box
    assert not [k for k in flog.sent[-1]["prompt"][cid]["inputs"] if k.startswith("atelier_")]
    assert len(fe.widgets(page)[cid]["widgets_values"]) == len(cap["widgets_values"])  # nothing added
    # a Caption node an artist adds now starts on "fixed" (re-running the VLM only when something changed)
    fresh = page.evaluate("""() => {
      const n = LiteGraph.createNode('AtelierCaption');
      window.app.graph.add(n);
      return [String(n.id), n.widgets.find(w => w.name === 'seed').linkedWidgets[0].value];
    }""")
    assert fresh[1] == "fixed"
    assert not flog.problems(), flog.problems()
