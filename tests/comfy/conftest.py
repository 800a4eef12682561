"""Fixtures that boot one real ComfyUI server per test session with this repository as the `atelier` pack.

They live in tests/harness/comfy_fixtures.py, shared with tests/browser (one server per test process for both).
The ComfyUI tree comes from `bash .ci/setup_env.sh` ($ATELIER_COMFYUI or $ATELIER_CACHE/comfyui). When it is
missing the fixtures fail (never skip): CI must install it.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # so `tests.harness` imports under --import-mode=importlib too
    sys.path.insert(0, str(REPO_ROOT))

from tests.harness.comfy_fixtures import (  # noqa: E402,F401  (fixtures and the report hook, by name)
    MODEL_FOLDERS,
    TINY_DIFFUSERS_NAME,
    client,
    comfy_base,
    comfy_server,
    pytest_runtest_makereport,
    server_log,
    tiny_flux,
    ws,
)
