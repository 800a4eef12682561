"""Compatibility guard: the running server's /object_info against the committed snapshot of the pack's nodes.

Uses the real-server fixtures (tests/harness/comfy_fixtures.py; one ComfyUI per test process, shared with
tests/comfy and tests/browser).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # so `tests.harness` imports under --import-mode=importlib too
    sys.path.insert(0, str(REPO_ROOT))

from tests.harness.comfy_fixtures import (  # noqa: E402,F401  (fixtures and the report hook, by name)
    client,
    comfy_base,
    comfy_server,
    pytest_runtest_makereport,
)
