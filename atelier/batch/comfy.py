"""A small ComfyUI client for the batch runner: HTTP (requests) and the websocket (websocket-client).

What ComfyUI answers (0.3.75):
* ``POST /prompt`` → ``{prompt_id, number, node_errors}`` or HTTP 400 ``{error, node_errors}`` (validation).
* ``GET /ws?clientId=`` → ``executing``, ``progress {value, max, node}``, ``execution_success`` /
  ``execution_error {node_id, node_type, exception_type, exception_message}`` / ``execution_interrupted`` for
  prompts queued with the same client_id.
* ``GET /history/{id}`` → ``outputs[node].images[{filename, subfolder, type}]`` and ``status``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Optional
from urllib.parse import urlparse

log = logging.getLogger("atelier.batch")

FINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class ServerDown(RuntimeError):
    """The server does not answer (connection refused, reset, websocket gone)."""


class Rejected(Exception):
    """ComfyUI refused the prompt (HTTP 400 from /prompt): its own message, one line per node error."""


class ExecutionFailed(Exception):
    """The prompt ran and a node raised (execution_error): ComfyUI's own message."""

    def __init__(self, message: str, exception_type: str = ""):
        super().__init__(message)
        self.exception_type = exception_type


class Interrupted(Exception):
    pass


def format_rejection(body: dict) -> str:
    """ComfyUI's HTTP 400 body as one readable line: the error, then each node's errors with its details."""
    err = body.get("error")
    msg = err.get("message", "") if isinstance(err, dict) else str(err or "")
    if isinstance(err, dict) and err.get("details") and not body.get("node_errors"):
        msg += f": {err['details']}"
    parts = [msg] if msg else []
    for node_id, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            line = f"node {node_id} ({ne.get('class_type')}): {e.get('message')}"
            if e.get("details"):
                line += f": {e['details']}"
            parts.append(line)
    return "; ".join(parts) or json.dumps(body)[:500]


def format_execution_error(data: dict) -> str:
    return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type', 'error')}: "
            f"{str(data.get('exception_message', '')).strip()}")


class Events:
    """The server's websocket, read by a background thread; events are filed by prompt_id."""

    def __init__(self, url: str, client_id: str):
        u = urlparse(url)
        self.ws_url = f"{'wss' if u.scheme == 'https' else 'ws'}://{u.netloc}/ws?clientId={client_id}"
        self._by_prompt: dict = {}
        self._cond = threading.Condition()
        self._ws = None
        self._thread = None
        self.closed = True
        self.progress: dict = {}  # prompt_id -> (value, max, node)
        self._connect_lock = threading.Lock()

    def connect(self, timeout: float = 10) -> None:
        try:
            import websocket  # websocket-client
        except ImportError as e:
            raise ServerDown("websocket-client is not installed (pip install websocket-client): "
                             "waiting by polling /history") from e
        with self._connect_lock:
            if self.closed:
                self._connect(websocket, timeout)

    def _connect(self, websocket, timeout: float) -> None:
        try:
            ws = websocket.create_connection(self.ws_url, timeout=timeout)
            ws.settimeout(timeout)
            ws.recv()  # the greeting ("status"): after it, this client_id is registered
        except Exception as e:
            raise ServerDown(f"websocket {self.ws_url}: {e}") from e
        ws.settimeout(1.0)
        self._ws, self.closed = ws, False
        self._thread = threading.Thread(target=self._loop, name="comfy-events", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import websocket

        ws = self._ws
        while True:
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketTimeoutException:
                if self.closed:
                    break
                continue
            except Exception as e:
                log.info("websocket %s ended: %r", self.ws_url, e)
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            try:
                msg = json.loads(data)
            except ValueError:
                continue
            d = msg.get("data") if isinstance(msg, dict) else None
            pid = d.get("prompt_id") if isinstance(d, dict) else None
            if not pid:
                continue
            with self._cond:
                if msg.get("type") == "progress":
                    self.progress[pid] = (d.get("value"), d.get("max"), d.get("node"))
                self._by_prompt.setdefault(pid, []).append(msg)
                self._cond.notify_all()
        with self._cond:
            if self._ws is ws:
                self.closed = True
            self._cond.notify_all()

    def forget(self, prompt_id: str) -> None:
        with self._cond:
            self._by_prompt.pop(prompt_id, None)
            self.progress.pop(prompt_id, None)

    def wait_final(self, prompt_id: str, timeout: float) -> Optional[dict]:
        """The prompt's final event, or None after `timeout` or when the websocket is closed (the caller then
        reads /history, which is the authority: the socket only wakes it up early)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self._by_prompt.get(prompt_id, ()):
                    if m.get("type") in FINAL_EVENTS:
                        self._by_prompt.pop(prompt_id, None)
                        self.progress.pop(prompt_id, None)
                        return m
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        self.closed = True
        try:
            if self._ws is not None:
                self._ws.close()
        except Exception:
            pass


class Comfy:
    """One ComfyUI server: upload, queue, wait (websocket, /history as fallback), fetch outputs."""

    def __init__(self, url: str, timeout: float = 60):
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self.session = requests.Session()
        self.events = Events(self.url, self.client_id)
        self._requests = requests
        self._warned = False

    def _call(self, method: str, path: str, **kw):
        kw.setdefault("timeout", self.timeout)
        try:
            return self.session.request(method, self.url + path, **kw)
        except (self._requests.ConnectionError, self._requests.Timeout) as e:
            raise ServerDown(f"{self.url}{path}: {e}") from e

    def alive(self) -> bool:
        try:
            return self._call("GET", "/system_stats", timeout=5).status_code == 200
        except ServerDown:
            return False

    def upload(self, name: str, data: bytes, subfolder: str = "atelier_batch") -> str:
        r = self._call("POST", "/upload/image", files={"image": (name, data, "application/octet-stream")},
                       data={"overwrite": "true", "type": "input", "subfolder": subfolder})
        if r.status_code != 200:
            raise ServerDown(f"upload {name}: HTTP {r.status_code} {r.text[:200]}")
        j = r.json()
        return f"{j['subfolder']}/{j['name']}" if j.get("subfolder") else j["name"]

    def queue(self, prompt: dict) -> str:
        r = self._call("POST", "/prompt", json={"prompt": prompt, "client_id": self.client_id})
        if r.status_code == 400:
            try:
                body = r.json()
            except ValueError:
                body = {"error": {"message": r.text}}
            raise Rejected(format_rejection(body))
        if r.status_code != 200:
            raise ServerDown(f"POST /prompt: HTTP {r.status_code} {r.text[:200]}")
        return r.json()["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        r = self._call("GET", f"/history/{prompt_id}")
        if r.status_code != 200:
            raise ServerDown(f"GET /history: HTTP {r.status_code}")
        return r.json().get(prompt_id)

    def run(self, prompt: dict, timeout: float) -> dict:
        """Queue and wait; returns the history entry of a successful run or raises Rejected / ExecutionFailed /
        Interrupted / ServerDown / TimeoutError. The websocket wakes the wait; /history decides the outcome."""
        try:
            self.events.connect()
        except ServerDown as e:
            if not self.alive():
                raise
            if not self._warned:
                log.warning("no websocket on %s (%s); polling /history", self.url, e)
                self._warned = True
        prompt_id = self.queue(prompt)
        deadline = time.monotonic() + timeout
        while True:
            final = self.events.wait_final(prompt_id, 5.0 if not self.events.closed else 0.5)
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str"):
                break
            if final is not None and final["type"] == "execution_error":  # history lags the socket a little
                time.sleep(0.05)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s on {self.url}")
            if self.events.closed:
                time.sleep(0.5)
                if not self.alive():
                    raise ServerDown(f"{self.url} stopped answering while running prompt {prompt_id}")
                try:
                    self.events.connect()
                except ServerDown:
                    pass
        self.events.forget(prompt_id)
        for event, data in status.get("messages") or []:
            if event == "execution_error":
                raise ExecutionFailed(format_execution_error(data), data.get("exception_type", ""))
            if event == "execution_interrupted":
                raise Interrupted(f"prompt {prompt_id} was interrupted on {self.url}")
        if status.get("status_str") == "error":
            raise ExecutionFailed(f"prompt {prompt_id} ended with status error: {status.get('messages')}")
        return entry

    def outputs(self, entry: dict) -> list:
        """[(node_id, index, filename, bytes)] for every saved output (type "output") of a history entry."""
        out = []
        for node_id, node_out in sorted((entry.get("outputs") or {}).items(), key=lambda kv: kv[0]):
            refs = [r for r in node_out.get("images", []) if r.get("type", "output") == "output"]
            for i, ref in enumerate(refs):
                r = self._call("GET", "/view", params={"filename": ref["filename"],
                                                       "subfolder": ref.get("subfolder", ""), "type": "output"})
                if r.status_code != 200:
                    raise ServerDown(f"GET /view {ref['filename']}: HTTP {r.status_code}")
                out.append((str(node_id), i, ref["filename"], r.content))
        return out

    def interrupt(self) -> None:
        try:
            self._call("POST", "/interrupt", json={}, timeout=5)
        except ServerDown:
            pass

    def close(self) -> None:
        self.events.close()
        self.session.close()
