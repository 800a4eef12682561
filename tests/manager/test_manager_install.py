"""The way most users install a pack: ComfyUI-Manager's `cm-cli install <git url>` into a clean ComfyUI 0.30.

This checkout's files (committed or not, what `git ls-files` lists plus untracked files git does not ignore) become
one commit in a bare repository, served over HTTP on 127.0.0.1 (the Manager refuses file:// URLs). cm-cli (PyPI
comfyui-manager 4.3, in the 0.30 venv that .ci/setup_env.sh builds) clones it into a fresh copy of the 0.30 tree,
resolves requirements.txt and runs install.py; then ComfyUI starts with the Manager enabled and every node of the
pack must be in /object_info.

The copy also holds models/background_removal/u2netp.onnx *before* the start: 0.30 registers that folder itself and
lists it while loading its own nodes, which once hid every .onnx file from the remover loader.

Also here (no server): pyproject.toml's [tool.comfy] is complete for the Comfy Registry.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.harness.comfy_server import COMFY_VERSIONS, ComfyClient, ComfyServer, cache_dir, free_port

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO / "tests" / "compat" / "object_info_snapshot.json"
PACK_MODULE = "custom_nodes.atelier"
TESTED = ("0.3.75", "0.30.0")


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in v.split("."))


def test_pyproject_is_complete_for_the_registry():
    doc = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = doc["project"], doc["tool"]["comfy"]
    assert project["name"] and project["version"].count(".") == 2 and project["description"]
    repo_url = project["urls"]["Repository"]
    assert repo_url.startswith("https://"), repo_url
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Atelier"
    icon = comfy["Icon"]
    assert icon.startswith("https://") and icon.endswith((".png", ".svg", ".jpg")), icon
    if icon.startswith(repo_url + "/raw/main/"):  # an icon inside this repository must exist
        assert (REPO / icon[len(repo_url + "/raw/main/"):]).is_file(), icon
    # requires-comfyui admits every version CI tests and names the oldest as its floor
    spec = comfy["requires-comfyui"]
    assert spec.startswith(">="), spec
    floor = _version_tuple(spec[2:])
    assert floor == min(_version_tuple(v) for v in TESTED) and all(_version_tuple(v) >= floor for v in TESTED)
    # the dependencies the Manager installs are the ones requirements.txt lists (lower bounds only, no torch)
    reqs = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert sorted(reqs) == sorted(project["dependencies"])
    assert not any(r.split(">")[0].split("=")[0] in ("torch", "torchvision", "torchaudio") for r in reqs)


# ------------------------------------------------------------------------------------------ the Manager install


def _venv() -> Path:
    return cache_dir() / COMFY_VERSIONS["0.30.0"][1]


def _tree() -> Path:
    return cache_dir() / COMFY_VERSIONS["0.30.0"][0]


def _run(cmd, cwd=None, env=None, timeout=300) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{out[-4000:]}"
    return out


def _served_repo(tmp: Path) -> Path:
    """This checkout's files as one commit in a bare repository ready for git's dumb HTTP protocol."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).split("\0")
    src = tmp / "src"
    for rel in filter(None, listed):
        f = REPO / rel
        if f.is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src / rel)
    git = ["git", "-c", "user.name=atelier-test", "-c", "user.email=test@invalid", "-c", "init.defaultBranch=main"]
    _run(git + ["init", "-q"], cwd=src)
    _run(git + ["add", "-A"], cwd=src)
    _run(git + ["commit", "-q", "-m", "the checkout under test"], cwd=src)
    bare = tmp / "srv" / "atelier.git"
    _run(["git", "clone", "-q", "--bare", str(src), str(bare)])
    _run(["git", "update-server-info"], cwd=bare)
    return bare.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(tree, cm-cli output): a fresh 0.30 tree with the pack installed by cm-cli from a local HTTP URL."""
    if os.environ.get("ATELIER_COMFY_SECOND", "1") == "0":
        pytest.skip("ATELIER_COMFY_SECOND=0: ComfyUI 0.30.0 (and the Manager) are not installed")
    cm_cli = _venv() / "bin" / "cm-cli"
    if not (_tree() / "main.py").is_file() or not cm_cli.is_file():
        pytest.fail(f"no ComfyUI 0.30.0 tree or cm-cli in {cache_dir()}: run `bash .ci/setup_env.sh`", pytrace=False)
    tmp = tmp_path_factory.mktemp("manager")
    tree = tmp / "ComfyUI"
    shutil.copytree(_tree(), tree, ignore=shutil.ignore_patterns("__pycache__", ".atelier-stamp"))
    (tree / "models" / "background_removal").mkdir(parents=True, exist_ok=True)
    (tree / "models" / "background_removal" / "u2netp.onnx").write_bytes(b"listed, never loaded")
    # the Manager's own settings (user/__manager/config.ini): no registry or GitHub calls (none would answer here);
    # uv resolves the requirements, as in a default Manager install
    (tree / "user" / "__manager").mkdir(parents=True, exist_ok=True)
    (tree / "user" / "__manager" / "config.ini").write_text("[default]\nnetwork_mode = offline\nuse_uv = True\n")
    srv = _served_repo(tmp)
    port = free_port()
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=srv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = dict(os.environ, COMFYUI_PATH=str(tree), PYTHONUNBUFFERED="1")
        out = _run([str(cm_cli), "install", f"http://127.0.0.1:{port}/atelier.git", "--mode", "local"], env=env)
    finally:
        http.terminate()
        http.wait(timeout=10)
    return tree, out


def test_cm_cli_installs_the_pack_and_runs_install_py(installed):
    tree, out = installed
    pack = tree / "custom_nodes" / "atelier"
    assert (pack / "__init__.py").is_file() and (pack / "locales" / "ko" / "main.json").is_file(), out[-3000:]
    assert "[INSTALLED]" in out, out[-3000:]
    # the Manager resolved every requirement and then ran install.py, which found nothing to complain about
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert line.strip() in out, f"the Manager did not install {line.strip()}:\n{out[-3000:]}"
    assert "Atelier: dependencies look fine" in out, out[-3000:]
    assert "Traceback" not in out and "Atelier: " not in out.replace("Atelier: dependencies look fine", "").replace(
        "Atelier: no CUDA GPU visible", ""), out[-3000:]


def test_after_a_restart_every_node_is_there(installed):
    tree, _ = installed
    want = set(json.loads(SNAPSHOT.read_text(encoding="utf-8")))
    server = ComfyServer(tree, None, comfy_dir=tree, python=str(_venv() / "bin" / "python"),
                         extra_args=["--enable-manager"])
    with server.start(timeout=420):
        client = ComfyClient(server.url)
        assert client.system_stats()["system"]["comfyui_version"] == "0.30.0"
        info = client.object_info()
        ours = {k for k, v in info.items() if v.get("python_module") == PACK_MODULE}
        assert want <= ours, f"missing after the Manager install: {sorted(want - ours)}\n{server.log_tail(40)}"
        assert "Cannot import" not in server.log_text(), server.log_tail(60)
        # the Manager itself is up next to the pack
        assert client._get("/v2/manager/version").text.strip().strip('"') == "V4.3"
        # core's own background_removal folder, with a file there before the start: our loader lists it
        options = info["AtelierBackgroundRemoverLoader"]["input"]["required"]["model"]
        listed = options[0] if isinstance(options[0], list) else options[1].get("options", [])
        assert "u2netp.onnx" in listed, options
