"""Bring locales/en/main.json up to date with the nodes' /object_info and list what other languages still lack.

    ~/.cache/atelier/venv/bin/python tests/compat/update_locales.py            # boots a ComfyUI with the pack
    ~/.cache/atelier/venv/bin/python tests/compat/update_locales.py --url http://127.0.0.1:8188   # a running one
    ... --check                                                                 # write nothing; exit 1 if behind

English (nodeDefs) is rewritten from /object_info for every node the server lists (display name, description,
input names and tooltips, output names and tooltips); entries of nodes this server does not list are kept.
Then, for every other language in locales/ (ko), it prints the keys to translate ("AtelierFoo.inputs.bar.tooltip")
and the keys that no longer exist; fill those by hand in locales/<lang>/main.json (tests/compat/test_locales.py
checks them against the live server).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if __name__ == "__main__" and not __package__:  # run as a file: again as a module from the repository root
    sys.exit(subprocess.call([sys.executable, "-m", "tests.compat.update_locales", *sys.argv[1:]], cwd=REPO))

from tests.compat import locales as L  # noqa: E402
from tests.harness.comfy_server import ComfyClient, ComfyServer  # noqa: E402

log = logging.getLogger("atelier.locales")


def object_info(url: str | None) -> dict:
    if url:
        return ComfyClient(url).object_info()
    with tempfile.TemporaryDirectory(prefix="atelier-locales-") as base:
        with ComfyServer(base, REPO) as server:
            return ComfyClient(server.url).object_info()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running ComfyUI with the pack (default: boot one)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when anything is missing or stale")
    a = ap.parse_args()
    info = object_info(a.url)
    english = L.english_node_defs(info)
    if not english:
        log.error("the server lists no node of the pack (python_module %s): did the pack load?", L.PACK_MODULE)
        return 1
    behind = False
    en_doc = L.load("en")
    defs = dict(en_doc.get("nodeDefs") or {})
    changed = [n for n, e in english.items() if defs.get(n) != e]
    defs.update(english)
    en_doc["nodeDefs"] = dict(sorted(defs.items()))
    if changed:
        behind = True
        if a.check:
            log.warning("en: out of date for %s", ", ".join(changed))
        else:
            L.path("en").parent.mkdir(parents=True, exist_ok=True)
            L.path("en").write_text(L.dumps(en_doc), encoding="utf-8")
            log.info("en: updated %s", ", ".join(changed))
    for lang_dir in sorted(p for p in L.LOCALES.iterdir() if p.is_dir() and p.name != "en"):
        doc = L.load(lang_dir.name)
        todo = L.missing(doc, english)
        gone = L.stale(doc, english, set(english))
        if todo:
            behind = True
            log.warning("%s: %d keys to translate:\n  %s", lang_dir.name, len(todo), "\n  ".join(todo))
        if gone:
            behind = True
            log.warning("%s: %d keys for inputs/outputs that no longer exist:\n  %s", lang_dir.name, len(gone),
                        "\n  ".join(gone))
        if not todo and not gone:
            log.info("%s: complete for %d nodes", lang_dir.name, len(english))
    return 1 if a.check and behind else 0


if __name__ == "__main__":
    sys.exit(main())
