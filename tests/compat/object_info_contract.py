"""The public contract of Atelier's nodes as GET /object_info shows it, and what may change in it.

Saved workflows are public API. A UI workflow stores widget values **by position** (the widget inputs in schema
order, required then optional, plus the frontend's control_after_generate value after a seed) and links by
input name / output slot index. So, once landed:

* a node id never disappears or changes;
* an input never disappears, changes its name, its type, its group (required / optional), whether it is a widget,
  or its position; a new input goes after every existing one (the end of the optional group, or of the required
  group when the node has no optional inputs), and a new *required* input must be a widget (a required socket
  breaks every saved workflow that lacks the link);
* an INT widget never gains or loses its control_after_generate widget (it shifts every later value);
* a combo never loses an option (saved values would fail validation);
* an output never disappears or changes its name or type; new outputs go last.

ComfyUI f8b981ae has no node replacement mechanism yet (only `is_deprecated` on a schema): to change a node
incompatibly, keep the old node id working (mark it `is_deprecated=True`, which hides it from the node menu but
loads old workflows), add a node with a new id, then update the snapshot.

The snapshot (object_info_snapshot.json beside this file) is written from a server with **empty** model and
input folders, so combo options are only the fixed ones (files on disk only add options). Update it on purpose:

    ~/.cache/atelier/venv/bin/python tests/compat/update_object_info_snapshot.py

which refuses breaking changes unless told `--accept-breaking` (say why in the commit).
"""
from __future__ import annotations

import json
from pathlib import Path

PACK_MODULE = "custom_nodes.atelier"  # how /object_info names the pack when it sits in custom_nodes/atelier
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def describe_input(name: str, group: str, spec) -> dict:
    opts = _opts(spec)
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    widget = kind in WIDGET_KINDS and not opts.get("forceInput")
    out = {"name": name, "group": group, "type": kind, "widget": widget}
    if kind == "INT" and widget:
        flag = opts.get("control_after_generate")
        out["control_after_generate"] = bool(flag) if flag is not None else name in ("seed", "noise_seed")
    if kind == "COMBO":
        out["options"] = list(spec[0]) if isinstance(spec[0], list) else list(opts.get("options") or [])
    return out


def describe_node(info: dict) -> dict:
    """{"inputs": [...] in the frontend's order, "outputs": [{"name", "type"}], "output_node": bool}."""
    order = info.get("input_order") or {}
    inputs = []
    for group in ("required", "optional"):
        specs = (info.get("input") or {}).get(group) or {}
        for name in order.get(group) or list(specs):
            inputs.append(describe_input(name, group, specs[name]))
    outputs = [{"name": n, "type": t} for n, t in zip(info.get("output_name") or [], info.get("output") or [],
                                                      strict=True)]
    return {"inputs": inputs, "outputs": outputs, "output_node": bool(info.get("output_node"))}


def describe_pack(object_info: dict, module: str = PACK_MODULE) -> dict:
    """{node id: describe_node(...)} for every node the pack registers, sorted by id."""
    return {name: describe_node(info) for name, info in sorted(object_info.items())
            if info.get("python_module") == module}


def breaking_changes(old: dict, new: dict) -> list:
    """Every way `new` (describe_pack of the running code) breaks workflows saved against `old` (the snapshot)."""
    out = []
    for node, was in old.items():
        now = new.get(node)
        if now is None:
            out.append(f"{node}: the node is gone (saved workflows use its id)")
            continue
        was_in, now_in = was["inputs"], now["inputs"]
        for i, a in enumerate(was_in):
            b = now_in[i] if i < len(now_in) else None
            where = f"{node}.{a['name']} (input #{i + 1})"
            if b is None or b["name"] != a["name"]:
                moved = next((j for j, x in enumerate(now_in) if x["name"] == a["name"]), None)
                got = "gone" if moved is None else f"now input #{moved + 1}"
                out.append(f"{where}: {got}; input #{i + 1} is now {b['name'] if b else 'nothing'} "
                           f"(inputs are positional in saved workflows)")
                continue
            for key in ("group", "type", "widget", "control_after_generate"):
                if a.get(key) != b.get(key):
                    out.append(f"{where}: {key} was {a.get(key)!r}, now {b.get(key)!r}")
            lost = [o for o in a.get("options") or [] if o not in (b.get("options") or [])]
            if lost:
                out.append(f"{where}: options {lost} are gone (saved workflows holding them fail validation)")
        for b in now_in[len(was_in):]:
            if b["group"] == "required" and not b["widget"]:
                out.append(f"{node}.{b['name']}: a new required socket ({b['type']}); saved workflows lack its link:"
                           " make it optional")
        for i, a in enumerate(was["outputs"]):
            b = now["outputs"][i] if i < len(now["outputs"]) else None
            if b != a:
                out.append(f"{node} output #{i + 1}: was {a['name']} ({a['type']}), now "
                           f"{(b['name'] + ' (' + b['type'] + ')') if b else 'gone'} (links point at output slots)")
    return out


def additions(old: dict, new: dict) -> list:
    """Nodes, inputs and outputs in `new` that the snapshot does not protect yet."""
    out = [f"{n} (new node)" for n in new if n not in old]
    for node, was in old.items():
        now = new.get(node)
        if now is None:
            continue
        out += [f"{node}.{b['name']} (new input)" for b in now["inputs"][len(was["inputs"]):]]
        out += [f"{node} output {b['name']} (new output)" for b in now["outputs"][len(was["outputs"]):]]
    return out


def load_snapshot(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def dumps(contract: dict) -> str:
    """The snapshot's text: JSON with one input / output per line, so a diff shows exactly what changed."""

    def one(x) -> str:
        return json.dumps(x, ensure_ascii=False)

    def items(xs) -> str:
        return "[\n" + ",\n".join("   " + one(x) for x in xs) + "\n  ]" if xs else "[]"

    nodes = []
    for name, d in contract.items():
        nodes.append(f" {one(name)}: {{\n  \"inputs\": {items(d['inputs'])},\n  \"outputs\": {items(d['outputs'])},\n"
                     f"  \"output_node\": {one(d['output_node'])}\n }}")
    return "{\n" + ",\n".join(nodes) + "\n}\n"

