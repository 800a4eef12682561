"""FLUX Fill try-on: the garment picture beside the person, FLUX.1 Fill repaints the person's masked area while it
sees the garment (logos and text survive because they are pixels in the same picture, not only an embedding).

:func:`compose` crops the person around the mask box (with a margin), scales the crop to the working height, puts
the garment (same height) on its left and the mask on the person half; :func:`run` fills that picture with
:func:`atelier.fill.inpaint` (the pipe's LoRAs applied) and stitches the person half back through the mask, so every
pixel outside the mask is exactly the input's. Optional **Redux** (FLUX.1 Redux + SigLIP): the garment's image
embedding is appended to the prompt's, as diffusers' ``FluxPriorReduxPipeline`` does (it runs here, with the Fill
pipe's own text encoders).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import fill
from .errors import InputError, ModelFileError
from .flux_files import config_dir, read_safetensors_header
from .images import check_image, check_mask, match_mask_to_images
from .memory import resolve_dtype
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

log = logging.getLogger("atelier")


# --------------------------------------------------------------------------------------------- composing


@dataclass(frozen=True)
class Layout:
    """Where the person crop sits in the person picture and in the composed picture."""

    top: int
    left: int
    height: int  # crop size in the person picture
    width: int
    scale_h: int  # crop size once scaled into the composed picture
    scale_w: int
    garment_w: int  # width of the garment half


def mask_box(mask: torch.Tensor, margin: float) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the mask's nonzero box grown by ``margin`` × its size, inside the picture."""
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if ys.numel() == 0:
        raise InputError("a mask that marks where the garment goes (1 = repaint)", "an empty mask",
                         "Connect Garment Mask's output, or paint the clothes' area in the mask editor.")
    h, w = mask.shape
    t, b, left, r = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    mh, mw = int(round((b - t) * margin)), int(round((r - left) * margin))
    return max(0, t - mh), max(0, left - mw), min(h, b + mh), min(w, r + mw)


def _resize(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """BHWC or BHW tensor to h×w (bicubic with antialias for pictures, bilinear for masks)."""
    if t.shape[1] == h and t.shape[2] == w:
        return t
    if t.ndim == 3:
        return torch.nn.functional.interpolate(t[:, None], size=(h, w), mode="bilinear", antialias=True)[:, 0].clamp(0, 1)
    x = torch.nn.functional.interpolate(t.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", antialias=True)
    return x.permute(0, 2, 3, 1).clamp(0, 1)


def compose(person: torch.Tensor, garment: torch.Tensor, mask: torch.Tensor, height: int = 1024,
            margin: float = 0.15, multiple: int = 16) -> tuple[torch.Tensor, torch.Tensor, Layout]:
    """[garment | person crop] (1×H×W×3), its mask (1×H×W, zero on the garment half) and the layout. One person
    (1×h×w×3), one garment (1×gh×gw×3), one mask (1×h×w). ``height``: the composed picture's height (rounded to
    ``multiple``); both halves get widths that are multiples of ``multiple``."""
    top, left, bottom, right = mask_box(mask[0], margin)
    ch, cw = bottom - top, right - left
    hh = max(multiple, int(round(height / multiple)) * multiple)
    sw = max(multiple, int(round(cw * hh / ch / multiple)) * multiple)
    gw = max(multiple, int(round(garment.shape[2] * hh / garment.shape[1] / multiple)) * multiple)
    crop = _resize(person[:, top:bottom, left:right], hh, sw)
    crop_mask = (_resize(mask[:, top:bottom, left:right], hh, sw) > 0.5).float()
    picture = torch.cat([_resize(garment, hh, gw), crop], dim=2)
    full_mask = torch.cat([torch.zeros(1, hh, gw), crop_mask], dim=2)
    return picture, full_mask, Layout(top, left, ch, cw, hh, sw, gw)


def stitch(person: torch.Tensor, mask: torch.Tensor, filled: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The person picture with the filled person half pasted back through ``mask`` (outside it: exact)."""
    half = filled[:, :, layout.garment_w:layout.garment_w + layout.scale_w]
    back = _resize(half, layout.height, layout.width)
    out = person.clone()
    region = out[:, layout.top:layout.top + layout.height, layout.left:layout.left + layout.width]
    m = mask[:, layout.top:layout.top + layout.height, layout.left:layout.left + layout.width].unsqueeze(-1)
    blended = region * (1 - m) + back * m
    out[:, layout.top:layout.top + layout.height, layout.left:layout.left + layout.width] = torch.where(
        m == 0, region, blended)
    return out


def _garment(garment: torch.Tensor) -> torch.Tensor:
    from .tryon import flatten_alpha

    return flatten_alpha(garment)


def run(model: fill.FluxFillModel, person: torch.Tensor, garment: torch.Tensor, mask: torch.Tensor, prompt: str, *,
        steps: int = 28, guidance: float = 30.0, seed: int = 0, redux: "ReduxModel | None" = None,
        height: int = 1024, margin: float = 0.15, loras: tuple = (), progress: Progress | None = None) -> torch.Tensor:
    """Dress each person in the garment inside the mask (see the module docstring). Person ``i`` uses ``seed + i``."""
    progress = progress or NullProgress()
    person = check_image(person, "person")
    mask = match_mask_to_images(person, check_mask(mask))
    garment = _garment(garment)
    if garment.shape[0] not in (1, person.shape[0]):
        raise InputError(f"one garment picture or one per person ({person.shape[0]})", f"{garment.shape[0]}",
                         "Connect a single garment picture.")
    out = []
    for i in range(person.shape[0]):
        g = garment[min(i, garment.shape[0] - 1)][None]
        picture, pmask, layout = compose(person[i:i + 1], g, mask[i:i + 1], height, margin, model.multiple)
        embeds = redux_embeds(redux, model, g, prompt) if redux is not None else {}
        filled = fill.inpaint(model, picture, pmask, prompt, steps=steps, guidance=guidance, seed=seed + i,
                              composite_back=False, progress=progress, loras=loras, **embeds)
        out.append(stitch(person[i:i + 1], mask[i:i + 1], filled, layout))
    return torch.cat(out, dim=0)


# --------------------------------------------------------------------------------------------------- Redux


@dataclass(frozen=True)
class ReduxSpec:
    redux: str  # flux1-redux-dev.safetensors (models/style_models)
    siglip: str  # sigclip_vision_patch14_384.safetensors (models/clip_vision)
    dtype: str = "auto"
    device: str = "cpu"


@dataclass(frozen=True)
class ReduxHandle:
    """ATELIER_REDUX: the spec and the resolved dtype."""

    spec: ReduxSpec
    dtype: str


@dataclass
class ReduxModel:
    image_encoder: torch.nn.Module | None
    feature_extractor: object
    image_embedder: torch.nn.Module | None
    device: torch.device
    resident_bytes: int
    notes: list

    def close(self) -> None:
        self.image_encoder = self.image_embedder = None


_SIGLIP_HEADS = {1152: 16, 768: 12, 1024: 16}


def siglip_config(path: str) -> dict:
    h = read_safetensors_header(path)
    p = "vision_model."
    if p + "embeddings.patch_embedding.weight" not in h:
        raise ModelFileError("a SigLIP vision encoder in Hugging Face key names (vision_model.embeddings …)",
                             f"'{Path(path).name}'", "Use sigclip_vision_patch14_384.safetensors in models/clip_vision "
                                                     "(the encoder FLUX Redux reads).")
    hidden, _, patch, _ = h[p + "embeddings.patch_embedding.weight"]["shape"]
    positions = h[p + "embeddings.position_embedding.weight"]["shape"][0]
    layers = {int(m.group(1)) for k in h if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    return {"model_type": "siglip_vision_model", "architectures": ["SiglipVisionModel"], "hidden_size": hidden,
            "patch_size": patch, "image_size": int(round(positions ** 0.5)) * patch,
            "intermediate_size": h[p + "encoder.layers.0.mlp.fc1.weight"]["shape"][0],
            "num_hidden_layers": max(layers) + 1, "num_attention_heads": _SIGLIP_HEADS.get(hidden, max(1, hidden // 64)),
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": p + "head.probe" in h}


def redux_config(path: str) -> dict:
    h = read_safetensors_header(path)
    if "redux_up.weight" not in h or "redux_down.weight" not in h:
        raise ModelFileError("a FLUX.1 Redux file (redux_up / redux_down weights)", f"'{Path(path).name}'",
                             "Use flux1-redux-dev.safetensors in models/style_models.")
    return {"redux_dim": h["redux_up.weight"]["shape"][1], "txt_in_features": h["redux_down.weight"]["shape"][0]}


def make_redux_handle(spec: ReduxSpec, free_vram: int | None = None) -> ReduxHandle:
    for path, what in ((spec.redux, "FLUX.1 Redux file"), (spec.siglip, "SigLIP vision file")):
        if not path or not os.path.isfile(path):
            raise ModelFileError(f"the {what}", f"'{path}'", "Put it in its folder (see README) and refresh (R).")
    cfg, red = siglip_config(spec.siglip), redux_config(spec.redux)
    if cfg["hidden_size"] != red["redux_dim"]:
        raise ModelFileError(f"a SigLIP encoder of width {red['redux_dim']} (what the Redux file reads)",
                             f"'{Path(spec.siglip).name}' of width {cfg['hidden_size']}",
                             "Pick sigclip_vision_patch14_384.safetensors.")
    return ReduxHandle(spec=spec, dtype={torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[
        resolve_dtype(spec.dtype, spec.device)])


def redux_need_bytes(handle: ReduxHandle, free_vram: int | None = None) -> int:
    from .pipelines import bytes16

    return bytes16([Path(handle.spec.redux), Path(handle.spec.siglip)])


def load_redux(handle: ReduxHandle) -> ReduxModel:
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from safetensors.torch import load_file
    from transformers import SiglipImageProcessor, SiglipVisionModel

    spec = handle.spec
    dtype = resolve_dtype(handle.dtype, spec.device)
    cfg = siglip_config(spec.siglip)
    encoder, info = SiglipVisionModel.from_pretrained(
        str(config_dir("siglip", spec.siglip, cfg, weights=spec.siglip)), dtype=dtype, local_files_only=True,
        output_loading_info=True)
    if info.get("missing_keys"):
        raise ModelFileError("a complete SigLIP vision file", f"'{Path(spec.siglip).name}' without "
                             f"{len(info['missing_keys'])} weights (e.g. {sorted(info['missing_keys'])[0]})",
                             "Use sigclip_vision_patch14_384.safetensors as downloaded.")
    embedder = ReduxImageEncoder(**redux_config(spec.redux))
    embedder.load_state_dict(load_file(spec.redux))
    device = torch.device(spec.device)
    encoder.to(device)
    embedder.to(device=device, dtype=dtype)
    processor = SiglipImageProcessor(size={"height": cfg["image_size"], "width": cfg["image_size"]})
    return ReduxModel(encoder.eval(), processor, embedder.eval(), device, redux_need_bytes(handle), [])


def redux_summary(handle: ReduxHandle, model: ReduxModel | None = None) -> str:
    return with_notes(f"{Path(handle.spec.redux).name} + {Path(handle.spec.siglip).name}: {handle.dtype}", model)


STAGE = Stage(group="redux", make_handle=make_redux_handle, need_bytes=redux_need_bytes, load=load_redux,
              summary=redux_summary)


def redux_embeds(redux: ReduxModel, model: fill.FluxFillModel, garment: torch.Tensor, prompt: str) -> dict:
    """{prompt_embeds, pooled_prompt_embeds}: diffusers' FluxPriorReduxPipeline on the garment, with the Fill
    pipe's text encoders (the prompt is kept, the image tokens appended)."""
    from diffusers import FluxPriorReduxPipeline

    from .tryon import _pil

    if redux.image_encoder is None:
        raise released("FLUX Redux model")
    pipe = model.pipe
    prior = FluxPriorReduxPipeline(image_encoder=redux.image_encoder, feature_extractor=redux.feature_extractor,
                                   image_embedder=redux.image_embedder, text_encoder=pipe.text_encoder,
                                   tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                                   tokenizer_2=pipe.tokenizer_2)
    with torch.inference_mode():
        out = prior(image=_pil(garment[0]), prompt=prompt)
    return {"prompt_embeds": out.prompt_embeds, "pooled_prompt_embeds": out.pooled_prompt_embeds}
