"""Memory/speed settings mapped onto torch, diffusers and bitsandbytes.

Pure decisions (which dtype, which offload mode fits, what quantization config) live here and are unit-tested;
applying them to a pipeline happens in the stage modules (:mod:`atelier.fill`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SettingError

log = logging.getLogger("atelier")

GiB = 1024**3


def transformers_dtype_kwarg() -> str:
    """from_pretrained's dtype argument: transformers 4.56 renamed ``torch_dtype`` to ``dtype``."""
    import re

    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {v: k for k, v in _DTYPES.items()}


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def resolve_dtype(choice: str, device: str | torch.device, bf16_supported: bool | None = None) -> torch.dtype:
    """``auto`` = bf16 on GPUs that support it, fp16 on older GPUs (e.g. RTX 20xx), fp32 on CPU."""
    if choice in _DTYPES:
        return _DTYPES[choice]
    if choice != "auto":
        raise SettingError("dtype one of auto, bf16, fp16, fp32", repr(choice), "Pick one of the listed values.")
    if not is_cuda(device):
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def _bnb_config(module: str, bits: int, dtype: torch.dtype):
    """bitsandbytes settings as diffusers' or transformers' ``BitsAndBytesConfig`` (``module``: which library)."""
    cls = importlib.import_module(module).BitsAndBytesConfig
    if bits == 4:
        return cls(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return cls(load_in_8bit=True)


# fp8 (torchao): transformers/text encoders get fp8 weights with bf16 compute (one pass per job; T5's activations
# have outliers that per-row fp8 activations would clip), the denoiser gets fp8 weights AND activations (scaled mm).
def _torchao_config(module: str, dynamic: bool):
    """torchao's float8 settings as diffusers' or transformers' ``TorchAoConfig``. ``dynamic``: activations are
    quantized per row too and the matmul runs in float8 (``torch._scaled_mm``); else weight-only float8."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow
    except ImportError as e:
        raise SettingError("the torchao package for quantization 'fp8'", f"not importable ({e})",
                           "pip install torchao (into ComfyUI's Python), or choose quantization 'nf4'.") from e
    ao = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if dynamic else Float8WeightOnlyConfig()
    cls = importlib.import_module(module).TorchAoConfig
    return cls(ao) if module == "diffusers" else cls(quant_type=ao)


@dataclass(frozen=True)
class QuantMode:
    """One row of the quantization table: everything Atelier needs to know about a weight format.

    ``bytes_factor``: bytes per parameter relative to 16-bit storage (VRAM estimates). ``streams``: its layers can
    be streamed from RAM by offload ``sequential``/``model`` through accelerate's hooks (bitsandbytes' 4-bit
    layers cannot be dispatched by accelerate, see the captioner). ``needs_cuda``: only runs on NVIDIA GPUs.
    ``min_capability``: the CUDA compute capability its kernels need (None = any). ``package``: the Python package
    it needs beyond the requirements (checked when a loader resolves its settings).
    ``diffusers`` / ``transformers``: dtype → the library's quantization config for the big parts (None = plain).
    """

    name: str
    bytes_factor: float
    streams: bool
    needs_cuda: bool
    tooltip: str
    diffusers: Callable[[torch.dtype], Any] | None = None
    transformers: Callable[[torch.dtype], Any] | None = None
    min_capability: tuple[int, int] | None = None
    package: str | None = None
    dtypes: tuple[torch.dtype, ...] | None = None  # run dtypes its kernels take (None = any)
    offloads: bool = True  # its weights can move between RAM and GPU (offload model / sequential / budget)


QUANT_MODES: dict[str, QuantMode] = {m.name: m for m in (
    QuantMode("none", 1.0, True, False, "none = bf16/fp16 weights"),
    QuantMode("int8", 0.52, True, True, "int8 = LLM.int8 (bitsandbytes)",
              diffusers=lambda d: _bnb_config("diffusers", 8, d),
              transformers=lambda d: _bnb_config("transformers", 8, d)),
    QuantMode("nf4", 0.29, False, True, "nf4 = 4-bit NormalFloat (bitsandbytes)",
              diffusers=lambda d: _bnb_config("diffusers", 4, d),
              transformers=lambda d: _bnb_config("transformers", 4, d)),
    QuantMode("fp8", 0.52, True, True, "fp8 = float8 weights with float8 matmuls (torchao; RTX 40xx/50xx, "
                                       "Ada/Hopper/Blackwell GPUs; resident only: offload none)",
              diffusers=lambda d: _torchao_config("diffusers", dynamic=True),
              transformers=lambda d: _torchao_config("transformers", dynamic=False),
              min_capability=(8, 9), package="torchao", dtypes=(torch.bfloat16,), offloads=False),
)}
"""Adding a quantization mode is one row here plus whatever its configs need; combos and tooltips derive from it."""

QUANTIZATIONS: tuple[str, ...] = tuple(QUANT_MODES)


def quant_mode(quantization: str) -> QuantMode:
    mode = QUANT_MODES.get(quantization)
    if mode is None:
        raise SettingError(f"quantization one of {', '.join(QUANT_MODES)}", repr(quantization),
                           "Pick one of the listed values.")
    return mode


def quantization_tooltip(applies_to: str) -> str:
    """The loaders' quantization tooltip, from the table: ``applies_to`` says which parts are quantized."""
    gpu = [m.name for m in QUANT_MODES.values() if m.needs_cuda]
    return "; ".join(m.tooltip for m in QUANT_MODES.values()) + f": {applies_to}. {', '.join(gpu)} need an NVIDIA GPU."


def cuda_capability(device: str | torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, or None where there is no such device to ask."""
    if not is_cuda(device) or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


def check_quantization(quantization: str, device: str | torch.device) -> None:
    mode = quant_mode(quantization)
    kernels = f"{mode.package} kernels" if mode.package else "bitsandbytes kernels through diffusers"
    if mode.needs_cuda and not is_cuda(device):
        raise SettingError(
            f"a CUDA GPU for quantization '{quantization}' ({kernels})",
            f"device '{device}'", "Choose quantization 'none' on this machine, or run ComfyUI on an NVIDIA GPU.")
    if mode.min_capability is not None:
        cap = cuda_capability(device)
        if cap is not None and cap < mode.min_capability:
            need = ".".join(map(str, mode.min_capability))
            raise SettingError(
                f"a GPU with compute capability {need} or newer for quantization '{quantization}' (float8 matmuls: "
                "RTX 40xx/50xx, L4/L40, H100/H200, B200)",
                f"compute capability {cap[0]}.{cap[1]} on '{device}'",
                "Choose quantization 'nf4' (4-bit, about the same VRAM saving on any NVIDIA GPU) or 'none'.")
    if mode.package and importlib.util.find_spec(mode.package) is None:
        raise SettingError(f"the {mode.package} package for quantization '{quantization}'", "not installed",
                           f"pip install {mode.package} (into ComfyUI's Python), or choose quantization 'nf4'.")


def check_quant_offload(quantization: str, choice: str, mode: str, why: str) -> None:
    """Some weight formats stay where they were quantized: torchao's float8 tensors cannot be moved by offload hooks
    (on an H200: "Attempted to set the storage of a tensor on device cuda:0 to a storage on different device
    cpu"), so they run with offload none only. ``choice``: the offload asked for; ``mode``, ``why``: what it
    resolved to."""
    if quant_mode(quantization).offloads or mode == "none":
        return
    if choice == "auto":
        raise SettingError(f"room for the whole model on the GPU with quantization '{quantization}' (its weights "
                           "cannot be offloaded)", f"offload auto would need '{mode}' ({why})",
                           "Choose quantization 'nf4' (offload auto then streams what does not fit), or free VRAM.")
    raise SettingError(f"offload none or auto with quantization '{quantization}' (its weights cannot move "
                       "between RAM and GPU)", f"offload '{choice}'",
                       "Set offload to none, or choose quantization 'nf4' / 'int8' to offload.")


def check_quant_dtype(quantization: str, dtype: torch.dtype) -> None:
    """Some weight formats only run in one dtype (torchao's per-row float8 takes bf16 weights)."""
    mode = quant_mode(quantization)
    if mode.dtypes is not None and dtype not in mode.dtypes:
        names = ", ".join(_NAMES[d] for d in mode.dtypes)
        raise SettingError(f"dtype {names} (or auto) with quantization '{quantization}'", f"dtype {_NAMES[dtype]}",
                           f"Set dtype to auto or {names}.")


def diffusers_quant_config(quantization: str, dtype: torch.dtype):
    """diffusers' quantization config for the transformer, or None."""
    make = quant_mode(quantization).diffusers
    return make(dtype) if make else None


def transformers_quant_config(quantization: str, dtype: torch.dtype):
    """transformers' quantization config for text encoders / VLMs, or None."""
    make = quant_mode(quantization).transformers
    return make(dtype) if make else None


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes of each pipeline part once loaded in the run dtype / quantization."""

    transformer: int
    text_encoders: int
    vae: int

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoders + self.vae

    @property
    def largest(self) -> int:
        return max(self.transformer, self.text_encoders, self.vae)


def footprint(param_bytes_bf16: dict[str, int], quantization: str, dtype: torch.dtype) -> Footprint:
    """``param_bytes_bf16``: bytes of each part if stored in 16 bit (transformer, text_encoders, vae)."""
    scale = 2.0 if dtype == torch.float32 else 1.0
    q = quant_mode(quantization).bytes_factor
    return Footprint(
        transformer=int(param_bytes_bf16.get("transformer", 0) * (q if q < 1 else scale)),
        text_encoders=int(param_bytes_bf16.get("text_encoders", 0) * (q if q < 1 else scale)),
        vae=int(param_bytes_bf16.get("vae", 0) * scale),
    )


# activations of a 1024² FLUX step + VAE decode headroom
ACTIVATION_RESERVE = int(3.0 * GiB)


def free_cuda_bytes(device: str | torch.device) -> int:
    """Free VRAM for this process: the device's free memory plus what torch's allocator holds unused, within the
    cap ``torch.cuda.set_per_process_memory_fraction`` sets (a hard cap that ``mem_get_info`` does not show)."""
    dev = torch.device(device)
    free, total = torch.cuda.mem_get_info(dev)
    allocated = torch.cuda.memory_allocated(dev)
    free += torch.cuda.memory_reserved(dev) - allocated
    fraction = torch.cuda.get_per_process_memory_fraction(dev) if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    if fraction < 1.0:
        free = min(free, int(fraction * total) - allocated)
    return max(0, free)


def plan_offload(choice: str, device: str | torch.device, fp: Footprint, free_vram: int | None,
                 blocks: Callable[[], list[PartBlocks]] | None = None) -> tuple[str, str]:
    """Resolve ``offload`` to none / model / sequential / budget; returns (mode, reason).

    ``blocks``: the stage's parts as :class:`PartBlocks` (read from file headers when called); with them, ``auto``
    keeps what fits of the model on the GPU and streams the rest (mode ``budget``, :func:`plan_budget`) instead of
    moving whole parts (``model``) or streaming every layer (``sequential``)."""
    if choice not in ("auto", "none", "model", "sequential"):
        raise SettingError("offload one of auto, none, model, sequential", repr(choice), "Pick one of the listed values.")
    if not is_cuda(device):
        if choice not in ("auto", "none"):
            return "none", f"offload '{choice}' moves weights between CPU and GPU; on the CPU everything already lives in RAM"
        return "none", "CPU run"
    if choice != "auto":
        return choice, "chosen"
    if free_vram is None:
        free_vram = free_cuda_bytes(device)
    if fp.total + ACTIVATION_RESERVE <= free_vram:
        return "none", f"everything fits ({fp.total / GiB:.1f} GiB of {free_vram / GiB:.1f} GiB free)"
    if blocks is not None:
        plan = plan_budget(blocks(), free_vram, ACTIVATION_RESERVE)
        if plan.fits:
            return "budget", plan.describe()
    if fp.largest + ACTIVATION_RESERVE <= free_vram:
        return "model", f"one part at a time fits ({fp.largest / GiB:.1f} GiB of {free_vram / GiB:.1f} GiB free)"
    return "sequential", f"only streaming fits ({free_vram / GiB:.1f} GiB free)"


def resident_vram(mode: str, fp: Footprint, plan: BudgetPlan | None = None) -> int:
    """What ComfyUI should reserve for us in each mode (weights that stay on the GPU)."""
    if mode == "budget" and plan is not None:
        return plan.vram
    if mode == "none":
        return fp.total
    if mode == "model":
        return fp.largest
    return int(0.7 * GiB)


# ------------------------------------------------------------------------------------------ budgeted offload


@dataclass(frozen=True)
class PartBlocks:
    """One pipeline part as the budget planner sees it: ``fixed`` bytes that stay on the GPU whenever the part is
    there (embeddings, norms, projections) and its repeated ``blocks`` as (module path, bytes) in execution order."""

    name: str
    fixed: int
    blocks: tuple[tuple[str, int], ...] = ()

    @property
    def total(self) -> int:
        return self.fixed + sum(b for _, b in self.blocks)


@dataclass(frozen=True)
class BudgetPlan:
    """Which blocks of each part stay on the GPU; the others stream from pinned RAM one at a time, the next one
    copied on a side stream while the current one computes (``window``: the VRAM those two copies need)."""

    budget: int
    reserve: int
    resident: dict[str, tuple[str, ...]]
    streamed: dict[str, tuple[str, ...]]
    resident_bytes: int
    window: int

    @property
    def fits(self) -> bool:
        return self.resident_bytes + self.window + self.reserve <= self.budget

    @property
    def vram(self) -> int:
        """Weights on the GPU while running: resident bytes + the streaming window."""
        return self.resident_bytes + self.window

    @property
    def streams_anything(self) -> bool:
        return any(self.streamed.values())

    def describe(self) -> str:
        parts = []
        for name, res in self.resident.items():
            n = len(res) + len(self.streamed.get(name, ()))
            if n:
                parts.append(f"{name} {len(res)}/{n} blocks resident")
        return (f"{', '.join(parts)}; {self.resident_bytes / GiB:.1f} GiB resident + {self.window / GiB:.1f} GiB "
                f"streaming window of a {self.budget / GiB:.1f} GiB budget")


def spread(n: int, k: int) -> tuple[int, ...]:
    """``k`` of ``n`` indices spaced evenly (0 ≤ k ≤ n). Resident blocks spread between streamed ones give each
    streamed block's copy the compute of the resident blocks before it to hide behind."""
    if k <= 0:
        return ()
    if k >= n:
        return tuple(range(n))
    return tuple(int((j + 0.5) * n / k) for j in range(k))


def plan_budget(parts: list[PartBlocks] | tuple[PartBlocks, ...], budget: int, reserve: int) -> BudgetPlan:
    """Keep as many blocks on the GPU as ``budget`` allows after ``reserve`` (activations) and the streaming window.

    ``parts`` in priority order: the first part's blocks are kept before any of the next part's (the denoiser runs
    every step, the text encoders once per job). Every part's fixed bytes are resident. Within a part, the most
    blocks that fit are kept, spread evenly (:func:`spread`). The window is two copies of the largest streamed
    block; the room an even spread leaves is filled with further blocks of the same part first. ``plan.fits`` is False when even the fixed bytes + window + reserve exceed the budget."""
    fixed = sum(p.fixed for p in parts)
    resident: dict[str, tuple[str, ...]] = {p.name: () for p in parts}
    chosen: dict[str, tuple[int, ...]] = {p.name: () for p in parts}

    def totals(sel: dict[str, tuple[int, ...]]) -> tuple[int, int]:
        res, biggest = fixed, 0
        for p in parts:
            keep = set(sel[p.name])
            for i, (_, size) in enumerate(p.blocks):
                if i in keep:
                    res += size
                else:
                    biggest = max(biggest, size)
        return res, 2 * biggest

    for p in parts:
        n = len(p.blocks)
        for k in range(n, 0, -1):  # the most blocks of this part that still fit (n ≤ ~60: a plain scan)
            trial = {**chosen, p.name: spread(n, k)}
            res, window = totals(trial)
            if res + window + reserve <= budget:
                chosen = trial
                break
        for i in range(n):  # the room the even spread left: any further block of this part that still fits
            if i in chosen[p.name]:
                continue
            trial = {**chosen, p.name: tuple(sorted((*chosen[p.name], i)))}
            res, window = totals(trial)
            if res + window + reserve <= budget:
                chosen = trial
    res, window = totals(chosen)
    for p in parts:
        keep = set(chosen[p.name])
        resident[p.name] = tuple(path for i, (path, _) in enumerate(p.blocks) if i in keep)
    streamed = {p.name: tuple(path for i, (path, _) in enumerate(p.blocks) if i not in set(chosen[p.name]))
                for p in parts}
    return BudgetPlan(budget=budget, reserve=reserve, resident=resident, streamed=streamed, resident_bytes=res,
                      window=window)
