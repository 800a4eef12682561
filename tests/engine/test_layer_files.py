"""Layer files without ComfyUI: PSD (read back by psd-tools, independently of our reader), PPTX (its XML), ZIP
(manifest), numbered PNGs, the readers' round trips and refusals, and output paths that never leave their folder."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atelier import layer_files as lf
from atelier.errors import InputError

W, H = 40, 24
NAMES = ["Background", "Cup", "Ünïcode 层"]


def sample_stack() -> lf.LayerStack:
    """Three layers: an opaque gradient, a half-transparent red box, a blue box with soft alpha."""
    rgba = np.zeros((3, H, W, 4), np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    rgba[0, ..., 0] = (xx * 6).astype(np.uint8)
    rgba[0, ..., 1] = (yy * 10).astype(np.uint8)
    rgba[0, ..., 2] = 90
    rgba[0, ..., 3] = 255
    rgba[1, 3:11, 5:17] = (220, 30, 40, 128)
    rgba[2, 12:20, 22:37, :3] = (20, 40, 230)
    rgba[2, 12:20, 22:37, 3] = np.linspace(1, 255, 15).astype(np.uint8)[None, :]
    return lf.LayerStack(rgba, list(NAMES))


BOUNDS = [(0, 0, W, H), (5, 3, 17, 11), (22, 12, 37, 20)]


def test_bounds_and_names():
    stack = sample_stack()
    assert stack.bounds() == BOUNDS
    assert lf.alpha_bounds(np.zeros((4, 4), np.uint8)) is None
    names, notes = lf.parse_names("sky, , tree", 4)
    assert names == ["sky", "Layer 2", "tree", "Layer 4"] and notes == []
    names, notes = lf.parse_names("a,b,c", 2)
    assert names == ["a", "b"] and "3 layer names for 2 layers" in notes[0]


def test_make_stack_rounds_and_clears_colour_under_zero_alpha():
    rgb = np.full((1, 2, 2, 3), 100 / 255, np.float32)
    alpha = np.array([[[0.0, 1.0], [0.5, 0.0]]], np.float32)
    stack = lf.make_stack(rgb, alpha, ["x"])
    assert stack.rgba[0, 0, 1].tolist() == [100, 100, 100, 255]
    assert stack.rgba[0, 1, 0].tolist() == [100, 100, 100, 128]
    assert stack.rgba[0, 0, 0].tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------- PSD


def test_psd_has_named_cropped_layers_in_order(tmp_path):
    from psd_tools import PSDImage

    stack = sample_stack()
    path = lf.write_psd(stack, tmp_path / "x.psd")
    psd = PSDImage.open(path)
    assert psd.size == (W, H)
    found = list(psd)  # psd-tools lists layers bottom first
    assert [layer.name for layer in found] == NAMES
    for layer, (left, top, right, bottom), src in zip(found, BOUNDS, stack.rgba, strict=True):
        assert layer.kind == "pixel" and layer.visible and layer.opacity == 255
        assert layer.bbox == (left, top, right, bottom)
        assert np.array_equal(np.asarray(layer.topil().convert("RGBA")), src[top:bottom, left:right])


def test_psd_round_trip_is_lossless(tmp_path):
    stack = sample_stack()
    back = lf.read_layers(lf.write_psd(stack, tmp_path / "x.psd"))
    assert back.names == NAMES
    assert np.array_equal(back.rgba, stack.rgba)


def test_empty_layer_survives(tmp_path):
    stack = sample_stack()
    stack.rgba[1] = 0
    back = lf.read_psd(lf.write_psd(stack, tmp_path / "e.psd"))
    assert back.count == 3 and np.array_equal(back.rgba, stack.rgba)


def test_foreign_psd_groups_opacity_and_hidden_layers(tmp_path):
    """A PSD made with psd-tools' own API (not our writer): a group, a 50 % layer, a hidden one, an offset past
    the canvas."""
    from psd_tools import PSDImage
    from psd_tools.api.layers import Group, PixelLayer

    psd = PSDImage.new("RGBA", (16, 12), color=(0, 0, 0, 0))
    bottom = np.zeros((12, 16, 4), np.uint8)
    bottom[...] = (10, 20, 30, 255)
    PixelLayer.frompil(Image.fromarray(bottom, "RGBA"), psd, "bottom", 0, 0)
    square = np.zeros((4, 4, 4), np.uint8)
    square[...] = (250, 0, 0, 200)
    half = PixelLayer.frompil(Image.fromarray(square, "RGBA"), psd, "half", 2, 3)
    half.opacity = 128
    group = Group.new(psd, name="group")
    inner = PixelLayer.frompil(Image.fromarray(square, "RGBA"), group, "inner", 10, 14)  # runs past the edge
    inner.visible = False
    path = tmp_path / "foreign.psd"
    psd.save(path)

    back = lf.read_psd(path)
    assert back.names == ["bottom", "half", "inner"]
    assert back.rgba[1, 3, 4].tolist() == [250, 0, 0, (200 * 128 + 127) // 255]
    assert back.rgba[2, 10:12, 14:16, 3].tolist() == [[200, 200], [200, 200]]  # clipped to the canvas
    assert any("hidden" in n for n in back.notes)


@pytest.mark.parametrize("content", [b"not a psd at all", b"8BPS\x00\x01" + b"\x00" * 40])
def test_unreadable_psd_is_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.psd"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        lf.read_layers(path)
    assert "broken.psd" in str(e.value) and ("PSD" in str(e.value))


def test_truncated_psd_is_a_clear_error(tmp_path):
    good = lf.write_psd(sample_stack(), tmp_path / "good.psd").read_bytes()
    path = tmp_path / "cut.psd"
    path.write_bytes(good[: len(good) // 5])  # inside the layer section (the merged image comes last)
    with pytest.raises(InputError, match="a PSD"):
        lf.read_layers(path)


# --------------------------------------------------------------------------------------------------- PPTX


def _pptx_pictures(path: Path) -> tuple[dict, list[dict]]:
    """Slide size and pictures (name, x, y, cx, cy in EMU) read straight from the package XML."""
    from lxml import etree

    ns = {"p": "http://schemas.openxmlformats.org/presentationml/2006/main",
          "a": "http://schemas.openxmlformats.org/drawingml/2006/main"}
    with zipfile.ZipFile(path) as z:
        pres = etree.fromstring(z.read("ppt/presentation.xml"))
        slide = etree.fromstring(z.read("ppt/slides/slide1.xml"))
    size = pres.find("p:sldSz", ns)
    pics = []
    for pic in slide.iter(f"{{{ns['p']}}}pic"):
        off, ext = pic.find(".//a:xfrm/a:off", ns), pic.find(".//a:xfrm/a:ext", ns)
        pics.append({"name": pic.find(".//p:cNvPr", ns).get("name"), "x": int(off.get("x")), "y": int(off.get("y")),
                     "cx": int(ext.get("cx")), "cy": int(ext.get("cy"))})
    return {"cx": int(size.get("cx")), "cy": int(size.get("cy"))}, pics


def test_pptx_pictures_sit_at_the_layer_bounds(tmp_path):
    from pptx import Presentation

    stack = sample_stack()
    path = lf.write_pptx(stack, tmp_path / "x.pptx")
    emu = lf.slide_scale(W, H)
    size, pics = _pptx_pictures(path)
    assert size == {"cx": W * emu, "cy": H * emu}
    assert [p["name"] for p in pics] == NAMES  # document order = z-order: the first is at the back
    for p, (left, top, right, bottom) in zip(pics, BOUNDS, strict=True):
        assert (p["x"], p["y"], p["cx"], p["cy"]) == (left * emu, top * emu, (right - left) * emu,
                                                      (bottom - top) * emu)
    prs = Presentation(path)  # and python-pptx opens it; each picture holds the layer's cropped pixels
    for shape, src, (left, top, right, bottom) in zip(prs.slides[0].shapes, stack.rgba, BOUNDS, strict=True):
        img = np.asarray(Image.open(io.BytesIO(shape.image.blob)).convert("RGBA"))
        assert np.array_equal(img, src[top:bottom, left:right])


def test_slide_scale_stays_within_powerpoint_limits():
    assert lf.slide_scale(640, 480) == 9525
    small = lf.slide_scale(W, H)
    assert H * small >= lf.SLIDE_MIN_EMU and W * small <= lf.SLIDE_MAX_EMU
    big = lf.slide_scale(8000, 2000)
    assert 8000 * big <= lf.SLIDE_MAX_EMU


# ----------------------------------------------------------------------------------------------- ZIP, PNG


def test_zip_manifest_and_round_trip(tmp_path):
    stack = sample_stack()
    path = lf.write_zip(stack, tmp_path / "x.zip")
    with zipfile.ZipFile(path) as z:
        doc = json.loads(z.read("manifest.json"))
        assert doc["format"] == "atelier-layers" and (doc["width"], doc["height"]) == (W, H)
        assert doc["order"] == "bottom-to-top"
        assert [e["name"] for e in doc["layers"]] == NAMES
        assert [e["index"] for e in doc["layers"]] == [1, 2, 3]
        assert [tuple(e["bounds"][k] for k in ("left", "top", "right", "bottom")) for e in doc["layers"]] == BOUNDS
        for e, src in zip(doc["layers"], stack.rgba, strict=True):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(z.read(e["file"]))).convert("RGBA")), src)
    back = lf.read_layers(path)
    assert back.names == NAMES and np.array_equal(back.rgba, stack.rgba)


def test_zip_of_plain_pngs_reads_in_natural_order(tmp_path):
    stack = sample_stack()
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i, name in [(2, "layer10.png"), (0, "layer2.png"), (1, "layer3.png")]:
            buf = io.BytesIO()
            Image.fromarray(stack.rgba[i], "RGBA").save(buf, "PNG")
            z.writestr(name, buf.getvalue())
    back = lf.read_layers(path)
    assert back.names == ["layer2", "layer3", "layer10"]
    assert np.array_equal(back.rgba, stack.rgba)


@pytest.mark.parametrize("members", [{}, {"manifest.json": b"{not json"},
                                     {"manifest.json": json.dumps({"width": 4, "height": 4, "layers": [
                                         {"file": "gone.png"}]}).encode()}])
def test_bad_zip_is_a_clear_error(tmp_path, members):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    with pytest.raises(InputError):
        lf.read_layers(path)


def test_hostile_zip_canvas_is_refused(tmp_path):
    path = tmp_path / "huge.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("manifest.json", json.dumps({"width": 10**6, "height": 10**6, "layers": [{"file": "a.png"}]}))
        z.writestr("a.png", b"")
    with pytest.raises(InputError, match="a canvas between 1 and"):
        lf.read_layers(path)


def test_pngs_are_numbered_and_named(tmp_path):
    stack = sample_stack()
    paths = lf.output_paths(tmp_path, "set/pic", [f"{i + 1:02}.png" for i in range(3)])
    assert [p.name for p in paths] == ["pic_00001_01.png", "pic_00001_02.png", "pic_00001_03.png"]
    lf.write_pngs(stack, paths)
    for p, src, name in zip(paths, stack.rgba, NAMES, strict=True):
        with Image.open(p) as im:
            assert im.mode == "RGBA" and np.array_equal(np.asarray(im), src)
            assert im.text.get("Title") == name


# ------------------------------------------------------------------------------------------ output paths


def test_output_paths_count_up_and_stay_inside(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    (first,) = lf.output_paths(out, "layers/poster", [".psd"])
    assert first == out.resolve() / "layers" / "poster_00001_.psd"
    first.write_bytes(b"x")
    (second,) = lf.output_paths(out, "layers/poster", [".psd"])
    assert second.name == "poster_00002_.psd"


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/abs", "C:/x", "~/x", "", "  ", "dir/",
                                    "..\\escape", "x\x00y"])
def test_output_paths_refuse_to_leave_the_folder(tmp_path, prefix):
    out = tmp_path / "output"
    out.mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InputError) as e:
        lf.output_paths(out, prefix, [".psd"])
    assert "filename_prefix inside ComfyUI's output folder" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before and not list(out.iterdir())


def test_output_paths_refuse_links_out(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(InputError, match="outside the output folder"):
        lf.output_paths(out, "link/x", [".psd"])


def test_write_does_not_follow_a_planted_link(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (path,) = lf.output_paths(out, "x", [".zip"])
    (out / f".{path.name}.tmp").symlink_to(victim)
    lf.write_zip(sample_stack(), path)
    assert victim.read_text() == "keep" and zipfile.is_zipfile(path)


def test_find_in_folder_lists_what_is_there(tmp_path):
    (tmp_path / "a.psd").write_bytes(b"8BPS")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.zip").write_bytes(b"PK")
    assert lf.find_in_folder(tmp_path, "sub/b.zip") == (tmp_path / "sub" / "b.zip").resolve()
    for bad in ("missing.psd", "../x.psd", "/etc/passwd", ""):
        with pytest.raises(InputError) as e:
            lf.find_in_folder(tmp_path, bad)
        assert "a.psd, sub/b.zip" in str(e.value)
