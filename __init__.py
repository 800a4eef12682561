"""Atelier: image compositing, layers and try-on nodes for ComfyUI (V3 node API).

This file only hands ComfyUI the extension; nothing heavy is imported until ComfyUI asks for the node list.
"""

import logging

WEB_DIRECTORY = "./web"

log = logging.getLogger("atelier")

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # ComfyUI older than the V3 node API
    log.error("Atelier needs ComfyUI >= 0.3.75 (the comfy_api.latest V3 node API); update ComfyUI to use it.")
else:

    class AtelierExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            from .nodes import fill

            return [*fill.NODES]

    async def comfy_entrypoint() -> ComfyExtension:
        return AtelierExtension()
