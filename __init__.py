"""Atelier: image compositing, layers and try-on nodes for ComfyUI (V3 node API).

This file only hands ComfyUI the extension; nothing heavy is imported until ComfyUI asks for the node list.
"""

import importlib
import logging
import os

WEB_DIRECTORY = "./web"

log = logging.getLogger("atelier")

# one module per stage under nodes/; a stage whose optional package is missing is left out with one log line
STAGES = ("fill", "caption", "mask", "sam2", "placement", "layers", "compose", "pose", "depth", "animate")

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # ComfyUI older than the V3 node API
    log.error("Atelier needs ComfyUI >= 0.3.75 (the comfy_api.latest V3 node API); update ComfyUI to use it.")
else:

    class AtelierExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            here = os.path.dirname(os.path.abspath(__file__))
            nodes = []
            for stage in STAGES:
                if not os.path.isfile(os.path.join(here, "nodes", f"{stage}.py")):
                    continue
                try:
                    module = importlib.import_module(f".nodes.{stage}", __name__)
                except ModuleNotFoundError as e:
                    package = (e.name or "?").split(".")[0]
                    log.warning("Atelier: the %s nodes are off: the Python package '%s' is missing "
                                "(pip install %s; see README)", stage, package, package)
                    continue
                nodes.extend(module.NODES)
            if nodes:  # every node's execute behind the shared input checks and error translations
                guard = importlib.import_module(".nodes._bridge", __name__).guard
                nodes = [guard(n) for n in nodes]
            return nodes

    async def comfy_entrypoint() -> ComfyExtension:
        return AtelierExtension()
