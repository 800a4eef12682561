"""Run by ComfyUI-Manager after `pip install -r requirements.txt`: checks and hints only, no downloads.

Idempotent: it reads versions and devices and logs what is missing or limited; it changes nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

log = logging.getLogger("atelier.install")

MINIMUM = {"diffusers": "0.36.0", "transformers": "4.50.0", "accelerate": "1.0.0", "safetensors": "0.4.2"}


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed or unreadable
        return None


def _tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check() -> list[str]:
    problems = []
    if sys.version_info < (3, 10):
        problems.append(f"Python {sys.version.split()[0]}: Atelier needs 3.10 or newer.")
    if importlib.util.find_spec("torch") is None:
        problems.append("torch is not installed: install ComfyUI's own requirements first.")
    for name, low in MINIMUM.items():
        have = _version(name)
        if have is None:
            problems.append(f"{name} is missing: pip install '{name}>={low}'.")
        elif _tuple(have) < _tuple(low):
            problems.append(f"{name} {have} is older than {low}: pip install -U '{name}>={low}'.")
    if _version("bitsandbytes") is None:
        log.info("Atelier: bitsandbytes is not installed: quantization int8/nf4 will be unavailable "
                 "(pip install 'bitsandbytes>=0.46'); everything else works.")
    try:
        import torch

        if not torch.cuda.is_available():
            log.info("Atelier: no CUDA GPU visible: nodes run on the CPU (slow for FLUX); quantization needs a GPU.")
    except ImportError:
        pass
    return problems


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    issues = check()
    for p in issues:
        log.warning("Atelier: %s", p)
    if not issues:
        log.info("Atelier: dependencies look fine. Models go in ComfyUI's models/ folders (see README).")
