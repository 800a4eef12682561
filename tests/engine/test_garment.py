"""Garment masks from BlazePose on the real astronaut: the upper-body mask covers the torso and not the face,
``expand`` grows it monotonically, protect_face / protect_hands hold; bad person masks are clear errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pose = pytest.importorskip("atelier.pose", reason="ai-edge-litert is not installed", exc_type=ImportError)

from atelier import garment  # noqa: E402
from atelier.errors import InputError  # noqa: E402
from tests.harness import real_weights as rw  # noqa: E402

log = logging.getLogger("atelier.tests.garment")

# hand-labelled on the 512×512 astronaut (pixels, x0, y0, x1, y1): the face, and the orange suit's torso left of the
# helmet she holds
FACE_BOX = (180, 60, 275, 175)
TORSO_BOX = (80, 280, 270, 480)
EXPANDS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _box(box, shape=(512, 512)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture(scope="module")
def found():
    try:
        folder = rw.blazepose_dir()
    except rw.WeightsUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    model = pose.load(pose.make_handle(pose.make_spec(str(folder / pose.LANDMARK_NAME))))
    rgb = rw.astronaut().astype(np.float32) / 255.0
    person = pose.estimate(model, rgb)
    assert person is not None
    return person.landmarks, pose.segment_person(model, rgb)


def test_upper_body_covers_the_torso_not_the_face(found):
    lm, person = found
    face, torso = _box(FACE_BOX), _box(TORSO_BOX)
    m = garment.garment_region(lm, person, "upper_body", expand=0.0)
    t, f = m[torso].mean(), m[face].mean()
    outside = (m & (person < 0.5)).mean()
    log.info("astronaut upper_body: torso box covered %.3f, face box covered %.3f, mask area %.3f of the picture, "
             "%.4f of it off the person", t, f, m.mean(), outside)
    assert t > 0.9 and f < 0.01
    assert outside < 0.02


def test_expand_grows_monotonically(found):
    lm, person = found
    for g in garment.GARMENTS:
        masks = [garment.garment_region(lm, person, g, expand=e) for e in EXPANDS]
        areas = [float(m.mean()) for m in masks]
        log.info("astronaut %s: area for expand %s = %s", g, EXPANDS, [round(a, 3) for a in areas])
        for small, big in zip(masks, masks[1:]):
            assert not (small & ~big).any(), f"{g}: a larger expand lost pixels"
        if g != "lower_body":  # the legs are out of the picture: only the upper part shows
            assert areas[-1] > areas[0] * 1.2, f"{g}: expand 1 should relax the silhouette clearly"


def test_protect_face_and_hands_hold(found):
    lm, person = found
    face = _box(FACE_BOX)
    c, r = garment.face_disc(lm)
    yy, xx = np.mgrid[0:512, 0:512]
    disc = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= (r - 1.5) ** 2  # inside the rasterised disc's edge
    loose = garment.garment_region(lm, person, "full_body", expand=1.0, protect_face=False, protect_hands=False)
    kept = garment.garment_region(lm, person, "full_body", expand=1.0, protect_face=True, protect_hands=False)
    log.info("astronaut full_body expand 1: face box covered %.3f unprotected, %.3f protected",
             loose[face].mean(), kept[face].mean())
    assert (loose & disc).sum() > 500, "without protection the relaxed mask reaches into the face disc"
    assert not (kept & disc).any()
    assert kept[face].mean() < 0.02
    hands = garment.hand_discs(lm)
    no_hands = garment.garment_region(lm, person, "full_body", expand=1.0, protect_hands=True)
    for (hc, hr) in hands:
        inside = (xx - hc[0]) ** 2 + (yy - hc[1]) ** 2 <= (hr - 1.5) ** 2
        assert not (no_hands & inside).any()
    assert (loose & ~no_hands).sum() > 0


def test_refine_adds_only_near_the_region(found):
    lm, person = found
    base = garment.garment_region(lm, person, "upper_body")
    seen = {}

    def refine(pos, neg):
        seen["pos"], seen["neg"] = pos, neg
        m = np.zeros((512, 512), dtype=bool)
        m[:, :] = True  # a segmenter that selects everything
        return m

    refined = garment.garment_region(lm, person, "upper_body", refine=refine)
    assert len(seen["pos"]) == 3 and len(seen["neg"]) == 1
    for x, y in seen["pos"]:
        assert base[int(y), int(x)], "positive points lie on the garment"
    assert not (base & ~refined).any() and refined.sum() > base.sum()
    assert not refined[:20].any(), "what the segmenter adds stays near the pose region"


def test_bad_inputs(found):
    lm, person = found
    with pytest.raises(InputError, match="empty mask"):
        garment.garment_region(lm, np.zeros_like(person), "upper_body")
    with pytest.raises(InputError, match="garment one of"):
        garment.garment_region(lm, person, "hat")
