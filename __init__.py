"""Atelier: image compositing, layers and try-on nodes for ComfyUI (V3 node API).

This file only hands ComfyUI the extension; nothing heavy is imported until ComfyUI asks for the node list.
"""

from __future__ import annotations

import importlib
import logging
import os

WEB_DIRECTORY = "./web"

log = logging.getLogger("atelier")

# one module per stage under nodes/; a stage whose optional package is missing is left out with one log line
STAGES = ("fill", "caption", "mask", "sam2", "placement", "layers", "compose", "pose", "depth", "animate",
          "tryon")

HERE = os.path.dirname(os.path.abspath(__file__))


def _ours(module: str | None) -> str | None:
    """`module` as a name inside this pack (e.g. "atelier.stage") when it is ours, else None. ComfyUI imports the pack
    under its folder's path, so relative imports give "<that path>.atelier.stage"; an absolute `import atelier...`
    (a bug: it only works where the repository root is on sys.path) names one of the pack's own folders."""
    if not module:
        return None
    if module == __name__ or module.startswith(__name__ + "."):
        return module[len(__name__) + 1:] or os.path.basename(HERE)
    top = module.split(".")[0]
    if top in ("custom_nodes", os.path.basename(HERE)) or os.path.isdir(os.path.join(HERE, top)) \
            or os.path.isfile(os.path.join(HERE, top + ".py")):
        return module
    return None


def _where(error: BaseException) -> str:
    """The pack's file and line the error came from (the innermost frame inside this folder), e.g. atelier/x.py:12."""
    found = ""
    tb = error.__traceback__
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if path.startswith(HERE + os.sep):
            found = f"{os.path.relpath(path, HERE).replace(os.sep, '/')}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found or "?"


def import_stage(stage: str):
    """nodes/<stage>.py imported, or None (logged): a missing third-party package gets the one-line pip hint; any
    other failure (a broken import inside Atelier, an error while the module runs) its traceback and our module."""
    try:
        return importlib.import_module(f".nodes.{stage}", __name__)
    except ModuleNotFoundError as e:
        if e.name and not _ours(e.name):
            package = e.name.split(".")[0]
            log.warning("Atelier: the %s nodes are off: the Python package '%s' is missing "
                        "(pip install %s; see README)", stage, package, package)
            return None
        error, what = e, f"Atelier's own module '{_ours(e.name) or e.name}' is missing (a bug in the pack, not a " \
                         "missing pip package)"
    except ImportError as e:  # `from .x import name` where x has no `name`
        message = str(e.msg).replace(__name__ + ".", "")  # "<the pack's folder path>.atelier.x" -> "atelier.x"
        error, what = e, f"ImportError in Atelier's module '{_ours(e.name) or e.name}': {message}"
    except Exception as e:  # noqa: BLE001 (one broken stage must not hide the others)
        error, what = e, f"{type(e).__name__}: {e}"
    log.error("Atelier: the %s nodes are off: importing nodes/%s.py failed at %s: %s", stage, stage, _where(error),
              what, exc_info=error)
    return None


try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # ComfyUI older than the V3 node API
    log.error("Atelier needs ComfyUI >= 0.3.75 (the comfy_api.latest V3 node API); update ComfyUI to use it.")
else:

    class AtelierExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            nodes = []
            for stage in STAGES:
                if not os.path.isfile(os.path.join(HERE, "nodes", f"{stage}.py")):
                    continue
                module = import_stage(stage)
                if module is not None:
                    nodes.extend(module.NODES)
            # every node's execute behind the shared input checks and error translations (nodes/_bridge.py: every
            # stage imports it, so when a stage loaded it loads too)
            bridge = import_stage("_bridge") if nodes and os.path.isfile(os.path.join(HERE, "nodes", "_bridge.py")) \
                else None
            if bridge is not None:
                nodes = [bridge.guard(n) for n in nodes]
            return nodes

    async def comfy_entrypoint() -> ComfyExtension:
        return AtelierExtension()
