"""Placement: paste an extracted object into a background and make the mask FLUX Fill should regenerate.

Geometry (all in background pixels): the object is cropped to its mask's bounding box, scaled so its height is
``scale`` × the background's height, and placed with its centre at ``x`` × width; vertically ``y`` is its centre
(``anchor="center"``) or the line its bottom stands on (``anchor="bottom"``: ground contact kept at y).

Masks: ``object_mask`` is the placed object's alpha; ``inpaint_mask`` is what FLUX Fill regenerates:
``harmonize`` = a band of ``band`` px around the object plus its outer edge (so it blends into the scene) and,
with ``shadow``, an ellipse under it where a contact shadow belongs — the object's own pixels are kept;
``regenerate`` = the whole object region grown by ``band`` (FLUX redraws the object from the prompt, guided by
the pasted pixels). ``feather`` softens the inpaint mask's outer edge (Gaussian, px).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .analysis import canonical_key, json_objects
from .errors import InputError
from .images import check_image, check_mask

log = logging.getLogger("atelier")

AUTO = -1.0  # x / y value meaning "take it from the analysis (centre of the suggested region)"
ANCHORS = ("center", "bottom")
MODES = ("harmonize", "regenerate")


@dataclass(frozen=True)
class Placement:
    """Where the object lands: its rectangle in background pixels (may extend past the edges)."""

    left: int
    top: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def bottom(self) -> int:
        return self.top + self.height


def bbox(mask: torch.Tensor, threshold: float = 0.01) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of a HW mask's pixels above ``threshold``, right/bottom exclusive; None if empty."""
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def region_from_analysis(analysis: str | None) -> tuple[float, float, float, float] | None:
    """The suggested placement region (x, y, w, h in 0–1) from the captioner's analysis JSON, if it has one: the
    first JSON object of the text (:func:`atelier.analysis.json_objects`), under any key the analysis parser reads
    as the placement (:func:`atelier.analysis.canonical_key`), with four finite numbers and a positive size."""
    if not analysis or not analysis.strip():
        return None
    for data in json_objects(analysis):
        for key, r in data.items():
            if canonical_key(key) != "placement" or not isinstance(r, dict):
                continue
            if all(isinstance(r.get(k), (int, float)) for k in ("x", "y", "w", "h")):
                vals = [float(r[k]) for k in ("x", "y", "w", "h")]
                if all(math.isfinite(v) for v in vals) and vals[2] > 0 and vals[3] > 0:
                    return tuple(min(max(v, 0.0), 1.0) for v in vals)  # type: ignore[return-value]
    return None


def resolve_xy(x: float, y: float, anchor: str, analysis: str | None) -> tuple[float, float, str]:
    """x/y left at AUTO take the analysis region's centre (bottom edge for anchor=bottom), else the middle."""
    if x >= 0 and y >= 0:
        return x, y, "given"
    region = region_from_analysis(analysis)
    if region is None:
        rx, ry = 0.5, (0.5 if anchor == "center" else 0.9)
        source = "default (no placement region in the analysis)"
    else:
        left, top, w, h = region
        rx, ry = left + w / 2, (top + h / 2 if anchor == "center" else top + h)
        source = "analysis"
    return (x if x >= 0 else rx), (y if y >= 0 else ry), source


def place_rect(obj_box: tuple[int, int, int, int], bg_w: int, bg_h: int, x: float, y: float, scale: float,
               anchor: str) -> Placement:
    l, t, r, b = obj_box
    ow, oh = r - l, b - t
    height = max(1, round(scale * bg_h))
    width = max(1, round(ow * height / oh))
    cx = x * bg_w
    left = round(cx - width / 2)
    top = round(y * bg_h - (height / 2 if anchor == "center" else height))
    p = Placement(left, top, width, height)
    if p.right <= 0 or p.bottom <= 0 or p.left >= bg_w or p.top >= bg_h:
        raise InputError(
            "an object that lands at least partly on the background",
            f"a {width}×{height} px object at x={x:.2f}, y={y:.2f} (rectangle {left},{top} to {p.right},{p.bottom} "
            f"on a {bg_w}×{bg_h} background)",
            "Lower scale or move x / y (0–1 of the background) so the object overlaps the picture.")
    return p


def _resize(t: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """BCHW resize; antialiased when shrinking."""
    shrink = w < t.shape[-1] or h < t.shape[-2]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink).clamp(0.0, 1.0)


def _paste(canvas: torch.Tensor, patch: torch.Tensor, p: Placement) -> torch.Tensor:
    """Put CHW ``patch`` (p.height × p.width) into CHW ``canvas`` at p, clipped at the edges; returns a copy."""
    out = canvas.clone()
    H, W = canvas.shape[-2:]
    x0, y0 = max(p.left, 0), max(p.top, 0)
    x1, y1 = min(p.right, W), min(p.bottom, H)
    out[..., y0:y1, x0:x1] = patch[..., y0 - p.top : y1 - p.top, x0 - p.left : x1 - p.left]
    return out


def _edt(binary: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(binary)


def dilate(binary: np.ndarray, r: float) -> np.ndarray:
    if r <= 0:
        return binary.copy()
    return _edt(~binary) <= r


def erode(binary: np.ndarray, r: float) -> np.ndarray:
    if r <= 0:
        return binary.copy()
    return _edt(binary) > r


def shadow_ellipse(p: Placement, bg_w: int, bg_h: int, band: int) -> np.ndarray:
    """An ellipse under the object's bottom edge, where a contact shadow falls."""
    yy, xx = np.mgrid[0:bg_h, 0:bg_w]
    cx, cy = p.left + p.width / 2, p.bottom
    rx = max(p.width * 0.6, 2.0)
    ry = max(p.height * 0.08, band / 2, 2.0)
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def inpaint_region(obj_alpha: np.ndarray, p: Placement, mode: str, band: int, feather: int, shadow: bool) -> np.ndarray:
    """The float mask FLUX Fill regenerates (1 = regenerate), from the placed object's alpha (HW)."""
    h, w = obj_alpha.shape
    solid = obj_alpha > 0.5
    grown = dilate(solid, band)
    if mode == "regenerate":
        region = grown
        keep = np.zeros_like(solid)
    else:
        edge = max(1.0, band / 4)
        keep = erode(solid, edge)  # the object's own pixels (minus a thin edge that is blended) stay
        region = grown & ~keep
    if shadow:
        region |= shadow_ellipse(p, w, h, band) & ~keep
    out = region.astype(np.float32)
    if feather > 0:
        from scipy.ndimage import gaussian_filter

        soft = gaussian_filter(out, sigma=feather / 2.0)
        out = np.maximum(out, soft)  # soften outwards only: what had to be regenerated still is
        out[keep] = 0.0
    return out


def place(background: torch.Tensor, obj: torch.Tensor, obj_mask: torch.Tensor, *, x: float, y: float, scale: float,
          anchor: str = "bottom", mode: str = "harmonize", band: int = 16, feather: int = 8, shadow: bool = True,
          analysis: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (composite IMAGE, inpaint_mask MASK, object_mask MASK), all of the background's size and batch."""
    if anchor not in ANCHORS:
        raise InputError(f"anchor one of {', '.join(ANCHORS)}", repr(anchor), "Pick one of the listed values.")
    if mode not in MODES:
        raise InputError(f"mode one of {', '.join(MODES)}", repr(mode), "Pick one of the listed values.")
    if not scale > 0:
        raise InputError("scale above 0 (object height / background height)", str(scale), "Try 0.3–0.6.")
    bg = check_image(background, "background")
    ob = check_image(obj, "object")
    om = check_mask(obj_mask, "object_mask")
    if om.shape[1:] != ob.shape[1:3]:
        raise InputError(f"an object_mask of the object's size ({ob.shape[2]}×{ob.shape[1]})",
                         f"{om.shape[2]}×{om.shape[1]}", "Connect the mask that came with the object "
                         "(e.g. from Remove Background or SAM2 Segment on the same image).")
    n = max(bg.shape[0], ob.shape[0], om.shape[0])
    for name, t in (("background", bg), ("object", ob), ("object_mask", om)):
        if t.shape[0] not in (1, n):
            raise InputError(f"a {name} batch of 1 or {n}", f"a batch of {t.shape[0]}",
                             "Use one object for every background, or one per background.")
    x, y, source = resolve_xy(x, y, anchor, analysis)
    H, W = bg.shape[1], bg.shape[2]
    composites, inpaints, objects = [], [], []
    for i in range(n):
        b = bg[min(i, bg.shape[0] - 1)]
        o = ob[min(i, ob.shape[0] - 1)]
        m = om[min(i, om.shape[0] - 1)]
        box = bbox(m)
        if box is None:
            raise InputError("an object_mask with the object in it", "a mask that is all zero",
                             "Check the background remover / SAM2 output: nothing was selected.")
        l, t, r, bt = box
        p = place_rect(box, W, H, x, y, scale, anchor)
        patch = _resize(o[t:bt, l:r].permute(2, 0, 1)[None], p.width, p.height)[0]
        alpha = _resize(m[t:bt, l:r][None, None], p.width, p.height)[0]
        canvas_alpha = _paste(torch.zeros(1, H, W), alpha, p)
        canvas_obj = _paste(torch.zeros(3, H, W), patch, p)
        bchw = b.permute(2, 0, 1)
        comp = torch.where(canvas_alpha > 0, bchw * (1 - canvas_alpha) + canvas_obj * canvas_alpha, bchw)
        composites.append(comp.permute(1, 2, 0))
        objects.append(canvas_alpha[0])
        inpaints.append(torch.from_numpy(inpaint_region(canvas_alpha[0].numpy(), p, mode, band, feather, shadow)))
    log.info("Atelier: placed a %d×%d object at x=%.3f y=%.3f (%s, %s)", p.width, p.height, x, y, anchor, source)
    return torch.stack(composites), torch.stack(inpaints), torch.stack(objects)
