"""The live panel's engine: latest-wins request slot (never backs up), frame decoding."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from atelier import live
from atelier.errors import InputError


def test_latest_wins_never_queues_more_than_one():
    ran, gate = [], threading.Event()

    def work(item):
        if item == 0:
            gate.wait(5)  # the first frame generates while the others arrive
        ran.append(item)
        return item * 10

    async def main():
        slot = live.LatestWins(work)
        first = asyncio.create_task(slot.submit(0))
        await asyncio.sleep(0.05)
        later = [asyncio.create_task(slot.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, [await t for t in later], slot

    first, later, slot = asyncio.run(main())
    assert first == 0
    assert later == [live.DROPPED, live.DROPPED, 30]  # only the newest waiting frame ran
    assert ran == [0, 3] and slot.done == 2 and slot.dropped == 2 and not slot.busy


def test_latest_wins_passes_errors_to_their_request():
    def work(item):
        if item == "bad":
            raise ValueError("boom")
        return item

    async def main():
        slot = live.LatestWins(work)
        with pytest.raises(ValueError):
            await slot.submit("bad")
        return await slot.submit("ok")

    assert asyncio.run(main()) == "ok"


def test_decode_frame_scales_to_multiples_of_eight():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    t = live.decode_frame(buf.getvalue(), max_side=100)
    assert t.shape == (1, 72, 96, 3) and 0 <= t.min() and t.max() <= 1
    with pytest.raises(InputError, match="JPEG, PNG or WebP"):
        live.decode_frame(b"not a picture")
    assert live.encode_jpeg(t).startswith("data:image/jpeg;base64,")
