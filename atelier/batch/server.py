"""Start one ComfyUI server (with the pack) for a batch worker: its own port, input/output/temp/user folders.

The process is ComfyUI's own ``main.py`` started through a few lines of ``python -c`` that first start a thread
watching the parent: when the worker that started it dies (Ray kills or restarts it), the server exits too, so no
orphan holds a GPU. The server's pid is ComfyUI's pid (killing it kills the server).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("atelier.batch")

# Runs main.py in this process after starting a watchdog thread: exit when the parent (the worker) is gone.
_LAUNCH = (
    "import os, runpy, sys, threading, time\n"
    "ppid = os.getppid()\n"
    "def watch():\n"
    "    while os.getppid() == ppid:\n"
    "        time.sleep(0.5)\n"
    "    os._exit(3)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "sys.argv = ['main.py'] + sys.argv[1:]\n"
    "sys.path.insert(0, os.getcwd())\n"
    "runpy.run_path('main.py', run_name='__main__')\n"
)


def find_comfyui(explicit: Optional[str] = None) -> Path:
    """ComfyUI's tree: --comfyui, else $ATELIER_COMFYUI, else the tree this pack is installed in
    (ComfyUI/custom_nodes/<pack>/atelier/batch → ComfyUI), else ~/.cache/atelier/comfyui (the test install)."""
    here = Path(__file__).resolve()
    candidates = [explicit, os.environ.get("ATELIER_COMFYUI"), str(here.parents[4]) if len(here.parents) > 4 else None,
                  str(Path(os.environ.get("ATELIER_CACHE") or Path.home() / ".cache" / "atelier") / "comfyui")]
    for c in candidates:
        if c and (Path(c).expanduser() / "main.py").is_file():
            return Path(c).expanduser().resolve()
    raise FileNotFoundError("no ComfyUI tree found (looked at --comfyui, $ATELIER_COMFYUI, the tree this pack is "
                            "installed in, ~/.cache/atelier/comfyui): pass --comfyui /path/to/ComfyUI")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, comfyui: str, work_dir: str, cpu: bool = False, base_directory: Optional[str] = None,
                 extra_args=(), env: Optional[dict] = None, python: Optional[str] = None):
        self.comfyui = find_comfyui(comfyui)
        self.work_dir = Path(work_dir)
        self.cpu = cpu
        self.base_directory = base_directory
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "server.log"

    def command(self) -> list:
        w = self.work_dir
        cmd = [self.python, "-c", _LAUNCH, "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--output-directory", str(w / "output"), "--input-directory", str(w / "input"),
               "--temp-directory", str(w), "--user-directory", str(w / "user"),
               "--database-url", "sqlite:///" + str(w / "user" / "comfyui.db")]
        if self.cpu:
            cmd.append("--cpu")
        if self.base_directory:
            cmd += ["--base-directory", str(self.base_directory)]
        return cmd + self.extra_args

    def start(self, timeout: float = 600) -> "LocalServer":
        import requests

        for sub in ("output", "input", "user"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        logf = open(self.log_path, "ab", buffering=0)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui), env=env, stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; log {self.log_path}")
            time.sleep(0.25)
        log.info("ComfyUI pid %d up at %s after %.1f s", self.proc.pid, self.url, time.monotonic() - t0)
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
