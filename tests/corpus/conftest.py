"""The corpus tier: bad and extreme inputs through POST /prompt of one real server (shared with the other tiers).

Uses the real-server fixtures (tests/harness/comfy_fixtures.py) and the shipped workflows' tiny models
(tests/harness/workflow_inputs.py); tests/corpus/files.py writes the corrupt model files and hostile inputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # so `tests.harness` imports under --import-mode=importlib too
    sys.path.insert(0, str(REPO_ROOT))

from tests.harness.comfy_fixtures import (  # noqa: E402,F401  (fixtures and the report hook, by name)
    client,
    comfy_base,
    comfy_server,
    pytest_runtest_makereport,
    server_log,
    tiny_flux,
    ws,
)


@pytest.fixture(scope="session")
def corpus_models(comfy_base, tiny_flux, tmp_path_factory):
    """{loader class: combo value} of the tiny models, plus the corrupt files and hostile inputs in place."""
    from tests.corpus import files
    from tests.harness import workflow_inputs

    choices = workflow_inputs.place_models(comfy_base / "models", tiny_flux["choice_diffusers"],
                                           tmp_path_factory.getbasetemp())
    for name, data in workflow_inputs.input_files().items():
        target = comfy_base / "input" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    files.write_all(comfy_base, tiny_flux)
    return {**choices, "_work_dir": tmp_path_factory.getbasetemp()}


def pytest_terminal_summary(terminalreporter):
    """Per node: how many corpus cases were rejected at validation, clear errors, sane results."""
    from tests.corpus.files import HEALTH, OUTCOMES

    per_node: dict = {}
    for (node, case), (got, _) in OUTCOMES.items():
        if case != HEALTH:
            per_node.setdefault(node, {}).setdefault(got, 0)
            per_node[node][got] += 1
    for node, counts in sorted(per_node.items()):
        terminalreporter.write_line(f"corpus {node}: {counts}")
