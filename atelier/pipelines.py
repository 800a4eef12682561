"""What every Atelier diffusers stage shares: building a pipeline with the chosen memory settings, and releasing it.

A stage (:mod:`atelier.fill`, :mod:`atelier.layers`) describes its model with a frozen spec carrying the loader's
inputs (``quantization``, ``offload``, ``dtype``, ``device``, ``vae_slicing``, ``vae_tiling``,
``first_block_cache`` and optionally ``attention_slicing``, ``compile``) and gets here:

* :func:`resolve`: offload mode, dtype and size estimate decided without loading anything;
* :func:`load_diffusers`: a diffusers folder with its big parts quantized (bitsandbytes);
* :class:`LoadedPipeline`: the built pipeline + what was decided, with ``resident_bytes`` / ``device`` /
  ``close()`` for the registry and ComfyUI's model management;
* :func:`apply_settings`: the toggles and the offload mode applied to the pipeline, the same way for every stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SettingError
from .memory import (
    BudgetPlan,
    Footprint,
    PartBlocks,
    check_quant_dtype,
    check_quantization,
    diffusers_quant_config,
    dtype_name,
    footprint,
    plan_offload,
    quant_mode,
    resident_vram,
    resolve_dtype,
    transformers_quant_config,
)

log = logging.getLogger("atelier")


# ------------------------------------------------------------------------------------------------ sizes


def bytes16(files: list[Path]) -> int:
    """Bytes of the tensors in these safetensors files if stored in 16 bit (headers only, nothing is loaded)."""
    from .weights import read_safetensors_header

    total = 0
    for f in files:
        for meta in read_safetensors_header(f).values():
            n = 1
            for d in meta["shape"]:
                n *= d
            total += 2 * n
    return total


def folder_bytes16(root: str | Path, *subfolders: str) -> int:
    """:func:`bytes16` of every ``*.safetensors`` in the given subfolders of a diffusers folder."""
    files: list[Path] = []
    for sub in subfolders:
        files += sorted((Path(root) / sub).glob("*.safetensors"))
    return bytes16(files)


def part_blocks(name: str, files: list[Path], lists: dict[str, str], factor: float = 1.0) -> PartBlocks:
    """A part's repeated blocks and the rest, in bytes, from safetensors headers (nothing is loaded).

    ``lists``: file key prefix of each block list → the module path it loads into, in execution order (e.g.
    ``{"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}`` for a BFL file).
    A key ``<prefix>.<i>.…`` belongs to block ``<module path>.<i>``; every other key is fixed. ``factor`` scales
    16-bit bytes to the run format (quantization, fp32)."""
    from .flux_files import read_safetensors_header

    fixed = 0
    sizes: dict[tuple[int, int], int] = {}
    for f in files:
        for key, meta in read_safetensors_header(f).items():
            n = 2
            for d in meta["shape"]:
                n *= d
            for order, prefix in enumerate(lists):
                rest = key[len(prefix) + 1:] if key.startswith(prefix + ".") else ""
                index = rest.split(".", 1)[0]
                if index.isdigit():
                    sizes[(order, int(index))] = sizes.get((order, int(index)), 0) + n
                    break
            else:
                fixed += n
    paths = list(lists.values())
    blocks = tuple((f"{paths[o]}.{i}", int(b * factor)) for (o, i), b in sorted(sizes.items()))
    return PartBlocks(name=name, fixed=int(fixed * factor), blocks=blocks)


# ------------------------------------------------------------------------------------------- decisions


def resolve(spec: Any, sizes: dict[str, int], free_vram: int | None = None,
            blocks: Callable[[torch.dtype], list[PartBlocks]] | None = None) -> tuple[str, torch.dtype, str, Footprint]:
    """Offload mode, dtype and why, plus the size estimate, for ``spec`` and the 16-bit ``sizes`` of its parts.
    ``blocks(dtype)``: the parts' blocks in run bytes, for the budgeted mode of ``auto`` (see ``plan_offload``)."""
    check_quantization(spec.quantization, spec.device)
    dtype = resolve_dtype(spec.dtype, spec.device)
    check_quant_dtype(spec.quantization, dtype)
    fp = footprint(sizes, spec.quantization, dtype)
    mode, why = plan_offload(spec.offload, spec.device, fp, free_vram,
                             blocks=(lambda: blocks(dtype)) if blocks is not None else None)
    if not 0.0 <= spec.first_block_cache < 1.0:
        raise SettingError("first_block_cache between 0 (off) and 1", str(spec.first_block_cache), "Try 0.05–0.12.")
    return mode, dtype, why, fp


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class LoadedPipeline:
    """A built diffusers pipeline and what was decided while building it (a registry entry)."""

    pipe: Any
    spec: Any
    offload: str
    dtype: torch.dtype
    device: torch.device
    footprint: Footprint
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    lora_loaded: dict = field(default_factory=dict)  # adapter name -> atelier.lora.LoraRef now in the pipeline
    plan: BudgetPlan | None = None  # offload "budget": which blocks stay on the GPU

    @property
    def resident_bytes(self) -> int:
        return resident_vram(self.offload, self.footprint, self.plan)

    def close(self) -> None:
        """Remove offload hooks and drop every module so their memory can go."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        try:
            pipe.remove_all_hooks()
        except Exception:  # noqa: BLE001 - best effort: hooks may be half-installed after an error
            log.debug("Atelier: removing hooks failed", exc_info=True)
        for name in list(pipe.components):
            setattr(pipe, name, None)


# ---------------------------------------------------------------------------------------------- building


def load_diffusers(pipeline_cls: type, root: str, dtype: torch.dtype, quantization: str,
                   diffusers_parts: dict[str, type] | None = None,
                   transformers_parts: dict[str, type] | None = None, resident_on: str | None = None):
    """``pipeline_cls.from_pretrained(root)`` offline, the named parts loaded first with their quantization.

    ``diffusers_parts`` (e.g. the transformer) get diffusers' quantization config, ``transformers_parts`` (text
    encoders) transformers'; with quantization ``none`` they load plainly in ``dtype``. ``resident_on``: the GPU
    the quantized parts will live on whole (offload ``none``): torchao parts are then quantized there layer by
    layer as they load (the GPU peak stays the fp8 size; bitsandbytes places itself on the GPU anyway).
    """
    qd = diffusers_quant_config(quantization, dtype)
    qt = transformers_quant_config(quantization, dtype)
    extra = {}
    if resident_on is not None and quant_mode(quantization).package == "torchao":
        extra["device_map"] = {"": resident_on}
    parts = {}
    for name, cls in (diffusers_parts or {}).items():
        parts[name] = cls.from_pretrained(root, subfolder=name, torch_dtype=dtype, quantization_config=qd,
                                          local_files_only=True, **extra)
    for name, cls in (transformers_parts or {}).items():
        parts[name] = cls.from_pretrained(root, subfolder=name, torch_dtype=dtype, quantization_config=qt,
                                          local_files_only=True, **extra)
    return pipeline_cls.from_pretrained(root, **parts, torch_dtype=dtype, local_files_only=True)


def build(model_cls: type, spec: Any, what: str, where: str, mode: str, dtype: torch.dtype, why: str, fp: Footprint,
          make_pipe: Callable[[], Any], plan: BudgetPlan | None = None):
    """``make_pipe()`` wrapped in a ``model_cls`` (a :class:`LoadedPipeline`) with the settings applied, logged."""
    t0 = time.perf_counter()
    if plan is not None:
        why = plan.describe()
    log.info("Atelier: loading %s from %s (%s, quantization %s, offload %s: %s)",
             what, where, dtype_name(dtype), spec.quantization, mode, why)
    pipe = make_pipe()
    model = model_cls(pipe=pipe, spec=spec, offload=mode, dtype=dtype, device=torch.device(spec.device), footprint=fp,
                      plan=plan)
    try:
        apply_settings(model)
    except Exception:
        model.close()
        raise
    model.load_seconds = time.perf_counter() - t0
    log.info("Atelier: %s ready in %.1f s%s", what, model.load_seconds, "".join(f"; {n}" for n in model.notes))
    return model


def is_quantized(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_loaded_in_8bit", False) or getattr(module, "is_loaded_in_4bit", False)
                or getattr(module, "hf_quantizer", None) is not None or getattr(module, "is_quantized", False))


def has_8bit(module: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear8bitLt) for m in module.modules())


def has_bnb(module: torch.nn.Module) -> bool:
    """bitsandbytes layers (4- or 8-bit): diffusers/transformers place them on the GPU while loading. Other
    quantized modules (torchao float8) load where their weights are read and move like plain ones."""
    if not is_quantized(module):
        return False
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in module.modules())


def apply_settings(model: LoadedPipeline) -> None:
    """The loader's toggles, then the offload mode, then compilation (in that order: hooks before compile)."""
    pipe, spec = model.pipe, model.spec
    if spec.vae_slicing:
        pipe.vae.enable_slicing()
    if spec.vae_tiling:
        enable_vae_tiling(pipe.vae)
    if getattr(spec, "attention_slicing", False):
        if callable(getattr(model, "slice_attention", None)):  # a stage with its own way (UNet pipelines)
            model.slice_attention()
        else:
            from .attention import enable_sliced_attention

            enable_sliced_attention(pipe.transformer)
    if spec.first_block_cache > 0:
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=spec.first_block_cache))
    apply_offload(model)
    if getattr(spec, "compile", False):
        compile_transformer(model)


VAE_TILE = 512  # pixels


def enable_vae_tiling(vae: torch.nn.Module, tile: int = VAE_TILE) -> None:
    """diffusers' VAE tiling, with tiles of at most ``tile`` pixels. AutoencoderKL's default tile is its
    ``sample_size`` (1024 for FLUX's VAE), so a 1024² picture would not be tiled at all and its decode would stay
    the peak of the streaming modes (3.3 GiB at 1024²)."""
    vae.enable_tiling()
    size = getattr(vae, "tile_sample_min_size", None)
    if isinstance(size, int) and size > tile:
        factor = size // vae.tile_latent_min_size  # the VAE's downscale (8 for FLUX)
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // factor


def compile_transformer(model: LoadedPipeline) -> None:
    """torch.compile the transformer's repeated blocks (regional compilation: each block type compiles once, so
    the first run pays seconds, not minutes). Layer streaming hooks (``sequential``) break graphs every layer,
    so compilation is skipped there and the node says so."""
    transformer = model.pipe.transformer
    if model.offload == "sequential":
        model.notes.append("compile skipped: sequential offload streams every layer (nothing to fuse)")
        return
    if model.offload == "budget" and model.plan is not None and model.plan.streams_anything:
        # streamed blocks carry hooks that move weights: compile only the resident ones (regional compilation
        # per block object), so the hooks stay in eager code
        n = 0
        for path in model.plan.resident.get("transformer", ()):
            transformer.get_submodule(path).compile(fullgraph=True, dynamic=False)
            n += 1
        model.notes.append(f"{n} resident transformer blocks compiled (torch.compile); streamed blocks run eager")
        return
    if model.device.type == "cuda":
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = True  # a few % on the GEMM epilogues (diffusers' fast-FLUX recipe)
    if hasattr(transformer, "compile_repeated_blocks") and getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    else:
        transformer.compile(fullgraph=False, dynamic=False)
    model.notes.append("transformer compiled (torch.compile): the first run includes compilation")


def _pin_parameterless_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Group offloading streams layers with weights; buffers of weightless modules (rotary ``inv_freq``) would stay
    on the CPU and meet CUDA tensors (transformers' Qwen2.5-VL under generate). They are tiny: keep them on the GPU."""
    for sub in module.modules():
        if next(sub.parameters(recurse=False), None) is None:
            for name, buf in list(sub.named_buffers(recurse=False)):
                if buf is not None and buf.device != device:
                    sub._buffers[name] = buf.to(device)


def apply_offload(model: LoadedPipeline) -> None:
    pipe, mode, device = model.pipe, model.offload, model.device
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    quantized = [n for n, m in modules.items() if has_bnb(m)]
    if device.type != "cuda" or mode == "none":
        for name, m in modules.items():
            if name not in quantized:  # bitsandbytes modules are placed on the GPU when loaded
                m.to(device)
        return
    if mode == "model":
        # 8-bit bitsandbytes layers cannot move with .to(): keep them resident, offload the rest part by part
        keep = [n for n in quantized if getattr(modules[n], "is_loaded_in_8bit", False) or has_8bit(modules[n])]
        if keep:
            model.notes.append(f"int8 parts stay on the GPU under model offload ({', '.join(keep)})")
        # parts a stage runs every step beside the big one (the try-on's ControlNet) stay on the GPU too
        resident = [n for n in getattr(model, "resident_in_model_offload", ()) if n in modules and n not in keep]
        for name in resident:
            if name not in quantized:
                modules[name].to(device)
        if keep or resident:
            pipe._exclude_from_cpu_offload = keep + resident
        pipe.enable_model_cpu_offload(device=device)
        return
    if mode == "budget":
        apply_budget(model, modules, quantized)
        return
    if mode == "sequential":
        from diffusers.hooks import apply_group_offloading

        for name, m in modules.items():
            if name in quantized and has_8bit(m):
                # LLM.int8 weights carry their row statistics outside the parameter: streaming the parameter
                # alone would keep a second copy resident. Keep 8-bit parts on the GPU.
                model.notes.append(f"{name} ({model.spec.quantization}) stays on the GPU; other parts stream")
                continue
            # nf4 layers stream like the others: their packed 4-bit weights are the parameters (the small
            # quantisation statistics stay on the GPU), so each step moves a quarter of the bf16 bytes
            apply_group_offloading(m, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="leaf_level", use_stream=True)
            _pin_parameterless_buffers(m, device)
        return
    raise SettingError("offload none, model, sequential or budget", repr(mode), "Pick one of the listed values.")


def apply_budget(model: LoadedPipeline, modules: dict[str, torch.nn.Module], bnb_parts: list[str]) -> None:
    """Offload ``budget``: the plan's resident blocks and every part's fixed weights on the GPU, the other blocks
    streamed from pinned RAM (diffusers' group offloading hooks, block level, the next block copied on a side
    stream while the current one computes). LLM.int8 parts stay whole on the GPU (see ``sequential``)."""
    plan, device = model.plan, model.device
    if plan is None:
        raise SettingError("a budget plan for offload 'budget'", "none", "Use offload auto.")
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for name, m in modules.items():
        streamed = plan.streamed.get(name, ())
        if streamed and name in bnb_parts and has_8bit(m):
            model.notes.append(f"{name} ({model.spec.quantization}) stays on the GPU; other parts stream")
            streamed = ()
        if not streamed:
            if name not in bnb_parts:
                m.to(device)
            continue
        # bitsandbytes 4-bit layers stream module by module (block-level groups crashed with an illegal memory
        # access on H100); the others a block at a time
        stream_blocks(m, streamed, device, stream, leaf=name in bnb_parts)
    model.notes.append(f"offload budget: {plan.describe()}")


def submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``root.get_submodule(path)``, also across the wrapper level transformers versions add or drop
    (CLIPTextModel: ``text_model.encoder.layers`` in 4.x, ``encoder.layers`` in 5.x)."""
    for candidate in (path, f"text_model.{path}", path.removeprefix("text_model.")):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    raise AttributeError(f"{type(root).__name__} has no block {path!r}")


def stream_blocks(root: torch.nn.Module, paths: tuple[str, ...] | list[str], device: torch.device,
                  stream: torch.cuda.Stream | None, leaf: bool = False) -> None:
    """Everything of ``root`` on ``device`` except the blocks at ``paths``, which stay in (pinned) RAM and are
    copied in for their forward only; with a ``stream`` the next streamed block is prefetched while the current
    one computes (diffusers' GroupOffloadingHook + LazyPrefetchGroupOffloadingHook, which learns the order on
    the first forward). ``leaf``: each module of a streamed block with weights of its own moves on its own
    forward instead of the whole block at once."""
    from diffusers.hooks.group_offloading import (
        _GROUP_OFFLOADING,
        _LAZY_PREFETCH_GROUP_OFFLOADING,
        GroupOffloadingConfig,
        GroupOffloadingHook,
        GroupOffloadingType,
        LazyPrefetchGroupOffloadingHook,
        ModuleGroup,
    )
    from diffusers.hooks.hooks import HookRegistry

    cpu = torch.device("cpu")
    blocks = [submodule(root, p) for p in paths]
    inside = {id(x) for b in blocks for x in b.modules()}
    for sub in root.modules():  # the rest onto the GPU, tensor by tensor (streamed blocks never visit it)
        if id(sub) not in inside:
            sub._apply(lambda t: t.to(device), recurse=False)
    config = GroupOffloadingConfig(onload_device=device, offload_device=cpu, offload_type=GroupOffloadingType.BLOCK_LEVEL,
                                   non_blocking=stream is not None, record_stream=False, low_cpu_mem_usage=False,
                                   num_blocks_per_group=1, stream=stream,
                                   exclude_kwargs=getattr(root, "_skip_keys", None))
    for path, block in zip(paths, blocks):
        if not leaf:
            groups = [(block, ModuleGroup(modules=[block], offload_device=cpu, onload_device=device,
                                          offload_leader=block, onload_leader=block, non_blocking=stream is not None,
                                          stream=stream, record_stream=False, onload_self=True, group_id=path))]
        else:  # one group per module with weights of its own (bitsandbytes 4-bit layers stream this way only)
            groups = []
            for sub_name, sub in block.named_modules():
                own = list(sub.parameters(recurse=False))
                bufs = [b for b in sub.buffers(recurse=False) if b is not None]
                if own or bufs:
                    groups.append((sub, ModuleGroup(modules=[], parameters=own, buffers=bufs, offload_device=cpu,
                                                    onload_device=device, offload_leader=sub, onload_leader=sub,
                                                    non_blocking=stream is not None, stream=stream,
                                                    record_stream=False, onload_self=True,
                                                    group_id=f"{path}.{sub_name}")))
        for module, group in groups:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                GroupOffloadingHook(group, config=config), _GROUP_OFFLOADING)
    # the root's own group is empty (its weights are resident); it anchors the prefetch chain: its forward starts
    # the copy of the first streamed block, and the pipeline reads the execution device from it
    anchor = ModuleGroup(modules=[], offload_device=cpu, onload_device=device, offload_leader=root, onload_leader=root,
                         stream=None, onload_self=True, group_id=f"{type(root).__name__}_resident")
    registry = HookRegistry.check_if_exists_or_initialize(root)
    registry.register_hook(GroupOffloadingHook(anchor, config=config), _GROUP_OFFLOADING)
    if stream is not None:
        registry.register_hook(LazyPrefetchGroupOffloadingHook(), _LAZY_PREFETCH_GROUP_OFFLOADING)
