"""The example workflows: UI documents (what artists drag in) and their API-format twins.

Static checks: every file parses, every UI workflow has an API twin with the same nodes, links and widget values
(read against the live schema from GET /object_info, so a renamed or reordered input breaks this test). Then the
API twin runs on a real server with the tiny FLUX Fill models.

UI widgets_values are positional: the widget inputs in the schema's order (input_order required, then optional),
with the frontend-only control_after_generate value ("fixed", "randomize", ...) right after a seed, and the
frontend-only upload button's value ("image") after the widgets of a node with an image_upload input.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness.comfy_server import ComfyClient, load_api_workflow
from tests.harness.frontend import is_widget_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
UI_DIR = REPO_ROOT / "workflows"
API_DIR = UI_DIR / "api"

UI_FILES = sorted(UI_DIR.glob("*.json"))
API_FILES = sorted(API_DIR.glob("*.json"))

# Nodes that live only in the frontend: never in the API format, never in /object_info.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
CONTROL_VALUES = {"fixed", "randomize", "increment", "decrement"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "upload")
UI_KEYS = {"id", "revision", "last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra",
           "version"}


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def ui_nodes(doc: dict, *, real_only: bool = True) -> dict:
    return {str(n["id"]): n for n in doc["nodes"] if not (real_only and n["type"] in FRONTEND_ONLY)}


def ids(paths) -> list:
    return [p.name for p in paths]


# ------------------------------------------------------------------------------------------- schema helpers


def input_specs(info: dict) -> list:
    """[(name, spec)] in the order the frontend builds widgets: input_order required, then optional."""
    order = info.get("input_order") or {}
    out = []
    for group in ("required", "optional"):
        specs = (info.get("input") or {}).get(group) or {}
        for name in order.get(group) or list(specs):
            out.append((name, specs[name]))
    return out


def has_control(name: str, spec) -> bool:
    """The frontend adds a control_after_generate widget after INT seeds (explicit flag, else seed/noise_seed)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] != "INT":
        return False
    flag = opts.get("control_after_generate")
    return bool(flag) if flag is not None else name in ("seed", "noise_seed")


def has_upload(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return any(opts.get(k) for k in UPLOAD_FLAGS)


def widget_inputs(ui_node: dict, info: dict) -> dict:
    """Map the UI node's positional widgets_values onto input names, dropping frontend-only values."""
    values = list(ui_node.get("widgets_values") or [])
    where = f"{ui_node['type']} #{ui_node['id']}"
    out, i, uploads = {}, 0, 0
    optional = set((info.get("input") or {}).get("optional") or {})
    for name, spec in input_specs(info):
        if not is_widget_spec(spec):
            continue
        if i >= len(values) and name in optional:
            break  # saved before this optional input was added (new inputs go last): the frontend uses its default
        assert i < len(values), f"{where}: widgets_values {values} has no value for input {name!r}"
        out[name] = values[i]
        i += 1
        if has_control(name, spec):
            assert i < len(values) and values[i] in CONTROL_VALUES, (
                f"{where}: expected a control_after_generate value ({sorted(CONTROL_VALUES)}) after {name!r}, "
                f"got {values[i] if i < len(values) else 'nothing'}")
            i += 1
        uploads += has_upload(spec)
    rest = values[i:]
    assert rest == ["image"] * uploads, f"{where}: unexpected trailing widgets_values {rest}"
    return out


# ------------------------------------------------------------------------------------------- static checks


def test_there_are_workflows():
    assert UI_FILES, f"no UI workflows in {UI_DIR}"
    assert API_FILES, f"no API workflows in {API_DIR}"


@pytest.mark.parametrize("path", UI_FILES, ids=ids(UI_FILES))
def test_ui_workflow_is_a_litegraph_document(path):
    doc = read_json(path)
    assert isinstance(doc, dict) and UI_KEYS <= set(doc), f"{path.name}: missing keys {UI_KEYS - set(doc)}"
    assert doc["version"] == 0.4 and doc["revision"] == 0
    assert {"scale", "offset"} <= set(doc["extra"]["ds"])
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert len(nodes) == len(doc["nodes"]), "duplicate node ids"
    assert doc["last_node_id"] >= max(nodes)
    link_ids = [link[0] for link in doc["links"]]
    assert len(set(link_ids)) == len(link_ids), "duplicate link ids"
    assert doc["last_link_id"] >= max(link_ids, default=0)

    for n in doc["nodes"]:
        where = f"{path.name}: {n['type']} #{n['id']}"
        for key in ("pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties"):
            assert key in n, f"{where}: no {key!r}"
        if n["type"] in FRONTEND_ONLY:
            assert n["inputs"] == [] and n["outputs"] == [] and len(n["widgets_values"]) == 1
            assert isinstance(n["widgets_values"][0], str) and n["widgets_values"][0].strip()
            continue
        assert n["properties"].get("Node name for S&R") == n["type"], where
        for slot in n["inputs"]:
            assert {"name", "type", "link"} <= set(slot), f"{where}: input {slot}"
        for i, slot in enumerate(n["outputs"]):
            assert {"name", "type", "links"} <= set(slot), f"{where}: output {slot}"
            assert slot.get("slot_index", i) == i, f"{where}: output {slot['name']} slot_index"

    # Both ends of every link agree with the link table, and no slot points at a link that does not exist.
    for link_id, src, src_slot, dst, dst_slot, type_ in doc["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in (out["links"] or []), f"link {link_id}: not in {nodes[src]['type']}.{out['name']}.links"
        assert inp["link"] == link_id, f"link {link_id}: {nodes[dst]['type']}.{inp['name']}.link = {inp['link']}"
        # the frontend types a link by its input ("*" for an any-type input such as PreviewAny's source)
        assert inp["type"] == type_ and (type_ == "*" or out["type"] == type_), (
            f"link {link_id}: types {out['type']} / {inp['type']} / {type_}")
    linked = {lk[0] for lk in doc["links"]}
    for n in doc["nodes"]:
        for slot in n["inputs"]:
            assert slot["link"] is None or slot["link"] in linked
        for slot in n["outputs"]:
            assert set(slot["links"] or []) <= linked


@pytest.mark.parametrize("path", API_FILES, ids=ids(API_FILES))
def test_api_workflow_parses(path):
    data = load_api_workflow(path)
    for node_id, node in data.items():
        assert node["class_type"] not in FRONTEND_ONLY, f"{path.name}: {node_id} is a frontend-only node"
        assert node.get("_meta", {}).get("title"), f"{path.name}: {node_id} has no _meta.title"
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                assert len(value) == 2 and str(value[0]) in data and isinstance(value[1], int), (
                    f"{path.name}: {node_id}.{name} = {value} is not a [node id, slot] reference")


def test_every_ui_workflow_has_an_api_twin_and_back():
    assert ids(UI_FILES) == ids(API_FILES)


@pytest.mark.parametrize("path", UI_FILES, ids=ids(UI_FILES))
def test_twin_has_the_same_nodes_and_links(path):
    doc, api = read_json(path), load_api_workflow(API_DIR / path.name)
    nodes = ui_nodes(doc)
    assert {k: n["type"] for k, n in nodes.items()} == {k: n["class_type"] for k, n in api.items()}
    all_nodes = ui_nodes(doc, real_only=False)
    want_refs = set()
    for link_id, src, src_slot, dst, dst_slot, _type in doc["links"]:
        name = all_nodes[str(dst)]["inputs"][dst_slot]["name"]
        assert api[str(dst)]["inputs"].get(name) == [str(src), src_slot], (
            f"UI link {link_id} ({src}:{src_slot} -> {dst}.{name}) is not in the API twin")
        want_refs.add((str(dst), name))
    got_refs = {(k, name) for k, n in api.items() for name, v in n["inputs"].items() if isinstance(v, list)}
    assert got_refs == want_refs, "API inputs that no UI link explains (or the reverse)"
    for k, n in nodes.items():  # titles the artist sees travel into the API twin's _meta
        if "title" in n:
            assert api[k]["_meta"]["title"] == n["title"]


# ------------------------------------------------------------------------------------------- against the server


@pytest.fixture(scope="module")
def object_info(client):
    return client.object_info()


@pytest.mark.parametrize("path", UI_FILES, ids=ids(UI_FILES))
def test_node_types_exist(path, object_info):
    doc, api = read_json(path), load_api_workflow(API_DIR / path.name)
    used = {n["type"] for n in ui_nodes(doc).values()} | {n["class_type"] for n in api.values()}
    missing = sorted(used - set(object_info))
    assert not missing, f"{path.name} uses node types the server does not know: {missing}"


@pytest.mark.parametrize("path", UI_FILES, ids=ids(UI_FILES))
def test_widget_values_match_the_schema_and_the_twin(path, object_info):
    doc, api = read_json(path), load_api_workflow(API_DIR / path.name)
    for node_id, node in ui_nodes(doc).items():
        info = object_info[node["type"]]
        links = {k: v for k, v in api[node_id]["inputs"].items() if isinstance(v, list)}
        # a widget fed by a link keeps its last value in widgets_values, but the API twin sends the link
        widgets = {k: v for k, v in widget_inputs(node, info).items() if k not in links}
        api_widgets = {k: v for k, v in api[node_id]["inputs"].items() if not isinstance(v, list)}
        assert api_widgets == widgets, f"{path.name}: {node['type']} #{node_id} widget values differ from the twin"

        schema = dict(input_specs(info))
        required = set((info.get("input") or {}).get("required") or {})
        for name in required:
            assert name in widgets or name in links, f"{node['type']} #{node_id}: required input {name!r} missing"
        for name, value in widgets.items():
            spec = schema[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            if kind == "BOOLEAN":
                assert isinstance(value, bool), f"{name}={value!r}"
            elif kind == "INT":
                assert isinstance(value, int) and not isinstance(value, bool), f"{name}={value!r}"
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{name}={value!r}"
            elif kind == "STRING":
                assert isinstance(value, str), f"{name}={value!r}"
            if kind in ("INT", "FLOAT"):
                assert opts.get("min", value) <= value <= opts.get("max", value), f"{name}={value} out of range"
            if kind == "COMBO" and node["type"].startswith("Atelier"):
                options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
                # model lists depend on what is installed: only fixed option lists are checked
                if name not in ("model", "clip_l", "t5xxl", "vae", "controlnet", "ip_adapter", "clip_vision", "fast_lora",
                                "lora", "redux", "siglip"):
                    assert value in options, f"{node['type']}.{name}={value!r} not in {options}"


def test_ui_workflows_are_listed_as_templates(client):
    """Core serves workflows/*.json (not the api/ subfolder) in the templates browser under the pack's folder."""
    listed = client._get("/workflow_templates").json()
    names = next((v for k, v in listed.items() if k.lower() == "atelier"), None)
    assert names is not None, f"pack missing from /workflow_templates: {listed}"
    assert sorted(names) == sorted(p.stem for p in UI_FILES)


# ------------------------------------------------------------------------------------------- running the twin


def rgba_example(w: int = 64, h: int = 48) -> tuple[bytes, np.ndarray, np.ndarray]:
    """An RGBA PNG with a transparent rectangle (= repaint, as the MaskEditor saves it); returns png, rgb, alpha."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    alpha = np.full((h, w), 255, dtype=np.uint8)
    alpha[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 0
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(buf, format="PNG")
    return buf.getvalue(), rgb, alpha


def the_node(api: dict, class_type: str) -> tuple[str, dict]:
    found = [(k, n) for k, n in api.items() if n["class_type"] == class_type]
    assert len(found) == 1, f"expected one {class_type} node, found {len(found)}"
    return found[0]


def test_flux_fill_inpaint_runs(client, tiny_flux):
    api = load_api_workflow(API_DIR / "flux_fill_inpaint.json")
    _, load = the_node(api, "LoadImage")
    _, loader = the_node(api, "AtelierFluxFillLoader")
    _, fill = the_node(api, "AtelierFluxFill")
    save_id, _ = the_node(api, "SaveImage")
    assert fill["inputs"]["composite_back"] is True

    png, rgb, alpha = rgba_example()
    assert client.upload_image(png, load["inputs"]["image"]) == load["inputs"]["image"]
    # The file names the real model (diffusers/FLUX.1-Fill-dev, 12B); swap in the tiny random one, and 2 steps.
    assert loader["inputs"]["model"] == "diffusers/FLUX.1-Fill-dev"
    loader["inputs"]["model"] = tiny_flux["choice_diffusers"]
    fill["inputs"]["steps"] = 2

    entry = client.run(api)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    images = client.images(entry, save_id)
    assert len(images) == 1
    out = images[0]
    assert out.shape[:2] == rgb.shape[:2], f"saved {out.shape[1]}x{out.shape[0]}, input {rgb.shape[1]}x{rgb.shape[0]}"
    keep = alpha == 255
    assert np.array_equal(out[..., :3][keep], rgb[keep]), "composite_back=true changed unmasked pixels"
    assert not np.array_equal(out[..., :3][~keep], rgb[~keep]), "the masked area was not repainted"


@pytest.mark.parametrize("name", ["tryon_sdxl.json", "tryon_flux.json"])
def test_tryon_workflows_run(client, tiny_flux, comfy_base, name):
    """The try-on twins on the tiny models, with the artist's edits of tests/harness/workflow_inputs.py: the person
    picture comes back exact outside the painted (transparent) area."""
    from tests.harness import workflow_inputs

    workflow_inputs.place_tryon_models(comfy_base / "models")  # tryon_flux's Redux Loader reads the tiny Redux
    choices = {"AtelierTryOnLoader": workflow_inputs.TRYON_CHOICE, "AtelierFluxFillLoader": tiny_flux["choice_diffusers"]}
    api = load_api_workflow(API_DIR / name)
    files = workflow_inputs.input_files()
    for node in api.values():
        if node["class_type"] == "LoadImage":
            client.upload_image(files[node["inputs"]["image"]], node["inputs"]["image"])
    for class_type, values in workflow_inputs.edits_for(name, choices).items():
        the_node(api, class_type)[1]["inputs"].update(values)
    entry = client.run(api)
    assert ComfyClient.succeeded(entry), ComfyClient.error_message(entry)
    out = client.images(entry, the_node(api, "SaveImage")[0])[0][..., :3]
    person = workflow_inputs.tryon_person()
    keep = person[..., 3] == 255
    assert out.shape[:2] == keep.shape and np.array_equal(out[keep], person[..., :3][keep])
    assert not np.array_equal(out[~keep], person[..., :3][~keep])
