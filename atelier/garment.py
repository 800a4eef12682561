"""Garment masks for try-on from a BlazePose skeleton and a person mask: no DensePose, no human parsing.

``garment_region(landmarks, person, garment, expand, ...)`` draws the part of the body a garment covers from the
33 landmarks (pixels), in body units (``u`` = the larger of the shoulder width and 0.6 × the torso length):

* ``upper_body``: the torso (shoulders widened 15 %, lifted 0.08 u for the neckline, hips widened 25 %, down to
  0.1 torso below the hip line; the collar, half the shoulder width wide, rises 0.08 u + 0.3 u × expand) and both arms shoulder → elbow → wrist as sleeves 0.32 u wide;
* ``lower_body``: the pelvis (0.2 torso above the hips to the crotch) and both legs hip → knee → ankle 0.38 u wide;
* ``dress``: the upper body plus a skirt from the hips to the knees;
* ``full_body``: upper and lower body together.

``expand`` (0–1) relaxes the silhouette so longer and looser garments fit: sleeves and legs widen (up to 1.5×),
hems move down (the upper body's by up to 0.6 torso, a dress towards the ankles), a skirt-like zone joins the legs of
lower-body garments, and the shape grows by up to 0.12 u. The result is cut to the person mask grown by 0.04 u + 0.25 u
× expand, so the mask never spills far onto the background. Every step only adds area as ``expand`` grows, so the
mask grows monotonically. ``protect_face`` removes a disc over the face (centre of the 11 face landmarks, radius
0.85 × the ear distance, at least 0.25 × the shoulder width); ``protect_hands`` removes a disc over each hand (wrist,
pinky, index, thumb). A ``refine`` function (SAM2 prompted with pose points) adds what it segments near the
region.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import InputError

GARMENTS: tuple[str, ...] = ("upper_body", "lower_body", "dress", "full_body")

# BlazePose landmark indices
NOSE, L_EAR, R_EAR, L_EYE, R_EYE = 0, 7, 8, 2, 5
LS, RS, LE, RE, LW, RW = 11, 12, 13, 14, 15, 16
LH, RH, LK, RK, LA, RA = 23, 24, 25, 26, 27, 28
HANDS = ((LW, 17, 19, 21), (RW, 18, 20, 22))
FACE = tuple(range(11))


def _draw(size: tuple[int, int], polygons=(), lines=(), discs=()) -> np.ndarray:
    """A bool mask (H, W) with filled polygons, thick polylines ((points, width)) with round joints, and discs."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    for poly in polygons:
        if len(poly) >= 3:
            d.polygon([(float(x), float(y)) for x, y in poly], fill=255)
    for pts, width in lines:
        pts = [(float(x), float(y)) for x, y in pts]
        d.line(pts, fill=255, width=max(1, int(round(width))))
        for x, y in pts:
            r = width / 2
            d.ellipse((x - r, y - r, x + r, y + r), fill=255)
    for (x, y), r in discs:
        d.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(img) > 0


def _hull(points) -> list:
    """Convex hull (monotone chain) of 2-D points."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) < 3:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def grow(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` dilated by a disc of ``radius`` pixels (Euclidean distance)."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask) <= radius


class Body:
    """Body geometry from 33 landmarks in pixels: axis, units, widened points."""

    def __init__(self, lm: np.ndarray):
        p = np.asarray(lm, dtype=np.float64)[:, :2]
        self.p = p
        self.ms = (p[LS] + p[RS]) / 2
        self.mh = (p[LH] + p[RH]) / 2
        self.sw = float(np.linalg.norm(p[LS] - p[RS]))
        self.torso = float(np.linalg.norm(self.mh - self.ms))
        axis = self.mh - self.ms
        self.down = axis / (np.linalg.norm(axis) or 1.0)
        self.u = max(self.sw, 0.6 * self.torso, 1.0)

    def widened(self, a: int, b: int, mid: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
        return mid + (self.p[a] - mid) * factor, mid + (self.p[b] - mid) * factor


def _upper(b: Body, e: float, size) -> np.ndarray:
    ls, rs = b.widened(LS, RS, b.ms, 1.15)
    lift = -b.down * 0.08 * b.u
    lh, rh = b.widened(LH, RH, b.mh, 1.25)
    hem = b.down * (0.1 + 0.6 * e) * b.torso
    across = (b.p[LS] - b.p[RS]) / (b.sw or 1.0) * 0.25 * b.sw
    collar = -b.down * (0.08 + 0.3 * e) * b.u  # a looser garment may rise up the neck (high collars, hoods)
    torso = _hull([ls + lift, rs + lift, ls, rs, b.ms + across + collar, b.ms - across + collar, lh, rh,
                   lh + hem, rh + hem])
    arm_w = 0.32 * b.u * (1 + 0.5 * e)
    arms = [([b.p[LS], b.p[LE], b.p[LW]], arm_w), ([b.p[RS], b.p[RE], b.p[RW]], arm_w)]
    return _draw(size, polygons=[torso], lines=arms)


def _lower(b: Body, e: float, size) -> np.ndarray:
    lh, rh = b.widened(LH, RH, b.mh, 1.25)
    waist = -b.down * 0.2 * b.torso
    crotch = b.mh + b.down * 0.3 * b.torso
    pelvis = _hull([lh + waist, rh + waist, lh, rh, crotch])
    leg_w = 0.38 * b.u * (1 + 0.5 * e)
    hem = b.down * (0.05 + 0.1 * e) * b.torso
    legs = [([b.p[LH], b.p[LK], b.p[LA], b.p[LA] + hem], leg_w), ([b.p[RH], b.p[RK], b.p[RA], b.p[RA] + hem], leg_w)]
    polygons = [pelvis]
    if e > 0:  # looser / flared: the zone between the legs down to the knees joins the garment
        out = (b.p[LK] - b.p[RK]) / (np.linalg.norm(b.p[LK] - b.p[RK]) or 1.0) * e * 0.3 * b.u
        polygons.append(_hull([lh, rh, b.p[LK], b.p[RK], b.p[LK] + out, b.p[RK] - out]))
    return _draw(size, polygons=polygons, lines=legs)


def _skirt(b: Body, e: float, size) -> np.ndarray:
    lh, rh = b.widened(LH, RH, b.mh, 1.25)
    side = (b.p[LK] - b.p[RK]) / (np.linalg.norm(b.p[LK] - b.p[RK]) or 1.0) * 0.15 * b.u
    lk, rk = b.p[LK] + side, b.p[RK] - side
    hem_l = (b.p[LA] - b.p[LK]) * e
    hem_r = (b.p[RA] - b.p[RK]) * e
    return _draw(size, polygons=[_hull([lh, rh, lk, rk, lk + hem_l, rk + hem_r])])


def face_disc(lm: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre, radius) of the face: the 11 face landmarks' centre; 0.85 × the ear distance (≥ 0.25 shoulders)."""
    p = np.asarray(lm, dtype=np.float64)[:, :2]
    centre = p[list(FACE)].mean(0)
    ears = float(np.linalg.norm(p[L_EAR] - p[R_EAR]))
    eyes = float(np.linalg.norm(p[L_EYE] - p[R_EYE]))
    sw = float(np.linalg.norm(p[LS] - p[RS]))
    return centre, max(0.85 * ears, 1.8 * eyes, 0.25 * sw)


def hand_discs(lm: np.ndarray) -> list[tuple[np.ndarray, float]]:
    p = np.asarray(lm, dtype=np.float64)[:, :2]
    sw = float(np.linalg.norm(p[LS] - p[RS]))
    out = []
    for idx in HANDS:
        pts = p[list(idx)]
        c = pts.mean(0)
        out.append((c, max(1.6 * float(np.linalg.norm(pts - c, axis=1).max()), 0.1 * sw)))
    return out


def sam_points(lm: np.ndarray, garment: str, size: tuple[int, int]) -> tuple[list, list]:
    """Positive points on the garment (torso, thighs) and negative points (face) for SAM2, inside the picture."""
    b = Body(lm)
    p = b.p
    pos = []
    if garment in ("upper_body", "dress", "full_body"):
        pos += [b.ms + (b.mh - b.ms) * 0.35, p[LS] + (p[LH] - p[LS]) * 0.25, p[RS] + (p[RH] - p[RS]) * 0.25]
    if garment in ("lower_body", "dress", "full_body"):
        pos += [b.mh + b.down * 0.1 * b.torso, (p[LH] + p[LK]) / 2, (p[RH] + p[RK]) / 2]
    w, h = size

    def inside(q):
        return 0 <= q[0] < w and 0 <= q[1] < h

    neg = [face_disc(lm)[0]]
    return ([tuple(map(float, q)) for q in pos if inside(q)], [tuple(map(float, q)) for q in neg if inside(q)])


def garment_region(lm: np.ndarray, person: np.ndarray | None, garment: str, expand: float = 0.0,
                   protect_face: bool = True, protect_hands: bool = True,
                   refine: Callable[[list, list], np.ndarray] | None = None) -> np.ndarray:
    """The garment mask (H, W) bool for one person: landmarks ``[33, ≥2]`` in pixels, ``person`` (H, W) in [0, 1]
    (None: no cut), see the module docstring."""
    if garment not in GARMENTS:
        raise InputError(f"garment one of {', '.join(GARMENTS)}", repr(garment), "Pick one in the list.")
    if person is None:
        raise InputError("a person mask", "none", "Connect a person_mask or put selfie_segmentation.tflite "
                         "in models/pose.")
    h, w = person.shape
    size = (w, h)
    e = float(np.clip(expand, 0.0, 1.0))
    b = Body(lm)
    if garment == "upper_body":
        shape = _upper(b, e, size)
    elif garment == "lower_body":
        shape = _lower(b, e, size)
    elif garment == "dress":
        shape = _upper(b, e, size) | _skirt(b, e, size)
    else:
        shape = _upper(b, e, size) | _lower(b, e, size)
    shape = grow(shape, (0.02 + 0.1 * e) * b.u)
    body = person > 0.5
    if not body.any():
        raise InputError("a person mask with the person in it (1 = person)", "an empty mask",
                         "Connect the person's mask (or leave person_mask unconnected to compute it).")
    region = shape & grow(body, (0.04 + 0.25 * e) * b.u)
    if refine is not None:
        pos, neg = sam_points(lm, garment, size)
        if pos:
            extra = np.asarray(refine(pos, neg), dtype=bool)
            region |= extra & grow(region, 0.15 * b.u)
    if protect_face:
        c, r = face_disc(lm)
        region &= ~_draw(size, discs=[(c, r)])
    if protect_hands:
        region &= ~_draw(size, discs=hand_discs(lm))
    return region


def preview(rgb: np.ndarray, mask: np.ndarray, skeleton: np.ndarray | None = None) -> np.ndarray:
    """The picture (HWC float [0, 1]) dimmed, the mask tinted red, the skeleton map (uint8) on top → float HWC."""
    out = rgb.astype(np.float32) * 0.6
    m = mask.astype(np.float32)[..., None]
    out = out * (1 - 0.5 * m) + np.array([1.0, 0.1, 0.1], dtype=np.float32) * 0.5 * m
    if skeleton is not None:
        s = skeleton.astype(np.float32) / 255.0
        drawn = s.max(axis=-1, keepdims=True) > 0
        out = np.where(drawn, s, out)
    return np.clip(out, 0.0, 1.0)
