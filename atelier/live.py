"""The live panel's engine: frames from a webcam or a video file, one at a time, through pose + the character loop.

* :class:`LatestWins`: one frame generating and at most one waiting. A frame that arrives while another waits
  replaces it (the replaced request is answered ``dropped`` at once), so the output never backs up behind the
  input: the delay stays one frame however slow the model is, and the model never idles while frames come in.
* :class:`LiveState`: the registry entry (group ``live``) holding what the last Animate Character run set up
  (character handle, reference, prompt, settings) and the running :class:`~atelier.character.Session`.

Nothing here knows about HTTP or ComfyUI; ``nodes/animate.py`` serves it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import character
from .errors import InputError

DROPPED = {"dropped": True}
KEY = ("atelier-live",)
GROUP = "live"


class LatestWins:
    """Run ``work(item)`` (blocking, in a worker thread) on the newest submitted item; older waiting ones drop."""

    def __init__(self, work: Callable[[Any], Any]):
        self.work = work
        self.waiting: tuple[Any, asyncio.Future] | None = None
        self.busy = False
        self.done = 0
        self.dropped = 0

    async def submit(self, item: Any) -> Any:
        """The result of ``work(item)``, or :data:`DROPPED` when a newer item replaced this one before it ran."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self.waiting is not None:
            _, old = self.waiting
            if not old.done():
                old.set_result(DROPPED)
            self.dropped += 1
        self.waiting = (item, future)
        if not self.busy:
            self.busy = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.waiting is not None:
                item, future = self.waiting
                self.waiting = None
                try:
                    result = await asyncio.to_thread(self.work, item)
                except Exception as e:  # noqa: BLE001 - handed to the request that sent the frame
                    if not future.done():
                        future.set_exception(e)
                    continue
                self.done += 1
                if not future.done():
                    future.set_result(result)
        finally:
            self.busy = False


@dataclass
class LiveConfig:
    """What the last Animate Character run used: the live panel animates with the same."""

    handle: Any
    reference: torch.Tensor | None
    prompt: str
    keyframes: dict[int, str]
    settings: character.Settings


@dataclass
class LiveState:
    """The live panel's registry entry: its config, the frame session and the request slot."""

    config: LiveConfig | None = None
    session: character.Session | None = None
    slot: LatestWins | None = None
    started: float = field(default_factory=time.perf_counter)
    notes: list[str] = field(default_factory=list)
    resident_bytes: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def close(self) -> None:
        self.session = None
        self.config = None


def state() -> LiveState:
    from .registry import REGISTRY

    return REGISTRY.get_or_build(KEY, LiveState, group=GROUP)


def remember(config: LiveConfig) -> None:
    """Called by each Animate Character run: the live panel uses its character and settings from now on."""
    s = state()
    s.config = config
    s.session = None


def decode_frame(data: bytes, max_side: int = 512) -> torch.Tensor:
    """A JPEG/PNG/WebP from the browser → IMAGE (1, H, W, 3), scaled so the longer side is at most ``max_side`` and
    both sides are multiples of 8 (SD1.5's latent grid)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            scale = min(1.0, max_side / max(im.size))
            w, h = max(8, int(im.width * scale) // 8 * 8), max(8, int(im.height * scale) // 8 * 8)
            if (w, h) != im.size:
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError("a JPEG, PNG or WebP frame", f"{len(data)} bytes that are not a picture ({e})",
                         "Send canvas.toBlob('image/jpeg') output.") from None
    return (arr.float() / 255.0)[None]


def encode_jpeg(image: torch.Tensor, quality: int = 85) -> str:
    """IMAGE (1, H, W, 3) → a data: URL the panel can show."""
    from PIL import Image

    arr = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def animate_frame(model: character.CharacterModel, live: LiveState, frame: torch.Tensor,
                  pose_fn: Callable[[torch.Tensor], torch.Tensor] | None) -> dict:
    """Pose + one character frame for one camera frame; the answer the panel shows."""
    cfg = live.config
    if live.session is None or live.session.model is not model:
        live.session = character.Session(model, cfg.reference, cfg.prompt, cfg.keyframes, cfg.settings)
    t0 = time.perf_counter()
    pose = pose_fn(frame) if pose_fn is not None else frame
    pose_s = time.perf_counter() - t0
    out = live.session.run(pose, pose_seconds=pose_s)
    rec = live.session.records[-1]
    frame_ms = rec.pose_ms + rec.model_ms + rec.decode_ms
    return {"image": encode_jpeg(out), "frame": rec.frame, "mode": rec.mode, "delta_e": rec.delta_e,
            "ms": {"pose": round(rec.pose_ms, 2), "model": round(rec.model_ms, 2), "decode": round(rec.decode_ms, 2)},
            "model_fps": round(1000.0 / frame_ms, 3) if frame_ms > 0 else None,
            "width": int(out.shape[2]), "height": int(out.shape[1])}
