"""The pack's frontend translations (locales/<lang>/main.json) checked against the server's /object_info.

ComfyUI serves every pack's locales/<lang>/main.json merged under GET /i18n; the frontend looks node texts up as
``nodeDefs.<NodeId>.display_name`` / ``.description`` / ``.inputs.<input>.name`` / ``.inputs.<input>.tooltip`` /
``.outputs.<slot index>.name`` / ``.outputs.<slot index>.tooltip`` and falls back to /object_info's English.

English is generated from /object_info (tests/compat/update_locales.py writes it); every other language must have
a non-empty entry for every key English has. Used by tests/compat/test_locales.py and update_locales.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCALES = REPO / "locales"
PACK_MODULE = "custom_nodes.atelier"
LANGS = ("en", "ko")
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def pack_nodes(object_info: dict, module: str = PACK_MODULE) -> dict:
    return {k: v for k, v in sorted(object_info.items()) if v.get("python_module") == module}


def _inputs(info: dict) -> list[tuple[str, dict]]:
    order = info.get("input_order") or {}
    out = []
    for group in ("required", "optional"):
        specs = (info.get("input") or {}).get(group) or {}
        for name in order.get(group) or list(specs):
            spec = specs[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, opts))
    return out


def english_entry(info: dict) -> dict:
    """nodeDefs.<id> in English, from one node's /object_info."""
    entry: dict = {"display_name": info.get("display_name") or info["name"]}
    if info.get("description"):
        entry["description"] = info["description"]
    inputs = {}
    for name, opts in _inputs(info):
        inputs[name] = {"name": name}
        if opts.get("tooltip"):
            inputs[name]["tooltip"] = opts["tooltip"]
    if inputs:
        entry["inputs"] = inputs
    outputs = {}
    names = info.get("output_name") or info.get("output") or []
    tips = info.get("output_tooltips") or []
    for i, name in enumerate(names):
        outputs[str(i)] = {"name": name}
        if i < len(tips) and tips[i]:
            outputs[str(i)]["tooltip"] = tips[i]
    if outputs:
        entry["outputs"] = outputs
    return entry


def leaf_keys(tree: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for every string leaf."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(leaf_keys(v, key))
        else:
            out[key] = v
    return out


def path(lang: str) -> Path:
    return LOCALES / lang / "main.json"


def load(lang: str) -> dict:
    p = path(lang)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def dumps(doc: dict) -> str:
    return json.dumps(doc, ensure_ascii=False, indent=2) + "\n"


def english_node_defs(object_info: dict) -> dict:
    return {node: english_entry(info) for node, info in pack_nodes(object_info).items()}


def missing(lang_doc: dict, english_defs: dict) -> list[str]:
    """nodeDefs keys English has and `lang_doc` lacks (or leaves empty), e.g. 'AtelierFluxFill.inputs.seed.tooltip'."""
    have = leaf_keys(lang_doc.get("nodeDefs") or {})
    return [k for k in leaf_keys(english_defs) if not str(have.get(k) or "").strip()]


def stale(lang_doc: dict, english_defs: dict, nodes_known: set | None = None) -> list[str]:
    """nodeDefs keys of `lang_doc` for inputs/outputs that the nodes no longer have (nodes not on this server are
    skipped: another helper's node may not be merged yet)."""
    want = leaf_keys(english_defs)
    out = []
    for k in leaf_keys(lang_doc.get("nodeDefs") or {}):
        node = k.split(".", 1)[0]
        if (nodes_known is None or node in nodes_known) and k not in want:
            out.append(k)
    return out


def untranslated(lang_doc: dict, english_defs: dict) -> list[str]:
    """Korean texts that are English left as is: display names, descriptions and tooltips without one Hangul
    syllable. (Input and output names may stay short technical words such as 'seed' or 'IMAGE'.)"""
    out = []
    for k, v in leaf_keys(lang_doc.get("nodeDefs") or {}).items():
        if k in leaf_keys(english_defs) and k.rsplit(".", 1)[-1] in ("display_name", "description", "tooltip"):
            if not HANGUL.search(str(v)):
                out.append(k)
    return out
