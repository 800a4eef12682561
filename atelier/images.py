"""Image and mask plumbing shared by every stage.

Conventions (ComfyUI's): IMAGE is float BHWC RGB in [0, 1]; MASK is float BHW in [0, 1] with 1 = selected.
The engine works on the same tensors; conversion to diffusers' BCHW happens here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError


def check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Return ``image`` as float BHWC with 3 channels, or raise a teaching error."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"{name} as an IMAGE tensor", type(image).__name__, "Connect an IMAGE output.")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise InputError(f"{name} of shape [batch, height, width, 3]", f"shape {list(image.shape)}",
                         "Connect an IMAGE output (RGB).")
    if image.shape[0] == 0:
        raise InputError(f"{name} with at least one picture", "an empty batch", "Connect a non-empty IMAGE.")
    return image[..., :3].float()


def check_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as float BHW in [0, 1]."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{name} as a MASK tensor", type(mask).__name__, "Connect a MASK output.")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise InputError(f"{name} of shape [batch, height, width]", f"shape {list(mask.shape)}",
                         "Connect a MASK output.")
    return mask.float().clamp(0.0, 1.0)


def match_mask_to_images(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Check sizes and broadcast a mask batch of 1 over the images; returns a mask batch of the image batch size."""
    b, h, w, _ = image.shape
    if mask.shape[1:] != (h, w):
        raise InputError(
            f"a mask of the image's size ({w}×{h})", f"a mask of {mask.shape[2]}×{mask.shape[1]}",
            "Connect the mask made for this image, or resize it first (e.g. core's 'Upscale Image' on the image, "
            "or a mask resize node) so both have the same width and height.")
    if mask.shape[0] not in (1, b):
        raise InputError(f"a mask batch of 1 or {b} (one per image)", f"a mask batch of {mask.shape[0]}",
                         "Use one mask for every image, or exactly one mask per image.")
    return mask.expand(b, h, w) if mask.shape[0] == 1 else mask


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (a tensor or an array of any shape) → uint8, rounded half to even in float64 and clipped,
    so the values of an 8-bit file loaded as ``x / 255`` (ComfyUI's LoadImage) come back exactly."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def to_bchw(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 3, 1, 2).contiguous()


def to_bhwc(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class Padding:
    """How an image was padded at its right and bottom edges to reach a size multiple."""

    height: int
    width: int
    pad_bottom: int
    pad_right: int

    def crop(self, t: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
        if channels_last:
            return t[:, : self.height, : self.width, :]
        return t[..., : self.height, : self.width]


def pad_to_multiple(image: torch.Tensor, mask: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor, Padding]:
    """Pad BHWC image (edge replicate) and BHW mask (zeros: never repaint padding) to a multiple of ``multiple``."""
    _, h, w, _ = image.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    pad = Padding(h, w, ph, pw)
    if ph == 0 and pw == 0:
        return image, mask, pad
    img = torch.nn.functional.pad(to_bchw(image), (0, pw, 0, ph), mode="replicate")
    msk = torch.nn.functional.pad(mask, (0, pw, 0, ph), mode="constant", value=0.0)
    return to_bhwc(img), msk, pad


def composite(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Blend BHWC ``generated`` into ``original`` where BHW ``mask`` is 1; where it is 0 the original stays exact."""
    m = mask.to(original.dtype).unsqueeze(-1)
    out = original * (1.0 - m) + generated.to(original.dtype) * m
    # bit-exact outside the mask (0*x + y*1 is exact in IEEE, but be explicit and cheap)
    return torch.where(m == 0, original, out)
