"""FastComposer (Xiao et al., arXiv 2305.10431): several subjects in one picture from one photo each, no tuning.

The released checkpoint is one ``pytorch_model.bin`` (or the same keys in ``.safetensors``) holding a whole Stable
Diffusion 1.5 (``unet.``, ``vae.``, ``text_encoder.``), a CLIP ViT-L/14 image encoder with its visual projection
(``image_encoder.``) and the fusion MLP (``postfuse_module.``). Atelier builds every part offline from the small
configs in ``atelier/configs/fastcomposer`` and ComfyUI's CLIP tokenizer, checks the keys first (a checkpoint of
another model gets one error listing what is missing and unexpected, by prefix), and runs diffusers' own
``StableDiffusionPipeline``. Only two things are FastComposer's:

* **the prompt**: each ``<subject>`` marker gives the subject picture of the same rank to the word just before it.
  The text encoder's *output* at that word's last token is replaced by the fusion MLP of [that embedding ; the
  picture's CLIP image embedding] (:class:`PostfuseModule`);
* **delayed subject conditioning**: the first ``alpha`` share of the steps denoise on the prompt without markers
  (the layout), the rest on the fused prompt (the identities). The switch is a ``callback_on_step_end`` that hands
  the pipeline other ``prompt_embeds``: the pipeline is not forked.

``alpha`` here is the share of steps on text alone (1 = never fuse: plain SD1.5; 0 = fused from the first step; the
paper's 10 of 50 steps is 0.2). The official demo's ``alpha_`` counts the other way (its 0.7 is our 0.3).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import pipelines, weights
from .errors import InputError, ModelFileError
from .images import check_image, check_mask
from .memory import Footprint, dtype_name, footprint, plan_offload, resident_vram, resolve_dtype
from .progress import NullProgress, Progress
from .weights import file_stamp
from .stage import Stage, released, with_notes

log = logging.getLogger("atelier")

MARKER = "<subject>"
MAX_TOKENS = 77  # CLIP's context, start and end tokens included
MIN_SUBJECT_SIDE = 16  # pixels: below that a picture carries no identity for a 224-pixel encoder
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EXTENSIONS = (".bin", ".safetensors")
CONFIG_DIR = Path(__file__).parent / "configs" / "fastcomposer"
PARTS = ("unet", "vae", "text_encoder", "image_encoder", "postfuse_module")
BASE_PARTS = ("unet", "vae", "text_encoder")  # what an SD1.5 base checkpoint can supply
SOURCE = "the released pytorch_model.bin of mit-han-lab/fastcomposer (Hugging Face hub, MIT licence)"


# ------------------------------------------------------------------------------------------- spec, handle


@dataclass(frozen=True)
class FastComposerSpec:
    """Everything that decides how FastComposer is built; equal specs share one loaded model."""

    path: str  # the FastComposer checkpoint (.bin or .safetensors)
    tokenizer: str  # a CLIP tokenizer folder (ComfyUI ships comfy/sd1_tokenizer)
    base: str | None = None  # an SD1.5 checkpoint (original LDM layout, .safetensors) for parts the file lacks
    stamp: tuple = ()  # size and mtime of the files: replacing one under the same name rebuilds
    offload: str = "auto"
    attention_slicing: bool = False
    vae_slicing: bool = False
    dtype: str = "auto"
    device: str = "cpu"


@dataclass(frozen=True)
class FastComposerHandle:
    """What the loader outputs (ATELIER_FASTCOMPOSER): the spec and what was resolved from it."""

    spec: FastComposerSpec
    offload: str  # none / model / sequential
    dtype: str  # bf16 / fp16 / fp32
    from_base: tuple[str, ...] = ()  # parts taken from the base checkpoint


def make_spec(path: str, tokenizer: str, base: str | None = None, **settings: Any) -> FastComposerSpec:
    """A spec whose stamp follows the files (a checkpoint replaced under the same name rebuilds the model)."""
    files = [path, config_sidecar(path)] + ([base] if base else [])
    return FastComposerSpec(path=str(path), tokenizer=str(tokenizer), base=str(base) if base else None,
                            stamp=tuple(file_stamp(f) for f in files), **settings)


# ------------------------------------------------------------------------------------------------ configs


def config_sidecar(path: str | Path) -> Path:
    """``<stem>.config.json`` beside a checkpoint: per-part config overrides for variants of other sizes."""
    p = Path(path)
    return p.with_name(p.name[: -len(p.suffix)] + ".config.json" if p.suffix else p.name + ".config.json")


def part_configs(path: str | Path) -> dict[str, dict]:
    """The shipped SD1.5 / ViT-L/14 configs, each overridden by the checkpoint's sidecar where it has one."""
    configs = {}
    for part in ("unet", "vae", "text_encoder", "image_encoder", "scheduler"):
        with open(CONFIG_DIR / f"{part}.json", encoding="utf-8") as f:
            configs[part] = json.load(f)
    side = config_sidecar(path)
    if side.is_file():
        try:
            extra = json.loads(side.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ModelFileError(f"a JSON object in '{side.name}'", f"unreadable JSON ({e})",
                                 "Fix or delete that file (it overrides the part configs).") from e
        for part, values in extra.items():
            if part not in configs or not isinstance(values, dict):
                raise ModelFileError(f"sections {', '.join(configs)} in '{side.name}'", repr(part),
                                     "Remove the unknown section.")
            configs[part] = {**configs[part], **values}
    return configs


def _build_parts(configs: dict[str, dict], empty: bool = True) -> dict[str, torch.nn.Module]:
    """Every part as a module from its config; ``empty``: weights on the meta device (nothing allocated)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    def clean(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}

    ctx = init_empty_weights(include_buffers=False) if empty else contextlib.nullcontext()
    with ctx:
        text_cfg = CLIPTextConfig(**clean(configs["text_encoder"]))
        vision_cfg = CLIPVisionConfig(**clean(configs["image_encoder"]))
        parts = {
            "unet": UNet2DConditionModel.from_config(clean(configs["unet"])),
            "vae": AutoencoderKL.from_config(clean(configs["vae"])),
            "text_encoder": CLIPTextModel(text_cfg),
            "image_encoder": CLIPVisionModelWithProjection(vision_cfg),
            "postfuse_module": PostfuseModule(text_cfg.hidden_size),
        }
    if vision_cfg.projection_dim != text_cfg.hidden_size:
        raise ModelFileError("an image projection as wide as the text embeddings",
                             f"{vision_cfg.projection_dim} vs {text_cfg.hidden_size}",
                             "Check the checkpoint's .config.json sidecar.")
    return parts


# ------------------------------------------------------------------------------------------ fusion MLP


class _MLP(torch.nn.Module):
    """LayerNorm → Linear → GELU → Linear, optionally plus its input (the checkpoint's ``mlpN.*`` keys)."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int, residual: bool):
        super().__init__()
        self.layernorm = torch.nn.LayerNorm(dim_in)
        self.fc1 = torch.nn.Linear(dim_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim_out)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class PostfuseModule(torch.nn.Module):
    """FastComposer's fusion of a word's text embedding t (D) with a subject's image embedding s (D):

        h = MLP1([t ; s]) + t          (MLP1: 2D → D, no inner residual)
        f = LayerNorm(MLP2(h) + h)     (MLP2: D → D)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mlp1 = _MLP(2 * dim, dim, dim, residual=False)
        self.mlp2 = _MLP(dim, dim, dim, residual=True)
        self.layer_norm = torch.nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
        h = self.mlp1(torch.cat([text, subject.to(text.dtype)], dim=-1)) + text
        return self.layer_norm(self.mlp2(h))


# --------------------------------------------------------------------------------------------- the files


def _read_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key → shape of a checkpoint, without reading the tensors (safetensors header; .bin memory-mapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from .weights import read_safetensors_header

        return {k: tuple(v["shape"]) for k, v in read_safetensors_header(path).items()}
    return {k: tuple(v.shape) for k, v in _load_state_dict(path).items()}


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"the checkpoint '{path.name}'", "no such file",
                             "Put it in models/fastcomposer, refresh (R) and pick it.")
    if path.suffix not in (".bin", ".safetensors"):
        raise ModelFileError("a .bin or .safetensors checkpoint", f"'{path.name}'",
                             "Use FastComposer's pytorch_model.bin as released, or a .safetensors of the same keys.")
    # weights_only / safetensors; a damaged or foreign file is a ModelFileError naming it (not a pickle IndexError)
    return weights.read_state_dict(path, mmap=True, what=f"a FastComposer checkpoint in '{path.name}'",
                                   fix=f"The file is damaged or not FastComposer's; use the checkpoint from {SOURCE}.")


_VAE_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
IGNORED_SUFFIXES = ("position_ids",)  # buffers older transformers saved; rebuilt by the model


def _map_key(part: str, key: str, expected: set[str]) -> str | None:
    """A checkpoint key (without its part prefix) → the module's key, or None when it has no place."""
    if key in expected:
        return key
    if part == "text_encoder":  # FastComposer's text encoder saved without transformers' `text_model.` level
        if "text_model." + key in expected:
            return "text_model." + key
        if key.startswith("text_model.") and key[len("text_model."):] in expected:
            return key[len("text_model."):]
    if part == "vae":  # diffusers < 0.15 named the VAE's attention query/key/value/proj_attn
        m = re.match(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            new = f"{m.group(1)}{_VAE_OLD_ATTENTION[m.group(2)]}.{m.group(3)}"
            if new in expected:
                return new
    return None


def _by_prefix(keys: list[str], depth: int, limit: int = 8) -> str:
    """``a.b.* (12 keys), c.* (3 keys)``: keys grouped by their first ``depth`` name parts."""
    groups: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
        groups[g] = groups.get(g, 0) + 1
    items = sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{g} ({n} key{'s' if n > 1 else ''})" for g, n in items[:limit])
    return text + (f" and {len(items) - limit} more groups" if len(items) > limit else "")


@dataclass
class KeyPlan:
    """Which checkpoint key goes where, part by part; what is missing, unexpected or taken from the base."""

    mapping: dict[str, dict[str, str]]  # part → {checkpoint key: module key}
    from_base: tuple[str, ...]
    missing: list[str]
    unexpected: list[str]
    ignored: int


def plan_keys(keys: dict[str, tuple[int, ...]], expected: dict[str, dict[str, tuple[int, ...]]],
              base_available: bool) -> KeyPlan:
    """Match a FastComposer checkpoint's keys with the parts' modules (``expected``: part → key → shape)."""
    mapping: dict[str, dict[str, str]] = {p: {} for p in PARTS}
    unexpected, ignored = [], 0
    for key, shape in keys.items():
        part, _, rest = key.partition(".")
        if part not in PARTS or not rest:
            unexpected.append(key)
            continue
        target = _map_key(part, rest, set(expected[part]))
        if target is None:
            if rest.endswith(IGNORED_SUFFIXES):
                ignored += 1
            else:
                unexpected.append(key)
        elif tuple(expected[part][target]) != tuple(shape):
            unexpected.append(f"{key} (shape {list(shape)}, the model has {list(expected[part][target])})")
        else:
            mapping[part][key] = target
    missing, from_base = [], []
    for part in PARTS:
        got = set(mapping[part].values())
        if not got and part in BASE_PARTS and base_available:
            from_base.append(part)
            continue
        missing += [f"{part}.{k}" for k in expected[part] if k not in got]
    return KeyPlan(mapping, tuple(from_base), missing, unexpected, ignored)


def check_plan(plan: KeyPlan, path: str | Path, base: str | None) -> None:
    """The one error for a checkpoint that is not FastComposer's (or lacks parts and has no base)."""
    if not plan.missing and not plan.unexpected:
        return
    name = Path(path).name
    received = []
    if plan.missing:
        received.append(f"missing {len(plan.missing)} keys: {_by_prefix(plan.missing, 2)}")
    if plan.unexpected:
        received.append(f"unexpected {len(plan.unexpected)} keys: {_by_prefix(plan.unexpected, 1)}")
    lacking = [p for p in BASE_PARTS if any(m.startswith(p + ".") for m in plan.missing)
               and not any(m.startswith(p + ".") for m in plan.mapping[p].values())]
    fix = f"Use FastComposer's checkpoint as released ({SOURCE})."
    if lacking and not base and not plan.unexpected:
        fix = (f"This file has no {', '.join(lacking)}: pick an SD1.5 checkpoint (models/checkpoints) as 'base', "
               f"or use the full checkpoint ({SOURCE}).")
    raise ModelFileError(
        f"a FastComposer checkpoint (keys unet.*, vae.*, text_encoder.*, image_encoder.*, postfuse_module.*)",
        f"'{name}' with {'; '.join(received)}", fix)


def _expected_keys(configs: dict[str, dict]) -> dict[str, dict[str, tuple[int, ...]]]:
    parts = _build_parts(configs, empty=True)
    return {p: {k: tuple(v.shape) for k, v in m.state_dict().items()} for p, m in parts.items()}


_EXPECTED_CACHE: dict[str, dict] = {}


def expected_keys(configs: dict[str, dict]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Part → key → shape of the modules the configs describe (built on the meta device once per config)."""
    sig = json.dumps(configs, sort_keys=True)
    if sig not in _EXPECTED_CACHE:
        _EXPECTED_CACHE[sig] = _expected_keys(configs)
    return _EXPECTED_CACHE[sig]


def _base_state_dicts(base: str, configs: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
    """An SD1.5 checkpoint in the original (LDM) layout → diffusers-named unet / vae / text_encoder state dicts."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    if not str(base).endswith(".safetensors"):
        raise ModelFileError("an SD1.5 .safetensors checkpoint as base", f"'{Path(base).name}'",
                             "Pick v1-5-pruned-emaonly.safetensors (or another SD1.5 .safetensors) in models/checkpoints.")
    sd = load_file(str(base))
    if not any(k.startswith("model.diffusion_model.") for k in sd):
        raise ModelFileError("an SD1.5 checkpoint (keys model.diffusion_model.*, first_stage_model.*, "
                             "cond_stage_model.transformer.*)", f"'{Path(base).name}' with {_by_prefix(list(sd), 1)}",
                             "Pick an SD1.5 checkpoint as base.")
    clean = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    out = {"unet": sfu.convert_ldm_unet_checkpoint(sd, clean),
           "vae": sfu.convert_ldm_vae_checkpoint(sd, {k: v for k, v in configs["vae"].items()
                                                      if not k.startswith("_")}),
           "text_encoder": sfu.convert_ldm_clip_checkpoint(sd)}
    return out


# ------------------------------------------------------------------------------------------------- stage


def resolve(spec: FastComposerSpec, free_vram: int | None = None) -> tuple[str, torch.dtype, str, Footprint]:
    dtype = resolve_dtype(spec.dtype, spec.device)
    exp = expected_keys(part_configs(spec.path))

    def size(*parts: str) -> int:
        n = 0
        for p in parts:
            for shape in exp[p].values():
                c = 1
                for d in shape:
                    c *= d
                n += c
        return 2 * n

    fp = footprint({"transformer": size("unet"), "text_encoders": size("text_encoder", "image_encoder",
                                                                        "postfuse_module"),
                    "vae": size("vae")}, "none", dtype)
    mode, why = plan_offload(spec.offload, spec.device, fp, free_vram)
    return mode, dtype, why, fp


def make_handle(spec: FastComposerSpec, free_vram: int | None = None) -> FastComposerHandle:
    """Check the checkpoint's keys (and the tokenizer) and resolve offload / dtype; loads no weights."""
    if Path(spec.path).suffix not in EXTENSIONS:
        raise ModelFileError("a .bin or .safetensors checkpoint", f"'{Path(spec.path).name}'",
                             "Use FastComposer's pytorch_model.bin as released, or a .safetensors of the same keys.")
    if not (Path(spec.tokenizer) / "vocab.json").is_file():
        raise ModelFileError(f"a CLIP tokenizer folder (vocab.json, merges.txt) at '{spec.tokenizer}'", "none",
                             "ComfyUI ships one in comfy/sd1_tokenizer; reinstall ComfyUI if it is gone.")
    configs = part_configs(spec.path)
    plan = plan_keys(_read_keys(spec.path), expected_keys(configs), base_available=bool(spec.base))
    check_plan(plan, spec.path, spec.base)
    mode, dtype, _, _ = resolve(spec, free_vram)
    return FastComposerHandle(spec=spec, offload=mode, dtype=dtype_name(dtype), from_base=plan.from_base)


def need_bytes(handle: FastComposerHandle, free_vram: int | None = None) -> int:
    _, _, _, fp = resolve(handle.spec, free_vram)
    return resident_vram(handle.offload, fp)


@dataclass
class FastComposerModel(pipelines.LoadedPipeline):
    """diffusers' StableDiffusionPipeline (with our CLIP image encoder as its ``image_encoder``) + the fusion MLP."""

    postfuse: torch.nn.Module | None = None
    image_size: int = 224

    def close(self) -> None:
        self.postfuse = None
        super().close()


def load_parts(spec: FastComposerSpec, dtype: torch.dtype) -> tuple[dict[str, torch.nn.Module], KeyPlan]:
    """Every part with the checkpoint's weights (and the base's for parts the checkpoint lacks), in ``dtype``."""
    configs = part_configs(spec.path)
    sd = _load_state_dict(spec.path)
    exp = expected_keys(configs)
    plan = plan_keys({k: tuple(v.shape) for k, v in sd.items()}, exp, base_available=bool(spec.base))
    check_plan(plan, spec.path, spec.base)
    parts = _build_parts(configs, empty=True)
    base_sds = _base_state_dicts(spec.base, configs) if plan.from_base else {}
    for name, module in parts.items():
        if name in plan.from_base:
            bsd = base_sds[name]
            want = set(exp[name])
            state = {}
            for k, v in bsd.items():
                target = _map_key(name, k, want)
                if target is not None:
                    state[target] = v
            absent = sorted(want - set(state))
            if absent:
                raise ModelFileError(f"an SD1.5 base with the whole {name}", f"'{Path(spec.base).name}' without "
                                     f"{len(absent)} keys: {_by_prefix(absent, 2)}", "Pick an SD1.5 checkpoint.")
        else:
            state = {target: sd[key] for key, target in plan.mapping[name].items()}
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        if any(t.is_floating_point() and t.dtype != dtype for t in [*module.parameters(), *module.buffers()]):
            module.to(dtype=dtype)
        module.eval().requires_grad_(False)
    del sd
    return parts, plan


def load(handle: FastComposerHandle) -> FastComposerModel:
    spec = handle.spec
    mode, dtype, why, fp = resolve(spec)
    t0 = time.perf_counter()
    log.info("Atelier: loading FastComposer from %s (%s, offload %s: %s)", spec.path, dtype_name(dtype), mode, why)
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    parts, plan = load_parts(spec, dtype)
    configs = part_configs(spec.path)
    scheduler = PNDMScheduler.from_config({k: v for k, v in configs["scheduler"].items() if k != "_class_name"})
    tokenizer = CLIPTokenizer.from_pretrained(spec.tokenizer, model_max_length=MAX_TOKENS, local_files_only=True)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer,
                                   unet=parts["unet"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, image_encoder=parts["image_encoder"],
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    model = FastComposerModel(pipe=pipe, spec=spec, offload=handle.offload, dtype=dtype,
                              device=torch.device(spec.device), footprint=fp, postfuse=parts["postfuse_module"],
                              image_size=int(parts["image_encoder"].config.image_size))
    if plan.from_base:
        model.notes.append(f"from the base checkpoint: {', '.join(plan.from_base)}")
    try:
        if spec.vae_slicing:
            pipe.vae.enable_slicing()
        if spec.attention_slicing:
            pipe.enable_attention_slicing()
        pipelines.apply_offload(model)
        model.postfuse.to(model.device)  # 3.5 M parameters: stays on the GPU in every mode
    except Exception:
        model.close()
        raise
    model.load_seconds = time.perf_counter() - t0
    log.info("Atelier: FastComposer ready in %.1f s%s", model.load_seconds, "".join(f"; {n}" for n in model.notes))
    return model


def summary(handle: FastComposerHandle, model: FastComposerModel | None = None) -> str:
    s = handle.spec
    extra = f", base {Path(s.base).name} for {', '.join(handle.from_base)}" if handle.from_base else ""
    return with_notes(f"{Path(s.path).name}: {handle.dtype}, offload {handle.offload}"
                      f"{', attention slicing' if s.attention_slicing else ''}"
                      f"{', VAE slicing' if s.vae_slicing else ''}{extra}", model)


STAGE = Stage(group="fastcomposer", make_handle=make_handle, need_bytes=need_bytes, load=load, summary=summary)


# ------------------------------------------------------------------------------------------------ prompt


@dataclass(frozen=True)
class ParsedPrompt:
    text: str  # the prompt without markers (what the text-only steps see)
    positions: tuple[int, ...]  # token index (start token = 0) of the word before each marker, in marker order
    words: tuple[str, ...]  # those words, for messages and notes


def parse_prompt(tokenizer, prompt: str, subjects: int | None = None) -> ParsedPrompt:
    """Find the ``<subject>`` markers; the token just before each one gets the subject of the same rank.

    Errors: no marker, a marker with no word before it (prompt start, or right after another marker), a number of
    markers other than ``subjects``, a prompt longer than CLIP's 77 tokens."""
    pieces = prompt.split(MARKER)
    n = len(pieces) - 1
    if n == 0:
        raise InputError(f"a prompt that marks each subject with {MARKER} after its word",
                         repr(prompt[:80]), f"Write e.g. 'a man {MARKER} and a woman {MARKER} at the beach'.")
    if subjects is not None and n != subjects:
        raise InputError(f"as many {MARKER} markers as subject pictures", f"{n} markers and {subjects} pictures",
                         f"Add or remove {MARKER} markers, or connect one picture per marker (in the same order).")
    text = " ".join(pieces)
    positions, words = [], []
    for j in range(n):
        before = " ".join(pieces[: j + 1])
        ids = tokenizer(before, add_special_tokens=False).input_ids
        if not pieces[j].strip() or not ids:
            where = "at the start of the prompt" if j == 0 and not pieces[0].strip() else "right after another marker"
            raise InputError(f"a word before each {MARKER} (it names the subject: 'a man {MARKER}')",
                             f"marker {j + 1} {where}", f"Put the word the subject stands for before the marker.")
        positions.append(len(ids))  # index 0 is the start token
        words.append(pieces[j].split()[-1] if pieces[j].split() else "?")
    total = len(tokenizer(text).input_ids)
    if total > MAX_TOKENS:
        raise InputError(f"a prompt of at most {MAX_TOKENS} CLIP tokens (start and end included)",
                         f"{total} tokens", "Shorten the prompt: SD1.5 reads no further than 77 tokens.")
    return ParsedPrompt(text=text, positions=tuple(positions), words=tuple(words))


# -------------------------------------------------------------------------------------------- subjects


def subject_pixels(image: torch.Tensor, mask: torch.Tensor | None, size: int) -> torch.Tensor:
    """One subject picture (HWC in [0, 1]) → the encoder's input (3, size, size), CLIP-normalised.

    With a mask: cropped to the mask's box, everything outside the mask black. Then padded to a square with black
    (centred) and resized with antialiasing, the way FastComposer prepared its subjects."""
    h, w = int(image.shape[0]), int(image.shape[1])
    x = image[..., :3].permute(2, 0, 1).float()
    if mask is not None:
        m = mask.float() > 0.5
        if not bool(m.any()):
            raise InputError("a subject mask that selects something", "an empty mask",
                             "Check the background remover's output, or leave subject_masks unconnected.")
        ys, xs = torch.nonzero(m, as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        x = (x * m.to(x.dtype))[:, y0:y1, x0:x1]
    _, h, w = x.shape
    d = abs(h - w)
    if h > w:
        x = F.pad(x, (d // 2, d - d // 2, 0, 0))
    elif w > h:
        x = F.pad(x, (0, 0, d // 2, d - d // 2))
    x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


def check_subjects(subjects: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    subjects = check_image(subjects, "subjects")
    _, h, w, _ = subjects.shape
    if min(h, w) < MIN_SUBJECT_SIDE:
        raise InputError(f"subject pictures of at least {MIN_SUBJECT_SIDE}×{MIN_SUBJECT_SIDE} pixels",
                         f"{w}×{h}", "Connect the subject photos themselves (a face or a person, ideally 224 px "
                                     "or more).")
    if masks is None:
        return subjects, None
    masks = check_mask(masks, "subject_masks")
    if masks.shape[1:] != subjects.shape[1:3]:
        raise InputError("subject masks of the pictures' size", f"{masks.shape[2]}×{masks.shape[1]} masks for "
                         f"{w}×{h} pictures", "Connect the masks made from these subject pictures.")
    if masks.shape[0] not in (1, subjects.shape[0]):
        raise InputError(f"1 or {subjects.shape[0]} subject masks", f"{masks.shape[0]}",
                         "Connect one mask per subject picture (or none).")
    return subjects, masks


def encode_subjects(model: FastComposerModel, subjects: torch.Tensor, masks: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(N, D): each subject picture's CLIP image embedding (ViT pooled output → visual projection)."""
    subjects, masks = check_subjects(subjects, masks)
    pipe = model.pipe
    pixels = torch.stack([subject_pixels(subjects[i], None if masks is None else masks[min(i, masks.shape[0] - 1)],
                                         model.image_size) for i in range(subjects.shape[0])])
    device = pipe._execution_device
    with torch.inference_mode():
        return pipe.image_encoder(pixel_values=pixels.to(device, model.dtype)).image_embeds


def fuse(model: FastComposerModel, text_embeds: torch.Tensor, positions: tuple[int, ...],
         subject_embeds: torch.Tensor) -> torch.Tensor:
    """The text encoder's output (1, 77, D) with each marked word's embedding replaced by the fusion MLP's."""
    idx = torch.tensor(positions, device=text_embeds.device)
    with torch.inference_mode():
        fused = text_embeds.clone()
        fused[0, idx] = model.postfuse(text_embeds[0, idx], subject_embeds.to(text_embeds.device))
    return fused


@dataclass
class Conditioning:
    prompt: ParsedPrompt
    text: torch.Tensor  # (1, 77, D) the prompt without markers
    fused: torch.Tensor  # (1, 77, D) with the subjects fused in
    negative: torch.Tensor | None  # (1, 77, D) or None without guidance


def encode(model: FastComposerModel, prompt: str, subjects: torch.Tensor, masks: torch.Tensor | None = None,
           negative_prompt: str = "", guidance: float = 5.0) -> Conditioning:
    pipe = model.pipe
    if pipe is None:
        raise released("FastComposer pipeline")
    parsed = parse_prompt(pipe.tokenizer, prompt, int(check_image(subjects, "subjects").shape[0]))
    embeds = encode_subjects(model, subjects, masks)
    with torch.inference_mode():
        text, negative = pipe.encode_prompt(parsed.text, pipe._execution_device, 1, guidance > 1.0,
                                            negative_prompt or "")
    return Conditioning(parsed, text, fuse(model, text, parsed.positions, embeds),
                        negative if guidance > 1.0 else None)


def text_steps(alpha: float, steps: int) -> int:
    """How many denoising steps run on the text alone."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError("alpha between 0 and 1", str(alpha), "0.2 is the paper's setting (10 of 50 steps).")
    return min(steps, max(0, int(round(alpha * steps))))


def generate(model: FastComposerModel, prompt: str, subjects: torch.Tensor, masks: torch.Tensor | None = None, *,
             negative_prompt: str = "", alpha: float = 0.2, steps: int = 50, guidance: float = 5.0, seed: int = 0,
             width: int = 512, height: int = 512, progress: Progress | None = None) -> torch.Tensor:
    """One picture (1, H, W, 3) in [0, 1]: the first ``alpha`` share of the steps on the prompt without markers,
    the rest with the subjects fused in (diffusers' StableDiffusionPipeline, prompt embeddings swapped by a
    step-end callback)."""
    progress = progress or NullProgress()
    if width % 8 or height % 8 or min(width, height) < 64:
        raise InputError("width and height multiples of 8, at least 64", f"{width}×{height}",
                         "SD1.5 works on 8-pixel latents; 512×512 is its native size.")
    if steps < 1:
        raise InputError("at least 1 step", str(steps), "50 is the paper's setting.")
    k = text_steps(alpha, steps)
    pipe = model.pipe
    if pipe is None:
        raise released("FastComposer pipeline")
    try:
        cond = encode(model, prompt, subjects, masks, negative_prompt, guidance)
        cfg = guidance > 1.0
        fused_batch = torch.cat([cond.negative, cond.fused]) if cfg else cond.fused
        seen: list = []
        state = {"threshold": None}

        def on_step(p, i, t, kwargs):
            timesteps = p.scheduler.timesteps
            if state["threshold"] is None:
                distinct = sorted({int(x) for x in timesteps.tolist()}, reverse=True)
                state["threshold"] = distinct[k] if k < len(distinct) else None
                state["never"] = k >= len(distinct)
            if int(t) not in seen:  # PNDM repeats a timestep: count denoising steps, not calls
                seen.append(int(t))
                progress.step(1)  # ComfyUI's hook raises here when the user pressed Stop
            if k > 0 and not state["never"] and i + 1 < len(timesteps) \
                    and int(timesteps[i + 1]) <= state["threshold"]:
                kwargs["prompt_embeds"] = fused_batch
            return kwargs

        generator = torch.Generator("cpu").manual_seed(int(seed) % (2**64))
        with torch.inference_mode():
            out = pipe(prompt_embeds=cond.fused if k == 0 else cond.text, negative_prompt_embeds=cond.negative,
                       guidance_scale=guidance, num_inference_steps=steps, width=width, height=height,
                       generator=generator, output_type="pt", callback_on_step_end=on_step,
                       callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    finally:
        pipe.maybe_free_model_hooks()  # after Stop or an error too: offload hooks back to rest
    log.info("Atelier: FastComposer fused %s into %d of %d steps", ", ".join(cond.prompt.words), steps - k, steps)
    return out.permute(0, 2, 3, 1).float().cpu()
