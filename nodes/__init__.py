"""Thin ComfyUI V3 nodes over the engine in ``atelier/``. Relative imports only: ``import nodes`` is core's."""
