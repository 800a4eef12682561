"""Batch runner: one saved API-format workflow over a table of inputs, on many ComfyUI servers, with Ray.

A *client* of ComfyUI servers over HTTP (``/upload/image``, ``/prompt``, the websocket, ``/history``, ``/view``):
it is not part of the engine and defines no node. Pure Python: it never imports ``comfy`` / ``folder_paths`` and
importing it does not import torch. Ray, requests, websocket-client and tqdm are imported where they are used,
so ``python -m atelier batch --help`` works without them and a missing Ray is one clear error.

Modules: ``table`` (rows → items), ``manifest`` (SQLite states, resume), ``comfy`` (HTTP + websocket client),
``server`` (start a local ComfyUI), ``worker`` (the Ray actor owning one server), ``schedule`` (model affinity),
``runner`` (the driver loop), ``report`` (summary, CSV, HTML), ``cli`` (``python -m atelier batch``).
"""
