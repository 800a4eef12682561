"""Placement geometry, checked numerically: where the object lands, what the masks cover, what stays untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atelier import placement
from atelier.errors import InputError


def scene(bw=320, bh=240, ow=60, oh=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    bg = torch.rand(1, bh, bw, 3, generator=g)
    obj = torch.rand(1, oh + 20, ow + 30, 3, generator=g)
    mask = torch.zeros(1, oh + 20, ow + 30)
    mask[:, 10 : 10 + oh, 15 : 15 + ow] = 1.0  # the object: a solid ow×oh rectangle inside a larger picture
    return bg, obj, mask


def test_bbox():
    m = torch.zeros(10, 12)
    m[2:5, 3:9] = 1
    assert placement.bbox(m) == (3, 2, 9, 5)
    assert placement.bbox(torch.zeros(4, 4)) is None


@pytest.mark.parametrize("anchor", ["bottom", "center"])
def test_object_lands_at_x_y_scale(anchor):
    bg, obj, mask = scene()
    comp, inpaint, placed = placement.place(bg, obj, mask, x=0.25, y=0.75, scale=0.5, anchor=anchor, band=8,
                                            feather=0, shadow=False)
    assert comp.shape == bg.shape and inpaint.shape == placed.shape == (1, 240, 320)
    l, t, r, b = placement.bbox(placed[0], threshold=0.5)
    assert b - t == pytest.approx(120, abs=1)  # 0.5 × 240
    assert r - l == pytest.approx(72, abs=1)  # aspect 60:100 kept
    assert (l + r) / 2 == pytest.approx(0.25 * 320, abs=1)
    if anchor == "bottom":
        assert b == pytest.approx(0.75 * 240, abs=1)
    else:
        assert (t + b) / 2 == pytest.approx(0.75 * 240, abs=1)


def test_pixels_outside_the_object_are_the_background_exactly():
    bg, obj, mask = scene()
    comp, _, placed = placement.place(bg, obj, mask, x=0.5, y=0.9, scale=0.4)
    outside = (placed[0] == 0).unsqueeze(-1).expand_as(comp[0])
    assert torch.equal(comp[0][outside], bg[0][outside])
    inside = (placed[0] == 1).unsqueeze(-1).expand_as(comp[0])
    assert not torch.equal(comp[0][inside], bg[0][inside])


def test_object_pixels_are_the_object_scaled():
    bg = torch.zeros(1, 100, 100, 3)
    obj = torch.zeros(1, 50, 50, 3)
    obj[..., 0] = 1.0  # red object
    mask = torch.ones(1, 50, 50)
    comp, _, placed = placement.place(bg, obj, mask, x=0.5, y=0.5, scale=0.5, anchor="center", band=0,
                                      feather=0, shadow=False)
    core = placed[0] == 1
    assert core.sum() == 50 * 50
    assert torch.allclose(comp[0][core], torch.tensor([1.0, 0.0, 0.0]))


def test_harmonize_regenerates_a_band_and_keeps_the_object():
    bg, obj, mask = scene()
    band = 12
    _, inpaint, placed = placement.place(bg, obj, mask, x=0.5, y=0.9, scale=0.4, mode="harmonize", band=band,
                                         feather=0, shadow=False)
    solid = placed[0].numpy() > 0.5
    inp = inpaint[0].numpy() > 0.5
    interior = placement.erode(solid, band)  # well inside the object
    assert not (inp & interior).any(), "the object's own pixels must be kept"
    ring = placement.dilate(solid, band) & ~placement.dilate(solid, 1)
    assert inp[ring].all(), "the band around the object must be regenerated"
    far = ~placement.dilate(solid, band + 1)
    assert not inp[far].any()


def test_regenerate_covers_the_whole_object_plus_band():
    bg, obj, mask = scene()
    _, inpaint, placed = placement.place(bg, obj, mask, x=0.5, y=0.9, scale=0.4, mode="regenerate", band=6,
                                         feather=0, shadow=False)
    solid = placed[0].numpy() > 0.5
    inp = inpaint[0].numpy() > 0.5
    assert inp[solid].all()
    assert np.array_equal(inp, placement.dilate(solid, 6))


def test_shadow_adds_a_region_under_the_object():
    bg, obj, mask = scene()
    _, no_shadow, placed = placement.place(bg, obj, mask, x=0.5, y=0.7, scale=0.4, band=4, feather=0, shadow=False)
    _, with_shadow, _ = placement.place(bg, obj, mask, x=0.5, y=0.7, scale=0.4, band=4, feather=0, shadow=True)
    extra = (with_shadow[0] > 0.5) & ~(no_shadow[0] > 0.5)
    assert extra.sum() > 0
    _, t, _, b = placement.bbox(placed[0], 0.5)
    ys = torch.nonzero(extra)[:, 0]
    assert ys.float().mean() > (t + b) / 2, "the shadow region lies in the object's lower part / below it"


def test_feather_softens_outwards_only():
    bg, obj, mask = scene()
    _, hard, _ = placement.place(bg, obj, mask, x=0.5, y=0.9, scale=0.4, band=8, feather=0, shadow=False)
    _, soft, _ = placement.place(bg, obj, mask, x=0.5, y=0.9, scale=0.4, band=8, feather=10, shadow=False)
    assert torch.all(soft >= hard - 1e-6)
    partial = (soft > 0.01) & (soft < 0.99)
    assert partial.sum() > 0 and (hard[partial] == 0).all()


def test_analysis_region_is_used_when_x_y_are_auto():
    bg, obj, mask = scene()
    analysis = json.dumps({"lighting": "soft", "placement": {"x": 0.6, "y": 0.5, "w": 0.2, "h": 0.3}})
    _, _, placed = placement.place(bg, obj, mask, x=-1, y=-1, scale=0.3, anchor="bottom", feather=0,
                                   shadow=False, analysis=analysis)
    l, _, r, b = placement.bbox(placed[0], 0.5)
    assert (l + r) / 2 == pytest.approx(0.7 * 320, abs=1)
    assert b == pytest.approx(0.8 * 240, abs=1)


def test_auto_without_analysis_falls_back_to_the_middle():
    assert placement.resolve_xy(-1, -1, "center", None)[:2] == (0.5, 0.5)
    assert placement.resolve_xy(0.2, -1, "center", "not json at all")[:2] == (0.2, 0.5)
    assert placement.region_from_analysis('```json\n{"placement_region": {"x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}}\n```') \
        == (0.1, 0.2, 0.3, 0.4)
    assert placement.region_from_analysis('{"placement": {"x": "left"}}') is None


def test_object_outside_the_canvas_is_a_clear_error():
    bg, obj, mask = scene()
    with pytest.raises(InputError, match="lands at least partly on the background"):
        # a 14×24 px object centred 32 px past the right edge
        placement.place(bg, obj, mask, x=1.1, y=0.5, scale=0.1, anchor="center", shadow=False)
    with pytest.raises(InputError, match="lands at least partly on the background"):
        placement.place_rect((0, 0, 10, 10), 100, 100, x=0.5, y=0.0, scale=0.2, anchor="bottom")  # bottom on the top edge


def test_partly_outside_is_clipped_not_an_error():
    bg, obj, mask = scene()
    comp, _, placed = placement.place(bg, obj, mask, x=0.98, y=0.5, scale=0.5, anchor="center", shadow=False)
    assert comp.shape == bg.shape
    l, _, r, _ = placement.bbox(placed[0], 0.5)
    assert r == 320 and l < 320


def test_empty_object_mask_is_a_clear_error():
    bg, obj, mask = scene()
    with pytest.raises(InputError, match="all zero"):
        placement.place(bg, obj, torch.zeros_like(mask), x=0.5, y=0.5, scale=0.3)


def test_mask_of_another_size_than_the_object_is_a_clear_error():
    bg, obj, _ = scene()
    with pytest.raises(InputError, match="object_mask of the object's size"):
        placement.place(bg, obj, torch.ones(1, 10, 10), x=0.5, y=0.5, scale=0.3)


def test_batches_broadcast_one_object_over_backgrounds():
    bg, obj, mask = scene()
    bgs = torch.cat([bg, bg.flip(1)])
    comp, inpaint, placed = placement.place(bgs, obj, mask, x=0.5, y=0.8, scale=0.3)
    assert comp.shape[0] == inpaint.shape[0] == placed.shape[0] == 2
    assert torch.equal(placed[0], placed[1])
    with pytest.raises(InputError, match="background batch of 1 or 3; got a batch of 2"):
        placement.place(bgs, torch.cat([obj] * 3), torch.cat([mask] * 3), x=0.5, y=0.8, scale=0.3)


def test_the_region_is_read_under_every_key_the_analysis_parser_knows():
    region = {"x": 0.1, "y": 0.2, "w": 0.3, "h": 0.4}
    for key in ("placement", "Placement", "bbox", "suggested_region", "배치"):
        assert placement.region_from_analysis(json.dumps({key: region})) == (0.1, 0.2, 0.3, 0.4), key
    assert placement.region_from_analysis(json.dumps({"lighting": region})) is None  # another key of the analysis
