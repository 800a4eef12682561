"""The Ray actor that owns one ComfyUI server: uploads the row's files, queues the prompt, waits, fetches outputs.

Plain class here; the runner wraps it with ``ray.remote(max_restarts=…)``. A worker either starts its own server
(``launch``: one per GPU, or a CPU server for tests) or drives an existing one (``url``).

When a server it started dies, the worker exits its process on purpose (``os._exit``): Ray sees an actor crash,
fails the in-flight call (the driver gives that item to another worker) and restarts the actor, whose
``__init__`` starts a fresh server. An existing server that stops answering raises ``ServerDown`` instead (the
driver retires the worker until the server answers again).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from .comfy import Comfy, ExecutionFailed, Interrupted, Rejected, ServerDown

log = logging.getLogger("atelier.batch")

RETRYABLE_EXCEPTIONS = ("OutOfMemoryError", "OOM")  # execution errors worth another try (elsewhere)


class ServerWorker:
    def __init__(self, name: str, url: Optional[str] = None, launch: Optional[dict] = None,
                 item_timeout: float = 3600.0):
        self.name = name
        self.server = None
        self.item_timeout = item_timeout
        self.restarted = False
        try:
            import ray

            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:
            pass
        if launch:
            from .server import LocalServer

            launch = dict(launch)
            launch["work_dir"] = str(Path(launch["work_dir"]) / name)
            self.server = LocalServer(**launch).start()
            url = self.server.url
        if not url:
            raise ValueError("a worker needs a server: url= or launch=")
        self.comfy = Comfy(url)
        self.uploaded: set = set()
        self.lock = threading.Lock()
        self.current: dict = {}  # item id -> prompt state, for state()

    # -- information ------------------------------------------------------------------------------------------
    def info(self) -> dict:
        if self.server is None and not self.comfy.alive():
            raise ServerDown(f"{self.comfy.url} does not answer")
        self._check_owned()
        return {"name": self.name, "url": self.comfy.url, "host": socket.gethostname(),
                "pid": self.server.proc.pid if self.server else None, "worker_pid": os.getpid(),
                "restarted": self.restarted}

    def state(self) -> dict:
        prog = dict(self.comfy.events.progress)
        return {"items": list(self.current), "progress": [v for v in prog.values()]}

    def _check_owned(self) -> None:
        if self.server is not None and not self.server.running():
            log.error("%s: ComfyUI (pid %s) is gone; exiting so that Ray restarts this worker with a new server",
                      self.name, getattr(self.server.proc, "pid", None))
            os._exit(75)

    # -- one item ---------------------------------------------------------------------------------------------
    def run_item(self, item_id: str, prompt: dict, files: dict) -> dict:
        """files: {"node.input": (file name, bytes)}. Returns {"status": "done", "outputs": [...], "seconds"} or
        {"status": "failed", "error": ComfyUI's message, "retry": bool}. Raises ServerDown for an unreachable
        external server; exits the process when its own server died (see module doc)."""
        t0 = time.monotonic()
        self.current[item_id] = True
        try:
            prompt = {k: {**v, "inputs": dict(v.get("inputs", {}))} for k, v in prompt.items()}
            for key, (fname, data) in files.items():
                node, _, inp = key.partition(".")
                digest = hashlib.sha256(data).hexdigest()[:24]
                stored = f"{digest}{Path(fname).suffix.lower()}"
                if stored not in self.uploaded:
                    self.comfy.upload(stored, data)
                    self.uploaded.add(stored)
                if node in prompt:
                    prompt[node]["inputs"][inp] = f"atelier_batch/{stored}"
            entry = self.comfy.run(prompt, timeout=self.item_timeout)
            outputs = self.comfy.outputs(entry)
            if not outputs:
                return {"status": "failed", "retry": False, "server": self.name,
                        "error": "the workflow saved no image (does it end in a Save Image node?)"}
            return {"status": "done", "outputs": outputs, "seconds": time.monotonic() - t0, "server": self.name}
        except Rejected as e:
            return {"status": "failed", "retry": False, "error": f"ComfyUI rejected the prompt: {e}",
                    "server": self.name}
        except ExecutionFailed as e:
            retry = any(k in e.exception_type or k in str(e) for k in RETRYABLE_EXCEPTIONS)
            return {"status": "failed", "retry": retry, "error": f"ComfyUI execution error: {e}", "server": self.name}
        except (Interrupted, TimeoutError) as e:
            self.comfy.interrupt()
            return {"status": "failed", "retry": True, "error": str(e), "server": self.name}
        except ServerDown:
            self._check_owned()  # our own server died: exit, Ray restarts us
            if self.server is not None:  # ours, alive but not answering: restart it too
                log.error("%s: own server stopped answering; restarting", self.name)
                self.server.stop(grace=5)
                os._exit(75)
            raise
        finally:
            self.current.pop(item_id, None)

    def shutdown(self) -> None:
        self.comfy.close()
        if self.server is not None:
            self.server.stop()
