"""Layer stacks on disk: PSD, PPTX, ZIP (PNGs + manifest) and numbered PNGs out; PSD and ZIP back in.

Pure: numpy, Pillow, psd-tools and python-pptx; no torch, no ComfyUI. A :class:`LayerStack` is what travels:
``rgba`` (N, H, W, 4) uint8 with straight (not premultiplied) alpha, ``names``, layer 0 at the bottom.

Conventions every format shares:

* bounds = the box of a layer's pixels whose alpha is above 0 (``(left, top, right, bottom)``, right/bottom
  exclusive; None for an empty layer). PSD layers and PPTX pictures are cropped to them.
* colour under alpha 0 is written as 0, so a PSD or ZIP read back gives exactly the layers that were written
  (every alpha value, and the colour of every pixel that shows).
* files are only ever written inside the folder :func:`output_paths` is given; a prefix with ``..``, an
  absolute path or a link out of the folder is refused.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .images import to_uint8

log = logging.getLogger("atelier")

FORMATS = ("psd", "pptx", "zip", "png")
READABLE = (".psd", ".zip")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "atelier-layers"
EMU_PER_INCH = 914400
PX_PER_INCH = 96  # python-pptx / PowerPoint / LibreOffice: 1 px = 9525 EMU at 100 %
SLIDE_MIN_EMU, SLIDE_MAX_EMU = EMU_PER_INCH, 56 * EMU_PER_INCH  # PowerPoint's slide size limits (1 in … 56 in)
MAX_NAME_BYTES = 200  # a prefix part; the counter and suffix must still fit the 255-byte file name limit
MAX_ZIP_BYTES = 4 * 1024**3  # uncompressed, all members: refuse archives that would not fit a sane workstation
MAX_SIDE = 30000  # PSD's own limit; PSB (larger) is not read
MAX_STACK_BYTES = 8 * 1024**3  # layers × height × width × 4 bytes read into memory at once


@dataclass
class LayerStack:
    """N layers of one canvas: ``rgba`` (N, H, W, 4) uint8, straight alpha; ``names`` one per layer, bottom first."""

    rgba: np.ndarray
    names: list[str]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rgba.ndim != 4 or self.rgba.shape[-1] != 4 or self.rgba.dtype != np.uint8:
            raise InputError("layers as an (N, H, W, 4) uint8 array", f"{self.rgba.dtype} {tuple(self.rgba.shape)}",
                             "This is a bug in the caller; please report it.")
        if len(self.names) != len(self.rgba):
            raise InputError(f"{len(self.rgba)} layer names", f"{len(self.names)}", "Give one name per layer.")

    @property
    def count(self) -> int:
        return int(self.rgba.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgba.shape[2])

    @property
    def height(self) -> int:
        return int(self.rgba.shape[1])

    def bounds(self) -> list[tuple[int, int, int, int] | None]:
        return [alpha_bounds(layer[..., 3]) for layer in self.rgba]


# ------------------------------------------------------------------------------------------------ helpers


def make_stack(rgb: np.ndarray, alpha: np.ndarray, names: list[str]) -> LayerStack:
    """RGB (N, H, W, 3) and alpha (N, H, W) floats in [0, 1] → a LayerStack with colour cleared under alpha 0."""
    rgba = np.concatenate([to_uint8(rgb), to_uint8(alpha)[..., None]], axis=-1)
    rgba[rgba[..., 3] == 0, :3] = 0
    return LayerStack(np.ascontiguousarray(rgba), list(names))


def alpha_bounds(alpha: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels with alpha > 0, right/bottom exclusive; None when there are none."""
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def parse_names(text: str | None, count: int) -> tuple[list[str], list[str]]:
    """Comma-separated names for ``count`` layers: missing ones become "Layer i"; returns (names, notes)."""
    given = [n.strip() for n in (text or "").split(",")] if text and text.strip() else []
    notes = []
    if len(given) > count:
        notes.append(f"{len(given)} layer names for {count} layers: the last {len(given) - count} are not used")
        given = given[:count]
    names = [g if g else f"Layer {i + 1}" for i, g in enumerate(given)]
    names += [f"Layer {i + 1}" for i in range(len(names), count)]
    return [_clean_name(n) for n in names], notes


def _clean_name(name: str) -> str:
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:255] or "Layer"


def _require(module: str, package: str):
    """Import an optional writer/reader package, or say which one to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"the Python package '{package}'", "it is not installed",
                         f"Install it into ComfyUI's Python: python -m pip install {package}") from e


def _png_bytes(img: Image.Image, **info: str) -> bytes:
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    for k, v in info.items():
        meta.add_itxt(k, v)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta, compress_level=6)
    return buf.getvalue()


def check_canvas(width: int, height: int, count: int, name: str) -> None:
    """Refuse a canvas that cannot be a real picture or would not fit in memory (a hostile or broken file)."""
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise InputError(f"a canvas between 1 and {MAX_SIDE} pixels a side", f"{width}×{height} in '{name}'",
                         "The file is damaged or not a layer file; re-export it.")
    if count * width * height * 4 > MAX_STACK_BYTES:
        raise InputError(f"at most {MAX_STACK_BYTES // 1024**3} GiB of layers ({count} × {width}×{height} RGBA)",
                         f"'{name}'", "Export fewer or smaller layers, or split the file.")


def _crop(layer: np.ndarray, box: tuple[int, int, int, int] | None) -> Image.Image:
    if box is None:
        return Image.new("RGBA", (0, 0))
    left, top, right, bottom = box
    return Image.fromarray(np.ascontiguousarray(layer[top:bottom, left:right]), "RGBA")


# ------------------------------------------------------------------------------------------- output paths


def output_paths(output_dir: str | os.PathLike, prefix: str, names: list[str]) -> list[Path]:
    """Paths for one export, inside ``output_dir``, never overwriting: ``<prefix>_<counter:05>_<name>``.

    ``prefix`` may hold subfolders ("layers/poster"); ``names`` are the suffixes of the files of one export
    (".psd", or "01.png", "02.png" …). The counter is one more than the highest one in use for that prefix.
    """
    root = Path(output_dir).resolve()
    raw = (prefix or "").strip().replace("\\", "/")
    bad = None
    if not raw or "\x00" in raw:
        bad = "it is empty" if not raw else "it contains a NUL character"
    elif raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or raw.startswith("~"):
        bad = "it is an absolute path"
    elif any(part == ".." for part in raw.split("/")):
        bad = "it climbs out with '..'"
    elif raw.endswith("/"):
        bad = "it names a folder but no file name"
    elif any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in raw.split("/")):
        bad = f"a part of it is longer than {MAX_NAME_BYTES} bytes (file systems allow 255 per name)"
    if bad is None:
        folder = (root / raw).parent.resolve()
        if folder != root and root not in folder.parents:
            bad = "it leads outside the output folder (through a link)"
    if bad is not None:
        raise InputError("a filename_prefix inside ComfyUI's output folder (e.g. 'atelier_layers' or 'layers/poster')",
                         f"{prefix!r}: {bad}",
                         "Use a plain name, optionally with subfolders; files are always written under output/.")
    stem = Path(raw).name
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(stem)}_(\d{{5,}})_")
    used = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    counter = max(used, default=0) + 1
    return [folder / f"{stem}_{counter:05}_{name}" for name in names]


def _write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write to a fresh hidden file beside ``path``, then rename it: no half-written file, no link followed."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        with open(tmp, "xb") as f:  # exclusive create: fails rather than follow a link planted there
            write(f)
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


# -------------------------------------------------------------------------------------------------- PSD


def write_psd(stack: LayerStack, path: str | os.PathLike) -> Path:
    """A layered PSD: one pixel layer per layer (bottom first), named, opacity 100 %, cropped to its bounds."""
    PSDImage = _require("psd_tools", "psd-tools").PSDImage
    PixelLayer = _require("psd_tools.api.layers", "psd-tools").PixelLayer

    path = Path(path)
    psd = PSDImage.new("RGBA", (stack.width, stack.height), color=(0, 0, 0, 0))
    for layer, name, box in zip(stack.rgba, stack.names, stack.bounds(), strict=True):
        left, top = (box[0], box[1]) if box else (0, 0)
        pixel = PixelLayer.frompil(_crop(layer, box), psd, name=name, top=top, left=left)
        pixel.name = name  # sets the Unicode name block too (GIMP, Krita and Photoshop read that one)
        pixel.opacity = 255
        pixel.visible = True
    _write_atomic(path, psd.save)
    return path


def _open_psd(path: Path):
    PSDImage = _require("psd_tools", "psd-tools").PSDImage
    try:
        return PSDImage.open(path)
    except Exception as e:  # noqa: BLE001 - every parse failure is the same story for the user
        raise InputError("a PSD file that psd-tools can read", f"'{path.name}' ({type(e).__name__}: {e})"[:400],
                         "Re-save it as .psd from Photoshop, GIMP, Krita or Photopea, or pick another file.") from e


def read_psd(path: str | os.PathLike) -> LayerStack:
    """Every layer of a PSD (groups flattened, bottom first) on the document's canvas.

    Pixel layers are read as stored (lossless); other kinds (text, shapes, smart objects) and layers with a mask
    are rendered by psd-tools. Layer opacity below 100 % is folded into the alpha; hidden layers are kept (and
    noted) so that Combine Layers can choose. A PSD without layers gives its merged image as one layer.
    """
    path = Path(path)
    psd = _open_psd(path)
    width, height = psd.size
    rgba, names, notes = [], [], []
    try:
        layers = [layer for layer in psd.descendants() if not layer.is_group()]
        check_canvas(width, height, max(len(layers), 1), path.name)
        for layer in layers:
            canvas = np.zeros((height, width, 4), np.uint8)
            img, left, top, rendered = _layer_pixels(layer, psd)
            if img is not None:
                _paste(canvas, np.asarray(img.convert("RGBA")), left, top)
            if layer.opacity < 255 and not rendered:  # psd-tools' rendering applies the opacity itself
                canvas[..., 3] = (canvas[..., 3].astype(np.uint16) * layer.opacity + 127) // 255
            if not layer.visible:
                notes.append(f"layer '{layer.name}' is hidden in the PSD")
            canvas[canvas[..., 3] == 0, :3] = 0
            rgba.append(canvas)
            names.append(_clean_name(layer.name or f"Layer {len(names) + 1}"))
        if not rgba:
            merged = psd.topil() or psd.composite()
            canvas = np.asarray(merged.convert("RGBA")).copy()
            rgba, names = [canvas], ["Background"]
            notes.append("the PSD has no layers: its merged image is the one layer")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError("a PSD whose layers psd-tools can decode", f"'{path.name}' ({type(e).__name__}: {e})"[:400],
                         "Re-save it from an image editor (8 or 16 bit RGB), or pick another file.") from e
    return LayerStack(np.stack(rgba), names, notes)


def _layer_pixels(layer, psd) -> tuple[Image.Image | None, int, int, bool]:
    """(pixels, left, top, rendered): stored pixels where they are the layer, else psd-tools' rendering."""
    if layer.kind == "pixel" and not layer.has_mask():
        return layer.topil(), layer.left, layer.top, False
    img = layer.composite(viewport=psd.viewbox, force=True)  # on the canvas: mask and opacity applied
    return img, 0, 0, True


def _paste(canvas: np.ndarray, pixels: np.ndarray, left: int, top: int) -> None:
    """Put ``pixels`` at (left, top) on ``canvas``, clipped to it (layers may extend past the canvas)."""
    h, w = canvas.shape[:2]
    ph, pw = pixels.shape[:2]
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + pw, w), min(top + ph, h)
    if x1 <= x0 or y1 <= y0:
        return
    canvas[y0:y1, x0:x1] = pixels[y0 - top : y1 - top, x0 - left : x1 - left]


# ------------------------------------------------------------------------------------------------- PPTX


def slide_scale(width: int, height: int) -> int:
    """EMU per pixel for a slide of the canvas' shape: 96 dpi, scaled into PowerPoint's 1–56 inch limits."""
    emu = EMU_PER_INCH // PX_PER_INCH  # 9525
    longest, shortest = max(width, height), min(width, height)
    if longest * emu > SLIDE_MAX_EMU:
        emu = SLIDE_MAX_EMU // longest
    elif shortest * emu < SLIDE_MIN_EMU:
        emu = min(-(-SLIDE_MIN_EMU // shortest), SLIDE_MAX_EMU // longest)
    return max(int(emu), 1)


def write_pptx(stack: LayerStack, path: str | os.PathLike) -> Path:
    """One slide of the canvas' shape, one picture per layer (bottom first = back), placed at its bounds.

    Pictures are named after the layers (the selection pane shows them). An empty layer is a transparent 1×1
    picture in the top-left corner, so that every layer is there.
    """
    Presentation = _require("pptx", "python-pptx").Presentation
    Emu = _require("pptx.util", "python-pptx").Emu

    path = Path(path)
    if max(stack.width, stack.height) * SLIDE_MIN_EMU > min(stack.width, stack.height) * SLIDE_MAX_EMU:
        raise InputError(f"a canvas at most {SLIDE_MAX_EMU // SLIDE_MIN_EMU}:1 for a PPTX slide (PowerPoint's "
                         "1–56 inch limits)", f"{stack.width}×{stack.height}",
                         "Export this strip as psd, zip or png, or pad the layers to a wider canvas first.")
    emu = slide_scale(stack.width, stack.height)
    prs = Presentation()
    prs.slide_width, prs.slide_height = Emu(stack.width * emu), Emu(stack.height * emu)
    blank = next((lay for lay in prs.slide_layouts if not len(lay.placeholders)), prs.slide_layouts[6])
    slide = prs.slides.add_slide(blank)
    for layer, name, box in zip(stack.rgba, stack.names, stack.bounds(), strict=True):
        if box is None:
            img, (left, top, right, bottom) = Image.new("RGBA", (1, 1)), (0, 0, 1, 1)
        else:
            img, (left, top, right, bottom) = _crop(layer, box), box
        pic = slide.shapes.add_picture(io.BytesIO(_png_bytes(img)), Emu(left * emu), Emu(top * emu),
                                       Emu((right - left) * emu), Emu((bottom - top) * emu))
        pic.name = name
    _write_atomic(path, prs.save)
    return path


# -------------------------------------------------------------------------------------------- ZIP and PNG


def manifest(stack: LayerStack, files: list[str]) -> dict:
    return {
        "format": MANIFEST_FORMAT, "version": 1, "width": stack.width, "height": stack.height,
        "order": "bottom-to-top",
        "layers": [{"index": i + 1, "name": name, "file": f, "opacity": 1.0, "visible": True,
                    "bounds": None if box is None else dict(zip(("left", "top", "right", "bottom"), box, strict=True))}
                   for i, (name, f, box) in enumerate(zip(stack.names, files, stack.bounds(), strict=True))],
    }


def write_zip(stack: LayerStack, path: str | os.PathLike) -> Path:
    """layers/01.png … (full canvas, RGBA) + manifest.json (names, order, bounds)."""
    path = Path(path)
    files = [f"layers/{i + 1:02}.png" for i in range(stack.count)]

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(MANIFEST, json.dumps(manifest(stack, files), indent=2, ensure_ascii=False))
            for layer, name, member in zip(stack.rgba, stack.names, files, strict=True):
                z.writestr(member, _png_bytes(Image.fromarray(layer, "RGBA"), Title=name), zipfile.ZIP_STORED)

    _write_atomic(path, write)
    return path


def write_pngs(stack: LayerStack, paths: list[Path]) -> list[Path]:
    """One full-canvas RGBA PNG per layer (the layer's name in its Title text chunk)."""
    for layer, name, p in zip(stack.rgba, stack.names, paths, strict=True):
        data = _png_bytes(Image.fromarray(layer, "RGBA"), Title=name)
        _write_atomic(Path(p), lambda f, d=data: f.write(d))
    return list(paths)


def read_zip(path: str | os.PathLike) -> LayerStack:
    """A ZIP written by :func:`write_zip` (or any ZIP of PNGs: then in name order, named after the files)."""
    path = Path(path)
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError("a ZIP archive of layer PNGs", f"'{path.name}' ({type(e).__name__}: {e})",
                         "Pick a ZIP written by Export Layers, or a ZIP of PNG files.") from e
    with z:
        if sum(i.file_size for i in z.infolist()) > MAX_ZIP_BYTES:
            raise InputError(f"a ZIP of at most {MAX_ZIP_BYTES // 1024**3} GiB unpacked", f"'{path.name}'",
                             "Split the layers into smaller archives.")
        members = set(z.namelist())
        if MANIFEST in members:
            try:
                doc = json.loads(z.read(MANIFEST))
                entries = [(str(e["file"]), str(e.get("name") or f"Layer {i + 1}"), e.get("bounds"))
                           for i, e in enumerate(doc["layers"])]
                width, height = int(doc["width"]), int(doc["height"])
            except (ValueError, KeyError, TypeError) as e:
                raise InputError("a manifest.json with width, height and layers[{file, name}]",
                                 f"an unreadable manifest in '{path.name}' ({e})", "Re-export the layers.") from e
        else:
            pngs = sorted((m for m in members if m.lower().endswith(".png") and not m.endswith("/")),
                          key=_natural_key)
            entries = [(m, Path(m).stem, None) for m in pngs]
            width = height = None
        if not entries:
            raise InputError("a ZIP with at least one layer PNG", f"'{path.name}' without any",
                             "Pick a ZIP written by Export Layers, or a ZIP of PNG files.")
        if width is not None:
            check_canvas(width, height, len(entries), path.name)
        rgba, names = [], []
        for member, name, box in entries:
            if member not in members:
                raise InputError(f"the file '{member}' listed in the manifest", f"'{path.name}' without it",
                                 "Re-export the layers; the archive is incomplete.")
            try:
                img = Image.open(io.BytesIO(z.read(member)))
                img.load()
            except Exception as e:  # noqa: BLE001
                raise InputError("PNG layers Pillow can read", f"'{member}' in '{path.name}' ({e})",
                                 "Re-export the layers.") from e
            arr = np.asarray(img.convert("RGBA"))
            if width is None:
                width, height = arr.shape[1], arr.shape[0]
                check_canvas(width, height, len(entries), path.name)
            canvas = np.zeros((height, width, 4), np.uint8)
            left, top = _bounds(box, member, path.name) if isinstance(box, dict) and arr.shape[:2] != (
                height, width) else (0, 0)
            _paste(canvas, arr, left, top)
            canvas[canvas[..., 3] == 0, :3] = 0
            rgba.append(canvas)
            names.append(_clean_name(name))
    return LayerStack(np.stack(rgba), names)


def _bounds(box: dict, member: str, archive: str) -> tuple[int, int]:
    """(left, top) of a manifest entry's bounds, as whole pixels."""
    out = []
    for field in ("left", "top"):
        value = box.get(field, 0)
        try:
            number = float(value)
            if isinstance(value, bool) or not math.isfinite(number):
                raise ValueError(value)
        except (TypeError, ValueError):
            raise InputError(f"bounds.{field} of '{member}' in manifest.json as a whole number of pixels",
                             f"{json.dumps(value)[:40]} in '{archive}'",
                             "Re-export the layers, or fix the number in manifest.json.") from None
        out.append(int(number))
    return out[0], out[1]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------------------------- reading


def read_layers(path: str | os.PathLike) -> LayerStack:
    """A PSD or a ZIP, told apart by content (then by extension)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputError("a readable PSD or ZIP file", f"'{path.name}' ({e.strerror})", "Check the file.") from e
    if magic == b"8BPS":
        return read_psd(path)
    if magic[:2] == b"PK":
        return read_zip(path)
    if path.suffix.lower() == ".psd":
        return read_psd(path)  # says why psd-tools cannot read it
    raise InputError("a PSD (8BPS) or ZIP file", f"'{path.name}', which is neither",
                     "Pick a .psd or a .zip written by Export Layers.")


def find_in_folder(folder: str | os.PathLike, name: str) -> Path:
    """``name`` inside ``folder`` (subfolders allowed, nothing outside it), or an error listing what is there."""
    root = Path(folder).resolve()
    raw = (name or "").strip().replace("\\", "/")
    target = (root / raw).resolve() if raw and "\x00" not in raw else None
    if target is not None and (target == root or root not in target.parents):
        target = None
    if target is None or not target.is_file():
        found = list_layer_files(root)
        shown = ", ".join(found[:20]) + (" …" if len(found) > 20 else "") if found else "none"
        raise InputError(f"a .psd or .zip file in ComfyUI's input folder ({root})", f"{name!r} (files there: {shown})",
                         "Copy the file into ComfyUI's input folder and type its name (e.g. 'poster.psd').")
    return target


def list_layer_files(folder: str | os.PathLike) -> list[str]:
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in READABLE)
