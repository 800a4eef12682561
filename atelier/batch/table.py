"""The input table → one item per row: a prompt (the workflow with the row's overrides), files to upload, an id.

Table formats:

* a **folder of pictures**: one row per picture (sorted, sub-folders included); the picture goes to the image
  input (``--image-input NODE.INPUT``, default: the workflow's only ``LoadImage``); the row id is the path
  without extension (``/`` → ``__``).
* **CSV** (header row) or **JSONL** (one object per line): an optional ``id`` column names the row (default:
  the row number, 1-based, 5 digits); every ``node_id.input`` column sets that input of that node. A column that
  targets a file input (``LoadImage.image``, ``LoadImageMask.image``, ``AtelierLoadLayers.file``, or one named
  with ``--file-input``) holds a path (relative paths are read from the table's folder) and the file is
  uploaded to the server. Other columns (``sku``, notes) are kept in the report. An empty CSV cell leaves the
  workflow's value. CSV text is converted to the type the workflow has there (int, float, bool); text that does
  not convert is sent as it is, so ComfyUI's own validation reports it.

Global overrides (``--set NODE.INPUT=VALUE``) apply to every row before the row's own.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

PICTURE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# (class_type, input) whose value is a file in ComfyUI's input folder: the runner uploads the row's file
FILE_INPUTS = {("LoadImage", "image"), ("LoadImageMask", "image"), ("AtelierLoadLayers", "file")}
OUTPUT_NODE_HINT = ("SaveImage",)
_ID_OK = re.compile(r"[^A-Za-z0-9._-]+")


class TableError(ValueError):
    """The table or the workflow cannot be read (the whole batch stops before anything runs)."""


@dataclass
class Item:
    """One row, ready to run: ``prompt`` still holds the workflow's value at file inputs (``files`` says which)."""

    id: str
    seq: int
    prompt: dict
    files: dict = field(default_factory=dict)      # "node.input" -> absolute path (str)
    row: dict = field(default_factory=dict)        # the row as read (for the report)
    problem: Optional[str] = None                  # set when the row cannot run at all (missing file)
    spec_hash: str = ""                            # what the output depends on: prompt + file contents
    affinity: str = ""                             # the loaders' settings: items sharing it share a model


def load_workflow(path) -> dict:
    """An API-format workflow ({node_id: {class_type, inputs}}) or a saved POST /prompt body."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TableError(f"cannot read the workflow {path}: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "nodes" not in data:
        data = data["prompt"]
    if not isinstance(data, dict) or ("nodes" in data and "links" in data):
        raise TableError(f"{path} is a UI-format workflow; export it with 'Export (API)' (workflows/api/ in Atelier)")
    for node_id, node in data.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise TableError(f"{path}: node {node_id!r} has no class_type; not an API-format workflow")
        node.setdefault("inputs", {})
    return data


def split_key(key: str) -> tuple[str, str]:
    node, dot, name = key.partition(".")
    if not dot or not node or not name:
        raise TableError(f"{key!r} is not NODE_ID.INPUT (e.g. 3.seed)")
    return node, name


def is_file_input(workflow: dict, key: str, extra: Iterable[str] = ()) -> bool:
    node, name = split_key(key)
    if key in set(extra):
        return True
    cls = (workflow.get(node) or {}).get("class_type")
    return (cls, name) in FILE_INPUTS


def default_image_input(workflow: dict) -> str:
    loads = [nid for nid, n in workflow.items() if (n["class_type"], "image") in FILE_INPUTS]
    if len(loads) != 1:
        raise TableError(f"the workflow has {len(loads)} image loaders ({', '.join(loads) or 'none'}): "
                         "name the one the pictures go to with --image-input NODE_ID.image")
    return f"{loads[0]}.image"


def convert(current: Any, value: Any) -> Any:
    """A CSV cell as the type the workflow has at that input; unconvertible text stays text (ComfyUI rejects it)."""
    if not isinstance(value, str):
        return value
    try:
        if isinstance(current, bool):
            low = value.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            return value
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except ValueError:
        return value
    if current is None:  # input not in the workflow: a JSON number/bool if it reads as one
        try:
            v = json.loads(value)
            return v if isinstance(v, (int, float, bool)) else value
        except ValueError:
            return value
    return value


def apply_overrides(workflow: dict, overrides: dict) -> dict:
    """A copy of the workflow with {"node.input": value} set. An unknown node id is kept as a node without a
    class_type, so ComfyUI's own validation names it (the runner never second-guesses the server)."""
    prompt = copy.deepcopy(workflow)
    for key, value in overrides.items():
        node, name = split_key(key)
        target = prompt.setdefault(node, {"inputs": {}})
        target.setdefault("inputs", {})
        target["inputs"][name] = convert(target["inputs"].get(name), value)
    return prompt


def parse_sets(sets: Iterable[str]) -> dict:
    out = {}
    for s in sets or ():
        key, eq, value = s.partition("=")
        if not eq:
            raise TableError(f"--set {s!r}: expected NODE_ID.INPUT=VALUE")
        split_key(key.strip())
        out[key.strip()] = value
    return out


def clean_id(text: str) -> str:
    out = _ID_OK.sub("_", text.replace("/", "__").replace("\\", "__")).strip("._")
    return out[:120] or "item"


def read_rows(table) -> tuple[list[dict], Path, bool]:
    """(rows, base folder for relative paths, is_folder). Rows are dicts of column → value."""
    table = Path(table)
    if table.is_dir():
        pics = sorted(p for p in table.rglob("*") if p.is_file() and p.suffix.lower() in PICTURE_EXTS)
        rows = [{"id": clean_id(str(p.relative_to(table).with_suffix(""))), "__picture__": str(p)} for p in pics]
        return rows, table, True
    if not table.is_file():
        raise TableError(f"no table at {table}: give a folder of pictures, a .csv or a .jsonl file")
    suffix = table.suffix.lower()
    if suffix == ".csv":
        with open(table, newline="", encoding="utf-8-sig") as f:
            rows = [{k.strip(): v for k, v in r.items() if k is not None and v not in (None, "")}
                    for r in csv.DictReader(f)]
    elif suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(table.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise TableError(f"{table}:{n}: not JSON: {e}") from e
            if not isinstance(obj, dict):
                raise TableError(f"{table}:{n}: a row must be a JSON object")
            rows.append(obj)
    else:
        raise TableError(f"{table}: unknown table type {suffix!r} (use .csv, .jsonl or a folder of pictures)")
    return rows, table.parent, False


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def affinity_key(prompt: dict) -> str:
    """The settings of every loader node (class_type containing "Loader"): items with equal keys share models."""
    parts = {nid: {k: v for k, v in n.get("inputs", {}).items() if not isinstance(v, list)}
             for nid, n in sorted(prompt.items()) if "Loader" in str(n.get("class_type", ""))}
    return json.dumps(parts, sort_keys=True)


def build_items(workflow: dict, table, sets: Optional[dict] = None, image_input: Optional[str] = None,
                file_inputs: Iterable[str] = ()) -> list[Item]:
    rows, base, is_folder = read_rows(table)
    file_inputs = list(file_inputs)
    if is_folder:
        image_input = image_input or default_image_input(workflow)
        file_inputs.append(image_input)
    base_prompt = apply_overrides(workflow, sets or {})
    items, seen = [], {}
    for seq, row in enumerate(rows, 1):
        row = dict(row)
        if is_folder:
            row[image_input] = row.pop("__picture__")
        overrides, files, meta = {}, {}, {}
        for key, value in row.items():
            if key == "id":
                continue
            if "." not in key:
                meta[key] = value
                continue
            if is_file_input(base_prompt, key, file_inputs):
                p = Path(str(value)).expanduser()
                files[key] = str(p if p.is_absolute() else (base / p))
            else:
                overrides[key] = value
        first_file = next(iter(files.values()), None)
        if "id" in row and str(row["id"]).strip():
            item_id = clean_id(str(row["id"]).strip())
        else:
            item_id = f"{seq:05d}" + (f"_{clean_id(Path(first_file).stem)}" if first_file else "")
        if item_id in seen:
            raise TableError(f"row {seq}: id {item_id!r} repeats row {seen[item_id]}: ids name the outputs, "
                             "make them unique")
        seen[item_id] = seq
        prompt = apply_overrides(base_prompt, overrides)
        problem, digests = None, {}
        for key, path in files.items():
            if Path(path).is_file():
                digests[key] = file_digest(Path(path))
            else:
                digests[key] = f"missing:{path}"
                problem = problem or f"input file not found: {path} (column {key})"
        spec = json.dumps({"prompt": prompt, "files": digests}, sort_keys=True, default=str)
        items.append(Item(id=item_id, seq=seq, prompt=prompt, files=files, row={"id": item_id, **row, **meta},
                          problem=problem, spec_hash=hashlib.sha256(spec.encode()).hexdigest()[:32],
                          affinity=affinity_key(prompt)))
    if not items:
        raise TableError(f"the table {table} has no rows")
    return items
