"""Every node and input the server lists has English and Korean texts in locales/<lang>/main.json, and ComfyUI
serves them (GET /i18n) the way the frontend reads them (nodeDefs.<NodeId>...).

Derived from the live /object_info, so a new node fails here until its entries exist:

    ~/.cache/atelier/venv/bin/python tests/compat/update_locales.py   # writes en, lists the Korean keys to write
"""
from __future__ import annotations

import json

import pytest

from tests.compat import locales as L

UPDATE = "~/.cache/atelier/venv/bin/python tests/compat/update_locales.py"


@pytest.fixture(scope="module")
def english(client) -> dict:
    defs = L.english_node_defs(client.object_info())
    assert defs, "the server lists no node of the pack"
    return defs


def test_locale_files_are_valid_json():
    for lang in L.LANGS:
        doc = json.loads(L.path(lang).read_text(encoding="utf-8"))
        assert isinstance(doc.get("nodeDefs"), dict) and doc["nodeDefs"], lang


def test_english_matches_object_info(english):
    have = L.load("en").get("nodeDefs") or {}
    stale = [node for node, entry in english.items() if have.get(node) != entry]
    assert not stale, f"locales/en/main.json is behind the nodes' texts for {stale}: run `{UPDATE}`"


def test_korean_covers_every_node_input_and_output(english):
    ko = L.load("ko")
    missing = L.missing(ko, english)
    assert not missing, f"{len(missing)} Korean texts missing (`{UPDATE}` lists them):\n  " + "\n  ".join(missing)
    gone = L.stale(ko, english, set(english))
    assert not gone, "Korean texts for inputs/outputs that no longer exist:\n  " + "\n  ".join(gone)
    untranslated = L.untranslated(ko, english)
    assert not untranslated, "Korean entries still in English:\n  " + "\n  ".join(untranslated)
    # every node's title in the Korean UI is Korean, and no two Atelier nodes share one
    titles = [ko["nodeDefs"][n]["display_name"] for n in english]
    assert all(L.HANGUL.search(t) for t in titles) and len(set(titles)) == len(titles), titles


def test_server_serves_the_translations(client, english):
    served = client._get("/i18n").json()
    for lang in L.LANGS:
        defs = (served.get(lang) or {}).get("nodeDefs") or {}
        doc = L.load(lang)["nodeDefs"]
        for node in english:
            assert defs.get(node) == doc[node], f"/i18n {lang}.nodeDefs.{node} differs from locales/{lang}/main.json"
