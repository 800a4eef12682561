"""Landed node ids and inputs never disappear or move (tests/compat/object_info_contract.py has the rules).

The live test compares the server's /object_info with object_info_snapshot.json; the others check the rules
themselves on edited copies of the snapshot. New nodes and inputs appended at the end pass (with a warning that
the snapshot does not protect them yet). To change the snapshot on purpose:

    ~/.cache/atelier/venv/bin/python tests/compat/update_object_info_snapshot.py
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest

from tests.compat.object_info_contract import additions, breaking_changes, describe_pack, dumps, load_snapshot

SNAPSHOT = Path(__file__).resolve().with_name("object_info_snapshot.json")
UPDATE = "~/.cache/atelier/venv/bin/python tests/compat/update_object_info_snapshot.py"


@pytest.fixture(scope="module")
def snapshot() -> dict:
    return load_snapshot(SNAPSHOT)


def test_landed_nodes_keep_ids_inputs_and_outputs(client, snapshot):
    now = describe_pack(client.object_info())
    assert now, "the server lists no node of the pack (python_module custom_nodes.atelier)"
    broken = breaking_changes(snapshot, now)
    assert not broken, (
        "these changes break saved workflows (widget values are positional, links name inputs and output slots):\n  "
        + "\n  ".join(broken) + "\nPut inputs back where they were and add new ones last. For an intentional change, "
        "keep the old node id working (is_deprecated=True hides it from the menu) and add a node with a new id; then "
        f"`{UPDATE}` (it refuses breaking changes without --accept-breaking).")
    new = additions(snapshot, now)
    if new:
        warnings.warn(f"not in the compatibility snapshot yet: {', '.join(new)}; `{UPDATE}` protects them",
                      stacklevel=1)


def test_snapshot_file_is_in_its_canonical_form(snapshot):
    """What the update script writes, so that a diff shows exactly the inputs that changed."""
    assert SNAPSHOT.read_text(encoding="utf-8") == dumps(snapshot), f"reformatted by hand? rewrite it with `{UPDATE}`"


# ------------------------------------------------------------------------------------- the rules themselves

NODE = "AtelierFluxFillLoader"  # required widgets, optional widgets, one output


def _insert(d, i, entry):
    d["inputs"].insert(i, entry)


BREAKING = {
    "node removed": lambda s: s.pop(NODE),
    "input removed": lambda s: s[NODE]["inputs"].pop(1),
    "input renamed": lambda s: s[NODE]["inputs"][1].update(name="quantisation"),
    "inputs swapped": lambda s: s[NODE]["inputs"].insert(0, s[NODE]["inputs"].pop(1)),
    "input inserted in the middle": lambda s: _insert(s[NODE], 2, {"name": "new", "group": "required",
                                                                   "type": "BOOLEAN", "widget": True}),
    "required input appended before the optional ones": lambda s: _insert(
        s[NODE], [x["group"] for x in s[NODE]["inputs"]].index("optional"),
        {"name": "new", "group": "required", "type": "BOOLEAN", "widget": True}),
    "type changed": lambda s: s[NODE]["inputs"][6].update(type="INT"),
    "optional made required": lambda s: s[NODE]["inputs"][-1].update(group="required"),
    "widget made a socket": lambda s: s[NODE]["inputs"][3].update(widget=False),
    "option removed": lambda s: s[NODE]["inputs"][2]["options"].remove("sequential"),
    "output renamed": lambda s: s[NODE]["outputs"][0].update(name="pipeline"),
    "output removed": lambda s: s[NODE]["outputs"].pop(),
    "new required socket at the end": lambda s: s[NODE]["inputs"].append(
        {"name": "mask", "group": "required", "type": "MASK", "widget": False}),
    "max_new_tokens gains control_after_generate": lambda s: s["AtelierCaption"]["inputs"][5].update(
        control_after_generate=True),
}

ALLOWED = {
    "new node": lambda s: s.__setitem__("AtelierNew", copy.deepcopy(s[NODE])),
    "optional input appended": lambda s: s[NODE]["inputs"].append(
        {"name": "new", "group": "optional", "type": "BOOLEAN", "widget": True}),
    "output appended": lambda s: s[NODE]["outputs"].append({"name": "info", "type": "STRING"}),
    "option added": lambda s: s[NODE]["inputs"][2]["options"].append("disk"),
}


def test_the_mutations_start_from_the_node_they_assume(snapshot):
    names = [x["name"] for x in snapshot[NODE]["inputs"]]
    assert names[:4] == ["model", "quantization", "offload", "attention_slicing"] and names[6] == "first_block_cache"
    assert "sequential" in snapshot[NODE]["inputs"][2]["options"] and snapshot[NODE]["inputs"][-1]["group"] == "optional"
    assert snapshot["AtelierCaption"]["inputs"][5]["name"] == "max_new_tokens"


@pytest.mark.parametrize("change", sorted(BREAKING))
def test_breaking_change_is_caught(snapshot, change):
    new = copy.deepcopy(snapshot)
    BREAKING[change](new)
    assert breaking_changes(snapshot, new), f"{change} was not reported"


@pytest.mark.parametrize("change", sorted(ALLOWED))
def test_compatible_change_passes_and_is_listed(snapshot, change):
    new = copy.deepcopy(snapshot)
    ALLOWED[change](new)
    assert breaking_changes(snapshot, new) == []
    if change != "option added":
        assert additions(snapshot, new), f"{change} is not listed as an addition"
