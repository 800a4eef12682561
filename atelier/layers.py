"""Qwen-Image-Layered: split a picture into RGBA layers with diffusers' ``QwenImageLayeredPipeline``.

``load(handle)`` builds a :class:`LayeredModel` with the same memory machinery as FLUX Fill
(:mod:`atelier.pipelines`); ``split(model, image, ...)`` runs it and returns straight-alpha layers in ComfyUI's
conventions (IMAGE BHWC, MASK BHW with 1 = opaque), plus their flattened composite and the prompt used.

The pipeline's output convention, handled explicitly by :func:`take_layers`: the model denoises ``layers + 1``
frames, frame 0 being the whole picture (the "composite") and frames 1…N the layers, background first.
diffusers' pipeline drops frame 0 before decoding (its ``images[0]`` holds exactly ``layers`` RGBA images); other
implementations (DiffSynth, ComfyUI's latent route) return all ``layers + 1``. Both are accepted; the leading
composite is never returned as a layer.

Layer order everywhere in Atelier: layer 1 (index 0) is the bottom, the last is the top.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import folders, pipelines
from .errors import InputError, SettingError
from .images import check_image, check_mask, to_uint8
from .memory import Footprint, dtype_name, resident_vram
from .progress import NullProgress, Progress
from .stage import Stage, released, with_notes

log = logging.getLogger("atelier")

PIPELINE_CLASS = "QwenImageLayeredPipeline"
RESOLUTIONS = (640, 1024)
LANGUAGES = ("en", "zh")

# what a Qwen/Qwen-Image-Layered folder must hold ("a|b": either will do)
DIFFUSERS_PARTS = {
    "transformer": ("config.json", "*.safetensors"),
    "text_encoder": ("config.json", "*.safetensors"),
    "vae": ("config.json", "*.safetensors"),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json|vocab.json"),
    "processor": ("preprocessor_config.json|processor_config.json",),
    "scheduler": ("scheduler_config.json",),
}


# ------------------------------------------------------------------------------------------- spec, handle


@dataclass(frozen=True)
class LayeredSpec:
    """Everything that decides how a Qwen-Image-Layered pipeline is built; equal specs share one pipeline."""

    path: str
    quantization: str = "none"
    offload: str = "auto"
    vae_slicing: bool = False
    vae_tiling: bool = False
    first_block_cache: float = 0.0
    dtype: str = "auto"
    device: str = "cpu"


@dataclass(frozen=True)
class LayeredHandle:
    """What the loader node outputs (ATELIER_LAYERED): the spec, and what the loader resolved."""

    spec: LayeredSpec
    offload: str  # resolved mode: none / model / sequential
    dtype: str  # resolved: bf16 / fp16 / fp32


@dataclass
class LayeredModel(pipelines.LoadedPipeline):
    """A built QwenImageLayeredPipeline (see :class:`pipelines.LoadedPipeline`)."""

    @property
    def rgba(self) -> bool:
        """The VAE takes and gives RGBA (Qwen-Image-Layered's does); else RGB in and opaque layers out."""
        return int(getattr(self.pipe.vae.config, "input_channels", 3)) == 4


@dataclass
class SplitResult:
    layers: torch.Tensor  # (N, H, W, 3) straight colour
    alphas: torch.Tensor  # (N, H, W), 1 = opaque
    composite: torch.Tensor  # (1, H, W, 3): the layers flattened again
    prompt: str  # the prompt the layers were made with (the pipeline's own caption when none was given)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ files


def check_folder(folder: str | Path) -> None:
    """Raise a ModelFileError listing what is missing or wrong in a QwenImageLayeredPipeline folder."""
    folders.check_diffusers_folder(folder, PIPELINE_CLASS, DIFFUSERS_PARTS, "Qwen-Image-Layered",
                                   "Qwen/Qwen-Image-Layered")


def part_sizes(folder: str | Path) -> dict[str, int]:
    """Bytes of each part in 16-bit, read from safetensors headers (no tensor is loaded)."""
    return {"transformer": pipelines.folder_bytes16(folder, "transformer"),
            "text_encoders": pipelines.folder_bytes16(folder, "text_encoder"),
            "vae": pipelines.folder_bytes16(folder, "vae")}


def _pipeline_cls():
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASS, None)
    if cls is None:
        raise SettingError(f"diffusers with {PIPELINE_CLASS} (0.36 or newer)", f"diffusers {diffusers.__version__}",
                           "Update it in ComfyUI's Python: python -m pip install -U diffusers")
    return cls


# ------------------------------------------------------------------------------------------------- build


def resolve(spec: LayeredSpec, free_vram: int | None = None) -> tuple[str, torch.dtype, str, Footprint]:
    """Offload mode, dtype and why, plus the size estimate, without loading anything."""
    return pipelines.resolve(spec, part_sizes(spec.path), free_vram)


def make_handle(spec: LayeredSpec, free_vram: int | None = None) -> LayeredHandle:
    check_folder(spec.path)
    _pipeline_cls()
    mode, dtype, _, _ = resolve(spec, free_vram)
    return LayeredHandle(spec=spec, offload=mode, dtype=dtype_name(dtype))


def need_bytes(handle: LayeredHandle, free_vram: int | None = None) -> int:
    """VRAM to make room for before loading: the weights that stay on the GPU in the resolved offload mode."""
    _, _, _, fp = resolve(handle.spec, free_vram)
    return resident_vram(handle.offload, fp)


def load(handle: LayeredHandle) -> LayeredModel:
    """Build the pipeline ``handle`` describes, in its resolved offload mode."""
    spec = handle.spec
    check_folder(spec.path)
    pipeline_cls = _pipeline_cls()
    _, dtype, why, fp = resolve(spec)

    def build():
        from diffusers import QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration

        return pipelines.load_diffusers(pipeline_cls, spec.path, dtype, spec.quantization,
                                        diffusers_parts={"transformer": QwenImageTransformer2DModel},
                                        transformers_parts={"text_encoder": Qwen2_5_VLForConditionalGeneration})

    return pipelines.build(LayeredModel, spec, "Qwen-Image-Layered", spec.path, handle.offload, dtype, why, fp, build)


def summary(handle: LayeredHandle, model: LayeredModel | None = None) -> str:
    s = handle.spec
    return with_notes(f"{Path(s.path).name}: {handle.dtype}, quantization {s.quantization}, offload {handle.offload}"
                      f"{', VAE slicing' if s.vae_slicing else ''}{', VAE tiling' if s.vae_tiling else ''}"
                      f"{f', FirstBlockCache {s.first_block_cache:g}' if s.first_block_cache else ''}", model)


STAGE = Stage(group="layered", make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)


# ------------------------------------------------------------------------------------------------- split


def take_layers(frames: torch.Tensor, layers: int) -> tuple[torch.Tensor, list[str]]:
    """The ``layers`` layer frames of one picture's output, without the leading composite if it is there.

    ``frames``: (F, C, H, W). F == layers: diffusers' convention (composite already dropped); F == layers + 1:
    frame 0 is the composite of the picture and is dropped. Anything else is an error, not a guess.
    """
    n = int(frames.shape[0])
    if n == layers:
        return frames, []
    if n == layers + 1:
        return frames[1:], ["the pipeline returned the composite as its first image: dropped, layers kept"]
    raise SettingError(f"{layers} layers (or {layers} + the leading composite) from the pipeline",
                       f"{n} images", "Your diffusers version has another output convention; please report it.")


def split(model: LayeredModel, image: torch.Tensor, *, layers: int = 4, resolution: int = 640, steps: int = 50,
          cfg: float = 4.0, seed: int = 0, prompt: str = "", language: str = "en", cfg_normalize: bool = True,
          progress: Progress | None = None) -> SplitResult:
    """Decompose one picture (IMAGE BHWC, batch of 1) into ``layers`` RGBA layers at the pipeline's bucket size.

    Same call as the model card: true CFG with a blank negative prompt when ``cfg`` > 1, ``cfg_normalize``,
    ``resolution`` bucket 640 or 1024; an empty ``prompt`` lets the pipeline caption the picture itself in
    ``language``. ``seed`` seeds a CPU generator (like plain diffusers), and the caption's sampling too.
    """
    progress = progress or NullProgress()
    image = check_image(image)
    if image.shape[0] != 1:
        raise InputError("one picture", f"a batch of {image.shape[0]}",
                         "Split Layers decomposes one picture at a time: pick one with 'ImageFromBatch' "
                         "(batch_index) or queue each picture on its own.")
    if layers < 1:
        raise InputError("at least 1 layer", str(layers), "Set layers to 4 (the model's usual) or more.")
    if resolution not in RESOLUTIONS:
        raise InputError("resolution 640 or 1024", str(resolution), "640 is what the model was tuned for.")
    if language not in LANGUAGES:
        raise InputError("language en or zh", repr(language), "Pick one of the listed values.")
    pipe = model.pipe
    if pipe is None:
        raise released("Qwen-Image-Layered pipeline")
    least = min_steps(pipe)
    if steps < least:
        raise InputError(f"steps of at least {least}", str(steps),
                         "Set steps to 50 (the model's usual); with Qwen's scheduler (shift_terminal) a single step "
                         "divides by zero and gives an empty picture.")

    picture = _to_pil(image[0], rgba=model.rgba)
    captions: list[str] = []
    stop_check = getattr(progress, "check", None)

    def on_step(_pipe, _i, _t, kwargs):
        progress.step(1)  # ComfyUI's hook raises here when the user pressed Stop
        return kwargs

    text = prompt if prompt and prompt.strip() else ""
    generator = torch.Generator("cpu").manual_seed(int(seed) % (2**64))
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=devices), \
                _observe_caption(pipe, captions, stop_check):
            torch.manual_seed(int(seed) % (2**63))  # the caption's sampling (if the model samples) is seeded too
            out = pipe(
                image=picture, prompt=text, negative_prompt=" " if cfg > 1 else None, true_cfg_scale=cfg,
                layers=layers, num_inference_steps=steps, generator=generator, output_type="pt",
                resolution=resolution, cfg_normalize=cfg_normalize, use_en_prompt=(language == "en"),
                callback_on_step_end=on_step,
            ).images
    finally:
        # after Stop or an error too: offload hooks back to their resting state
        pipe.maybe_free_model_hooks()
    frames, notes = take_layers(out[0].float().cpu(), layers)
    rgb = frames[:, :3].permute(0, 2, 3, 1).clamp(0, 1).contiguous()
    if frames.shape[1] == 4:
        alpha = frames[:, 3].clamp(0, 1).contiguous()
    else:
        alpha = torch.ones(rgb.shape[:3])
        notes.append("the VAE gives RGB: every layer is opaque")
    used = captions[-1] if captions else text
    if captions:
        log.info("Atelier: Qwen-Image-Layered captioned the picture: %r", used[:300])
    for n in notes:
        log.info("Atelier: %s", n)
    comp, _ = flatten(rgb, alpha)
    return SplitResult(layers=rgb, alphas=alpha, composite=comp, prompt=used, notes=notes)


def min_steps(pipe) -> int:
    """Qwen's scheduler stretches its sigmas to ``shift_terminal``: with one step that is 0 / 0 (NaN layers)."""
    return 2 if getattr(pipe.scheduler.config, "shift_terminal", None) else 1


def _to_pil(image: torch.Tensor, rgba: bool):
    """One HWC float picture → the PIL image the pipeline preprocesses (8 bit, like a loaded file)."""
    from PIL import Image

    pil = Image.fromarray(to_uint8(image[..., :3]), "RGB")
    return pil.convert("RGBA") if rgba else pil


@contextlib.contextmanager
def _observe_caption(pipe, captions: list[str], stop_check):
    """While the pipeline runs: record the caption it writes, and let Stop end the captioning early.

    The pipeline captions with ``get_image_caption`` → ``text_encoder.generate(max_new_tokens=512)`` and offers no
    hook; instance attributes wrap both for the duration of one call (the class is untouched), and go away after.
    """
    original_caption = pipe.get_image_caption

    def get_image_caption(*args, **kwargs):
        caption = original_caption(*args, **kwargs)
        captions.append(caption)
        return caption

    pipe.get_image_caption = get_image_caption
    encoder = pipe.text_encoder
    wrapped_generate = False
    if stop_check is not None and encoder is not None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stop_check()  # raises when the user pressed Stop
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        original_generate = encoder.generate

        def generate(*args, **kwargs):
            criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
            criteria.append(_Stop())
            return original_generate(*args, stopping_criteria=criteria, **kwargs)

        encoder.generate = generate
        wrapped_generate = True
    try:
        yield
    finally:
        del pipe.get_image_caption
        if wrapped_generate:
            del encoder.generate


# ------------------------------------------------------------------------------------------ flatten, order


def flatten(layers: torch.Tensor, alphas: torch.Tensor, order: list[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack layers with "normal" blending, ``order`` (0-based, bottom first; default all) → (1,H,W,3), (1,H,W).

    Straight colour in and out: the IMAGE is the colour where the result shows (0 where it is fully
    transparent) and the MASK its opacity, so IMAGE + MASK is the RGBA result.
    """
    order = list(range(layers.shape[0])) if order is None else order
    h, w = layers.shape[1:3]
    color = torch.zeros(h, w, 3, dtype=torch.float32)
    cover = torch.zeros(h, w, dtype=torch.float32)
    for i in order:
        a = alphas[i].float()
        color = layers[i].float() * a[..., None] + color * (1 - a[..., None])
        cover = a + cover * (1 - a)
    straight = torch.where(cover[..., None] > 0, color / cover.clamp_min(1e-12)[..., None], torch.zeros_like(color))
    return straight.clamp(0, 1)[None], cover.clamp(0, 1)[None]


def parse_order(text: str | None, count: int) -> list[int]:
    """"3,1,2" → [2, 0, 1] (1-based, bottom first; ranges "2-4" too); empty = every layer in order.

    Layers not listed are left out. Each layer at most once.
    """
    if text is None or not text.strip():
        return list(range(count))
    out: list[int] = []
    for part in re.split(r"[,;\s]+", re.sub(r"\s*-\s*", "-", text.strip())):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                for end in (lo, hi):  # before the range is built: '1-99999999999' would fill the memory
                    if not 1 <= end <= count:
                        raise InputError(f"order: layer numbers from 1 to {count}", f"{end} in {text!r}",
                                         f"There are {count} layers; number them 1 (bottom) to {count} (top).")
                picks = list(range(lo, hi + 1)) if lo <= hi else list(range(lo, hi - 1, -1))
            else:
                picks = [int(part)]
        except ValueError:
            raise InputError("order as layer numbers like '3,1,2' or '1-3' (1 = bottom layer)", repr(text),
                             "Use numbers separated by commas.") from None
        for p in picks:
            if not 1 <= p <= count:
                raise InputError(f"order: layer numbers from 1 to {count}", f"{p} in {text!r}",
                                 f"There are {count} layers; number them 1 (bottom) to {count} (top).")
            if p - 1 in out:
                raise InputError("order: each layer at most once", f"{p} twice in {text!r}",
                                 "Remove the repeated number.")
            out.append(p - 1)
    if not out:
        raise InputError("order: at least one layer number", repr(text), "Leave order empty to use every layer.")
    return out


def match_alphas(layers: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """A MASK batch for an IMAGE batch of layers: the same length, or 1 (used for every layer)."""
    layers = check_image(layers, "layers")
    alphas = check_mask(alphas, "alphas")
    n, h, w = layers.shape[:3]
    if n == 0:
        raise InputError("at least one layer", "an empty batch", "Connect the layers output of Split or Load Layers.")
    if alphas.shape[1:] != (h, w):
        raise InputError(f"alphas of the layers' size ({w}×{h})", f"{alphas.shape[2]}×{alphas.shape[1]}",
                         "Connect the alphas that came with these layers, or resize them to match.")
    if alphas.shape[0] not in (1, n):
        raise InputError(f"an alpha batch of 1 or {n} (one per layer)", f"{alphas.shape[0]} alphas for {n} layers",
                         "Connect the alphas that came with these layers.")
    return alphas.expand(n, h, w) if alphas.shape[0] == 1 else alphas
