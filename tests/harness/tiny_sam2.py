"""A random-weight SAM 2.1 tiny checkpoint for tests, built from the ``sam2`` package's own config.

It is the real ``sam2.1_hiera_t`` architecture (38.9 M parameters, 156 MB in fp32): the loader recognises a
model from its weights (Hiera embed dim and block count, 2.1-only keys), so a shrunken config would be, rightly,
refused. On two CPU cores one image embedding takes about 4 s and each prompt about 0.1 s.

* ``write_checkpoints(folder)``: ``<name>.pt`` as Meta ships them (``{"model": state_dict}``) and the same
  weights as ``<name>.safetensors``.
* ``reference_predictor(pt_path)``: the official path, ``sam2.build_sam.build_sam2(config, ckpt)`` +
  ``SAM2ImagePredictor``, with no Atelier code: what the parity tests compare with. ``reference(pt_path)`` keeps
  one per seed for the whole test process (every checkpoint written with one seed holds the same weights), with
  the image it last embedded, so the engine and server test modules pay for one reference embedding together.
* ``example_image()``: the 64×48 test picture both tiers segment.
* ``config_shapes(config_name)``: tensor names -> shapes of any of the package's configs, without allocating
  weights (for recognition tests).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("atelier.tests")

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
SEED = 0
HEIGHT, WIDTH = 48, 64
NAME = "sam2.1_hiera_tiny_random"

CONFIGS = {
    ("2.0", "tiny"): "configs/sam2/sam2_hiera_t.yaml",
    ("2.0", "small"): "configs/sam2/sam2_hiera_s.yaml",
    ("2.0", "base_plus"): "configs/sam2/sam2_hiera_b+.yaml",
    ("2.0", "large"): "configs/sam2/sam2_hiera_l.yaml",
    ("2.1", "tiny"): "configs/sam2.1/sam2.1_hiera_t.yaml",
    ("2.1", "small"): "configs/sam2.1/sam2.1_hiera_s.yaml",
    ("2.1", "base_plus"): "configs/sam2.1/sam2.1_hiera_b+.yaml",
    ("2.1", "large"): "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def _config_path(config_name: str) -> Path:
    import sam2

    return Path(sam2.__file__).parent / config_name


@lru_cache(maxsize=2)
def random_state_dict(seed: int = SEED, config_name: str = CONFIG) -> dict[str, torch.Tensor]:
    """The sam2 package's own initialisation of ``config_name`` under ``torch.manual_seed(seed)`` (cached: do not
    modify the returned tensors; copy the dict before changing its keys)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(_config_path(config_name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate(cfg.model, _recursive_=True)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_checkpoints(folder: str | os.PathLike, seed: int = SEED, name: str = NAME, config_name: str = CONFIG,
                      formats: tuple[str, ...] = ("pt", "safetensors")) -> dict[str, Path]:
    """``folder/<name>.pt`` ({"model": state_dict}, like Meta's files) and/or ``folder/<name>.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(seed, config_name)
    out = {}
    if "pt" in formats:
        out["pt"] = folder / f"{name}.pt"
        torch.save({"model": state}, out["pt"])
    if "safetensors" in formats:
        out["safetensors"] = folder / f"{name}.safetensors"
        save_file(state, str(out["safetensors"]))
    log.info("tiny SAM2 (%s, seed %d) written to %s", config_name, seed, folder)
    return out


def reference_predictor(pt_path: str | os.PathLike, config_name: str = CONFIG):
    """Meta's own loading path on the CPU: build_sam2 (hydra compose, _load_checkpoint) + SAM2ImagePredictor."""
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    return SAM2ImagePredictor(build_sam2(config_name, str(pt_path), device="cpu"))


def example_image() -> np.ndarray:
    """uint8 HxWx3: noise with a bright disc and a dark rectangle (something for SAM to find)."""
    rng = np.random.default_rng(3)
    img = rng.integers(60, 120, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    img[(yy - 22) ** 2 + (xx - 20) ** 2 < 120] = (240, 210, 30)
    img[26:44, 38:60] = (30, 40, 170)
    return img


class Reference:
    """Meta's predictor and the image it holds (set_image runs only for a new image)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self._key = None

    def set_image(self, rgb_uint8: np.ndarray) -> Reference:
        key = (rgb_uint8.shape, rgb_uint8.tobytes())
        if key != self._key:
            self.predictor.set_image(rgb_uint8.astype(np.float32) / 255.0)  # = LoadImage's float image
            self._key = key
        return self

    def mask(self, points=(), negative_points=(), box=None, multimask: bool = False) -> np.ndarray:
        """One object's HxW bool mask; with multimask the best-scoring of three."""
        coords = labels = None
        if len(points) or len(negative_points):
            coords = np.array(list(points) + list(negative_points), dtype=np.float32).reshape(-1, 2)
            labels = np.array([1] * len(points) + [0] * len(negative_points), dtype=np.int32)
        masks, scores, _ = self.predictor.predict(
            point_coords=coords, point_labels=labels, box=None if box is None else np.asarray(box, np.float32),
            multimask_output=multimask)
        return masks[int(np.argmax(scores))] if multimask else masks[0]


_REFERENCES: dict = {}


def reference(pt_path: str | os.PathLike, seed: int = SEED, config_name: str = CONFIG) -> Reference:
    """The process-wide reference for checkpoints written with ``seed`` (built from ``pt_path`` the first time)."""
    key = (seed, config_name)
    if key not in _REFERENCES:
        _REFERENCES[key] = Reference(reference_predictor(pt_path, config_name))
    return _REFERENCES[key]


@lru_cache(maxsize=16)
def config_shapes(config_name: str) -> dict[str, tuple[int, ...]]:
    """Names -> shapes of a config's state dict; parameters are built on the meta device (no memory, no init)."""
    from accelerate import init_empty_weights
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(_config_path(config_name))
    with init_empty_weights(include_buffers=False):
        model = instantiate(cfg.model, _recursive_=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
