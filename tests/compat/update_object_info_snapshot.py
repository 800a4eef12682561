"""Write tests/compat/object_info_snapshot.json from a fresh ComfyUI with the pack (empty model/input folders).

    ~/.cache/atelier/venv/bin/python tests/compat/update_object_info_snapshot.py [--accept-breaking]

Refuses to write when the running code breaks the current snapshot (see object_info_contract.py for the rules and
for what to do instead), unless --accept-breaking is given; then say in the commit why saved workflows may break.
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

SNAPSHOT = HERE / "object_info_snapshot.json"
log = logging.getLogger("atelier.compat")


def current_contract() -> dict:
    """describe_pack() of a ComfyUI booted with this checkout as custom_nodes/atelier and nothing on disk."""
    from tests.compat.object_info_contract import describe_pack
    from tests.harness.comfy_server import ComfyClient, ComfyServer

    with tempfile.TemporaryDirectory(prefix="atelier-compat-") as base:
        with ComfyServer(base, REPO) as server:
            return describe_pack(ComfyClient(server.url).object_info())


def main() -> int:
    from tests.compat.object_info_contract import additions, breaking_changes, dumps, load_snapshot

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accept-breaking", action="store_true", help="write even when saved workflows would break")
    a = ap.parse_args()
    new = current_contract()
    if not new:
        log.error("the server lists no node of the pack (python_module custom_nodes.atelier): did the pack load?")
        return 1
    old = load_snapshot(SNAPSHOT) if SNAPSHOT.exists() else {}
    broken = breaking_changes(old, new)
    if broken and not a.accept_breaking:
        log.error("not written: these changes break saved workflows:\n  %s\nKeep the old node id working "
                  "(is_deprecated=True) and add a new node, or rerun with --accept-breaking.", "\n  ".join(broken))
        return 1
    for line in broken:
        log.warning("accepted breaking change: %s", line)
    for line in additions(old, new):
        log.info("added: %s", line)
    SNAPSHOT.write_text(dumps(new), encoding="utf-8")
    log.info("wrote %s (%d nodes)", SNAPSHOT.relative_to(REPO), len(new))
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file: again as a module from the repository root, where `tests.` resolves
        sys.exit(subprocess.call([sys.executable, "-m", "tests.compat.update_object_info_snapshot", *sys.argv[1:]],
                                 cwd=REPO))
    sys.exit(main())
