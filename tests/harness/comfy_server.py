"""Drive a real ComfyUI server over its HTTP + websocket API.

Reusable by pytest fixtures (tests/comfy/conftest.py) and by demo scripts, so this module imports nothing
from pytest. Dependencies: the standard library, ``requests`` and ``websocket-client``; ``numpy`` and
``Pillow`` only inside :meth:`ComfyClient.images`.

Typical use::

    with ComfyServer(base_dir, pack_dir) as server:
        client = ComfyClient(server.url)
        entry = client.run(load_api_workflow("workflows/foo.json"))
        assert client.error_message(entry) is None, client.error_message(entry)

Shape of what ComfyUI returns (commit f8b981ae; see the report in the harness docs):

* ``POST /prompt`` → ``{"prompt_id", "number", "node_errors": {}}`` or HTTP 400
  ``{"error": {"type", "message", "details", "extra_info"}, "node_errors": {node_id: {"errors": [...],
  "dependent_outputs": [...], "class_type": ...}}}``.
* ``GET /history/{id}`` → ``{id: entry}`` (``{}`` while queued or running), entry =
  ``{"prompt": [number, id, prompt, extra_data, outputs_to_execute], "outputs": {node_id: {"images": [...]}},
  "status": {"status_str": "success"|"error", "completed": bool, "messages": [[event, data], ...]},
  "meta": {node_id: {...}}}``. ``completed`` is False for errors *and* interrupts; the event in
  ``messages`` tells them apart (``execution_error`` vs ``execution_interrupted``).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union
from urllib.parse import urlparse

import requests

log = logging.getLogger("atelier.harness")

SETUP_HINT = "run `bash .ci/setup_env.sh` (it installs the pinned ComfyUI tree and its Python environment)"


# --------------------------------------------------------------------------------------------------------------
# Locating ComfyUI
# --------------------------------------------------------------------------------------------------------------

class ComfyUINotInstalled(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ATELIER_CACHE") or Path.home() / ".cache" / "atelier").expanduser()


# The ComfyUI versions .ci/setup_env.sh installs: version -> (tree, venv) under $ATELIER_CACHE. CI runs the API and
# browser tiers on each (.ci/test); ATELIER_COMFY_VERSION picks one (default: the first).
COMFY_VERSIONS = {"0.3.75": ("comfyui", "venv"), "0.30.0": ("comfyui-0.30.0", "venv-0.30.0")}
DEFAULT_VERSION = "0.3.75"


def comfy_version() -> str:
    """$ATELIER_COMFY_VERSION (one of COMFY_VERSIONS), default 0.3.75."""
    version = os.environ.get("ATELIER_COMFY_VERSION") or DEFAULT_VERSION
    if version not in COMFY_VERSIONS:
        raise ComfyUINotInstalled(f"ATELIER_COMFY_VERSION={version!r}: expected one of {sorted(COMFY_VERSIONS)}")
    return version


def comfy_root() -> Path:
    """The ComfyUI tree: $ATELIER_COMFYUI, else the tree of $ATELIER_COMFY_VERSION under $ATELIER_CACHE
    (default ~/.cache/atelier/comfyui, 0.3.75; ~/.cache/atelier/comfyui-0.30.0 for 0.30.0)."""
    env = os.environ.get("ATELIER_COMFYUI")
    root = Path(env).expanduser() if env else cache_dir() / COMFY_VERSIONS[comfy_version()][0]
    if not (root / "main.py").is_file():
        src = "$ATELIER_COMFYUI" if env else f"$ATELIER_CACHE, ComfyUI {comfy_version()}"
        raise ComfyUINotInstalled(f"no ComfyUI tree at {root} (from {src}): {SETUP_HINT}")
    return root


def comfy_python() -> str:
    """The Python that runs the server: $ATELIER_COMFY_PYTHON, else the venv of an explicitly chosen
    $ATELIER_COMFY_VERSION when it exists (each version has its own requirements), else this process's Python."""
    env = os.environ.get("ATELIER_COMFY_PYTHON")
    if env:
        return env
    if os.environ.get("ATELIER_COMFY_VERSION") and not os.environ.get("ATELIER_COMFYUI"):
        venv_python = cache_dir() / COMFY_VERSIONS[comfy_version()][1] / "bin" / "python"
        if venv_python.is_file():
            return str(venv_python)
    return sys.executable


_COMFY_MODULES: dict = {}  # ComfyUI's comfy.* modules that import_comfy imported, kept out of sys.modules


def import_comfy(module: str):
    """A module of ComfyUI's own `comfy` package (e.g. "comfy.utils") from the tree of :func:`comfy_root`.

    Imported without touching sys.path and without leaving ComfyUI's `comfy` in sys.modules: under pytest's importlib
    import mode `comfy` there is tests/comfy's package, and the tree's top-level `nodes`, `utils`, ... would shadow
    other modules of those names. Only for functions that import nothing when called (the key converters)."""
    if module not in _COMFY_MODULES:
        import importlib
        import importlib.machinery
        import importlib.util

        def ours(name: str) -> bool:
            return name == "comfy" or name.startswith("comfy.")

        others = {k: sys.modules.pop(k) for k in [k for k in sys.modules if ours(k)]}
        try:
            sys.modules.update(_COMFY_MODULES)
            if "comfy" not in sys.modules:
                spec = importlib.machinery.PathFinder.find_spec("comfy", [str(comfy_root())])
                package = importlib.util.module_from_spec(spec)
                sys.modules["comfy"] = package
                spec.loader.exec_module(package)
            importlib.import_module(module)
        finally:
            _COMFY_MODULES.update({k: sys.modules.pop(k) for k in [k for k in sys.modules if ours(k)]})
            sys.modules.update(others)
    return _COMFY_MODULES[module]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_api_workflow(path: Union[str, Path]) -> dict:
    """Read an API-format workflow ({node_id: {"class_type", "inputs"}}), rejecting UI-format documents (the batch
    runner's reader: one home for the rule; raises a ValueError)."""
    from atelier.batch.table import load_workflow

    return load_workflow(path)


# --------------------------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------------------------

class ServerStartError(RuntimeError):
    pass


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 with its own base directory and the pack symlinked into custom_nodes."""

    SUBDIRS = ("custom_nodes", "models", "input", "output", "temp", "user")

    def __init__(self, base_dir: Union[str, Path], pack_dir: Optional[Union[str, Path]], port: Optional[int] = None,
                 extra_args: Iterable[str] = (), pack_name: str = "atelier", env: Optional[dict] = None,
                 cpu: bool = True, comfy_dir: Optional[Union[str, Path]] = None, python: Optional[str] = None):
        self.base_dir = Path(base_dir).resolve()
        self.pack_dir = Path(pack_dir).resolve() if pack_dir is not None else None  # None: custom_nodes as it is
        self.comfy_dir = Path(comfy_dir) if comfy_dir is not None else None  # default comfy_root()
        self.python = python  # default comfy_python()
        self.port = port
        self.extra_args = list(extra_args)
        self.pack_name = pack_name
        self.extra_env = dict(env or {})
        self.cpu = cpu  # False: ComfyUI picks the GPU (benchmarks and the GPU tier)
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None
        self.boot_seconds: Optional[float] = None

    # -- paths ---------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started: no port yet")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def pack_link(self) -> Path:
        return self.base_dir / "custom_nodes" / self.pack_name

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _prepare_dirs(self) -> None:
        for sub in self.SUBDIRS:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.pack_dir is None:
            return
        link = self.pack_link
        if link.is_symlink() or link.exists():
            if link.is_symlink() and link.resolve() == self.pack_dir:
                return
            if link.is_symlink():
                link.unlink()
            else:
                raise ServerStartError(f"{link} exists and is not a symlink to {self.pack_dir}; refusing to replace it")
        link.symlink_to(self.pack_dir, target_is_directory=True)

    def command(self) -> list:
        cmd = [self.python or comfy_python(), "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base_dir), "--disable-auto-launch"]
        if not any(a == "--database-url" or a.startswith("--database-url=") for a in self.extra_args):
            # ComfyUI's default database lives in <comfy tree>/user/ whatever --base-directory says (and that
            # folder does not exist in the cached tree): keep it per server instead.
            cmd += ["--database-url", "sqlite:///" + str(self.base_dir / "user" / "comfyui.db")]
        return cmd + self.extra_args

    def start(self, timeout: float = 180) -> "ComfyServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        root = self.comfy_dir or comfy_root()
        self._prepare_dirs()
        if self.port is None:
            self.port = free_port()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        cmd = self.command()
        log.info("starting ComfyUI: %s (cwd %s, log %s)", " ".join(cmd), root, self.log_path)
        self._log_file = open(self.log_path, "ab", buffering=0)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=str(root), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                tail = self.log_tail()
                self._close_log()
                self.proc = None
                raise ServerStartError(f"ComfyUI exited with code {rc} while starting; log tail "
                                       f"({self.log_path}):\n{tail}")
            if self._stats_ok(timeout=2):
                break
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ServerStartError(f"ComfyUI did not answer GET /system_stats within {timeout:.0f} s; "
                                       f"log tail ({self.log_path}):\n{tail}")
            time.sleep(0.25)
        self.boot_seconds = time.monotonic() - t0
        log.info("ComfyUI answered at %s after %.1f s (pid %d)", self.url, self.boot_seconds, self.proc.pid)
        return self

    def _stats_ok(self, timeout: float = 5) -> bool:
        try:
            return requests.get(self.url + "/system_stats", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._stats_ok()

    def stop(self, grace: float = 10) -> Optional[int]:
        """Terminate the server (SIGTERM, then SIGKILL after `grace` seconds); returns its exit code."""
        proc, self.proc = self.proc, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                log.info("stopping ComfyUI (pid %d)", proc.pid)
                proc.terminate()
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    log.warning("ComfyUI (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, grace)
                    proc.kill()
                    proc.wait(timeout=30)
            rc = proc.returncode
        self._close_log()
        return rc

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # last resort; never leave an orphan server behind
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------------------
# The HTTP client
# --------------------------------------------------------------------------------------------------------------

class PromptRejected(Exception):
    """POST /prompt answered HTTP 400: validation failed. Carries ComfyUI's JSON."""

    def __init__(self, error: Any, node_errors: dict, body: Optional[dict] = None):
        self.error = error
        self.node_errors = node_errors or {}
        self.body = body if body is not None else {"error": error, "node_errors": node_errors}
        msg = error.get("message") if isinstance(error, dict) else str(error)
        details = []
        for node_id, ne in self.node_errors.items():
            for e in ne.get("errors", []):
                details.append(f"{node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        super().__init__(msg + ("; " + "; ".join(details) if details else ""))


class PromptTimeout(TimeoutError):
    pass


class ComfyClient:
    def __init__(self, url: str, client_id: Optional[str] = None, timeout: float = 30):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self.session = requests.Session()

    # -- plumbing ------------------------------------------------------------------------------------------
    def _get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", self.timeout)
        r = self.session.get(self.url + path, **kw)
        r.raise_for_status()
        return r

    def _post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", self.timeout)
        r = self.session.post(self.url + path, **kw)
        r.raise_for_status()
        return r

    def system_stats(self) -> dict:
        return self._get("/system_stats").json()

    def object_info(self, node_class: Optional[str] = None) -> dict:
        """All nodes' info, or one node's info (not wrapped; {} if the class is unknown)."""
        if node_class is None:
            return self._get("/object_info", timeout=max(self.timeout, 120)).json()
        return self._get(f"/object_info/{node_class}").json().get(node_class, {})

    # -- prompts -------------------------------------------------------------------------------------------
    def queue(self, prompt: dict, extra_data: Optional[dict] = None) -> str:
        body: dict = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        r = self.session.post(self.url + "/prompt", json=body, timeout=self.timeout)
        if r.status_code == 400:
            try:
                data = r.json()
            except ValueError:
                data = {"error": {"message": r.text}, "node_errors": {}}
            raise PromptRejected(data.get("error"), data.get("node_errors") or {}, data)
        r.raise_for_status()
        data = r.json()
        log.debug("queued prompt %s (#%s)", data["prompt_id"], data.get("number"))
        return data["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        """The history entry of a finished prompt, None while it is queued or running (or unknown)."""
        return self._get(f"/history/{prompt_id}").json().get(prompt_id)

    @staticmethod
    def finished(entry: Optional[dict]) -> bool:
        if not entry:
            return False
        status = entry.get("status") or {}
        return bool(status.get("completed") or status.get("status_str"))

    def wait(self, prompt_id: str, timeout: float = 300, poll: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if self.finished(entry):
                return entry
            if time.monotonic() > deadline:
                raise PromptTimeout(f"prompt {prompt_id} did not finish within {timeout:.0f} s "
                                    f"(queue_remaining={self.queue_remaining()})")
            time.sleep(poll)
            poll = min(poll * 1.5, 1.0)

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.queue(prompt), timeout=timeout)

    # -- reading results -----------------------------------------------------------------------------------
    @staticmethod
    def status_messages(entry: dict, event: Optional[str] = None) -> list:
        msgs = ((entry or {}).get("status") or {}).get("messages") or []
        return [(e, d) for e, d in msgs if event is None or e == event]

    @classmethod
    def error_message(cls, entry: dict) -> Optional[str]:
        """The exception message of the execution_error in the entry's status messages, else None."""
        for _, data in cls.status_messages(entry, "execution_error"):
            return data.get("exception_message") or data.get("exception_type") or "execution_error"
        return None

    @classmethod
    def error_details(cls, entry: dict) -> Optional[dict]:
        """The whole execution_error payload (node_id, node_type, exception_type, traceback, ...), else None."""
        for _, data in cls.status_messages(entry, "execution_error"):
            return data
        return None

    @classmethod
    def interrupted(cls, entry: dict) -> bool:
        return bool(cls.status_messages(entry, "execution_interrupted"))

    @staticmethod
    def succeeded(entry: dict) -> bool:
        return ((entry or {}).get("status") or {}).get("status_str") == "success"

    def view(self, filename: str, subfolder: str = "", type: str = "output", **params) -> bytes:
        q = {"filename": filename, "subfolder": subfolder, "type": type, **params}
        return self._get("/view", params=q).content

    def images(self, entry: dict, node_id: str) -> list:
        """The images a node put in its UI output, decoded to uint8 HxWxC arrays (C as stored: 3 or 4)."""
        import io

        import numpy as np
        from PIL import Image

        out = []
        node_out = (entry.get("outputs") or {}).get(str(node_id)) or {}
        for ref in node_out.get("images", []):
            raw = self.view(ref["filename"], ref.get("subfolder", ""), ref.get("type", "output"))
            with Image.open(io.BytesIO(raw)) as im:
                if im.mode not in ("RGB", "RGBA", "L"):
                    im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
                arr = np.asarray(im, dtype=np.uint8)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            out.append(arr.copy())
        return out

    # -- control -------------------------------------------------------------------------------------------
    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        self._post("/interrupt", json={"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = False) -> None:
        """Same as the Unload buttons; takes effect when the queue worker next wakes (after a running prompt)."""
        self._post("/free", json={"unload_models": unload_models, "free_memory": free_memory})

    def forget_outputs(self, timeout: float = 60) -> None:
        """Empty the server's output cache (POST /free with free_memory, models kept loaded) and wait until it is
        done, so the next prompt runs every node again (a cached node sends no UI output: a loader's text).

        The queue worker reads the /free flags after each prompt, so one trivial prompt run after them settles it."""
        self.free(unload_models=False, free_memory=True)
        self.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                  "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}, timeout=timeout)

    def upload_image(self, path_or_bytes: Union[str, Path, bytes], name: Optional[str] = None,
                     overwrite: bool = True, subfolder: str = "", type: str = "input") -> str:
        """POST /upload/image; returns the stored name (with "subfolder/" in front when one is given)."""
        if isinstance(path_or_bytes, (bytes, bytearray)):
            if not name:
                raise ValueError("upload_image: a name is required when uploading bytes")
            data = bytes(path_or_bytes)
        else:
            p = Path(path_or_bytes)
            data = p.read_bytes()
            name = name or p.name
        fields = {"overwrite": "true" if overwrite else "false", "type": type}
        if subfolder:
            fields["subfolder"] = subfolder
        r = self._post("/upload/image", files={"image": (name, data, "application/octet-stream")}, data=fields)
        j = r.json()
        return f"{j['subfolder']}/{j['name']}" if j.get("subfolder") else j["name"]

    def queue_remaining(self) -> int:
        return int(self._get("/prompt").json()["exec_info"]["queue_remaining"])

    def queue_state(self) -> dict:
        return self._get("/queue").json()

    def wait_idle(self, timeout: float = 300, poll: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while self.queue_remaining() > 0:
            if time.monotonic() > deadline:
                raise PromptTimeout(f"queue not empty after {timeout:.0f} s")
            time.sleep(poll)

    def close(self) -> None:
        self.session.close()


# --------------------------------------------------------------------------------------------------------------
# The websocket
# --------------------------------------------------------------------------------------------------------------

class WsListener:
    """Collects every JSON message of ws://host/ws?clientId=... in a background thread.

    Binary frames (latent previews) are ignored. ComfyUI sends per-prompt events (executing, progress, executed,
    execution_*) only to the websocket whose clientId matches the client_id the prompt was queued with: build
    this with the same client_id as the ComfyClient.
    """

    def __init__(self, url: str, client_id: str, connect_timeout: float = 10):
        import websocket  # websocket-client

        u = urlparse(url)
        scheme = "wss" if u.scheme == "https" else "ws"
        self.ws_url = f"{scheme}://{u.netloc}/ws?clientId={client_id}"
        self.client_id = client_id
        self._messages: list = []
        self._cond = threading.Condition()
        self._closed = False
        self._ws = websocket.create_connection(self.ws_url, timeout=connect_timeout)
        self._ws.settimeout(0.5)
        self._thread = threading.Thread(target=self._loop, name=f"comfy-ws-{client_id[:8]}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import websocket

        while not self._closed:
            try:
                opcode, data = self._ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as e:  # connection closed or broken
                if not self._closed:
                    log.info("websocket %s ended: %r", self.ws_url, e)
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue  # binary frames: previews
            try:
                msg = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
            except ValueError:
                log.warning("non-JSON websocket text frame: %r", data[:200])
                continue
            if isinstance(msg, dict):
                msg["_t"] = time.monotonic()  # arrival time: benchmarks time steps from progress events
            with self._cond:
                self._messages.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def messages(self, type: Optional[str] = None) -> list:
        with self._cond:
            return [m for m in self._messages if type is None or m.get("type") == type]

    def wait_for(self, predicate: Union[Callable[[dict], bool], str], timeout: float = 60, start: int = 0) -> dict:
        """The first message (from index `start`) for which predicate(msg) is true; a string matches the type."""
        if isinstance(predicate, str):
            want = predicate
            predicate = lambda m: m.get("type") == want  # noqa: E731
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self._messages):
                    m = self._messages[i]
                    i += 1
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    types = [m.get("type") for m in self._messages]
                    raise TimeoutError(f"no matching websocket message within {timeout:.0f} s; got types {types}")
                if self._closed:
                    raise ConnectionError("websocket closed before a matching message arrived")
                self._cond.wait(min(left, 0.5))

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def close(self) -> None:
        self._closed = True
        try:
            self._ws.close()
        except Exception:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> "WsListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
