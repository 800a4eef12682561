"""BiRefNet as plain torch modules: RMBG-2.0 and ZhengPeng7's BiRefNet checkpoints without remote code.

BiRefNet ("Bilateral Reference for High-Resolution Dichotomous Image Segmentation", Zheng et al. 2024) is a Swin
Transformer encoder run on the image and on a half-size copy, followed by a decoder whose blocks use deformable
ASPP attention, an "inward" reference (the image itself cut into tiles and stacked as channels, fed to every
decoder stage) and an "outward" reference (gradient-attention maps gating each stage). briaai's RMBG-2.0 and
ZhengPeng7's BiRefNet general / HR / matting / dynamic checkpoints are the Swin-L version of it; BiRefNet_lite is
the Swin-T one.

This file is our own implementation. Module attribute names follow the official checkpoints' ``state_dict`` keys
(``bb.layers.0.blocks.0.attn.qkv.weight``, ``squeeze_module.0.dec_att.aspp1.atrous_conv.offset_conv.weight``,
``decoder.ipt_blk5.conv1.weight`` …) so their ``model.safetensors`` loads strictly; the rest (classes, helpers,
the way the forward is written) is ours. Inference only: the training-time heads (multi-scale supervision, the
gradient-prediction convs) are built so the keys match, and skipped by the forward.

Checkpoints store BatchNorm statistics and the Swin relative-position index; files that leave out the index or
``num_batches_tracked`` still load (both are recomputed). ``module.`` / ``_orig_mod.`` key prefixes (DDP and
``torch.compile`` saves of the training code) are stripped.

One thing the weights cannot tell: the channel order of the inward reference. BiRefNet's code before 2024-11-05
(the code RMBG-2.0 ships, and ComfyUI core's copy) stacks the tiles patch by patch, walking the columns
(``patch_major``: channel = (column · rows + row) · 3 + rgb); the code since then stacks them colour plane by
colour plane (``channel_major``: channel = (rgb · rows + row) · columns + column). Both give the same key set and
shapes, so :func:`build_birefnet` takes ``patch_order`` and defaults to ``patch_major``, the order RMBG-2.0 and the
2024 BiRefNet weights were trained with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from .errors import InputError, ModelFileError
from .weights import mismatch_report

__all__ = [
    "BiRefNetConfig", "BiRefNet", "SWIN_PRESETS", "PATCH_ORDERS", "build_birefnet", "is_birefnet_state_dict",
    "config_from_state_dict", "describe", "normalise_keys",
]

# Swin v1 backbones BiRefNet is published with (embed dim, blocks per stage, heads per stage, window)
SWIN_PRESETS: dict[str, dict] = {
    "swin_v1_t": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    "swin_v1_s": {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
    "swin_v1_b": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "window_size": 12},
    "swin_v1_l": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48), "window_size": 12},
}
_BACKBONE_TITLES = {
    "swin_v1_l": "Swin-L (RMBG-2.0, BiRefNet general / HR / matting / dynamic)",
    "swin_v1_b": "Swin-B",
    "swin_v1_s": "Swin-S",
    "swin_v1_t": "Swin-T (BiRefNet_lite)",
}
PATCH_ORDERS = ("patch_major", "channel_major")

# BiRefNet's fixed decoder settings (identical in every published checkpoint this module loads)
_TILE_GRID = 32            # the image is cut into 32×32 tiles of the deepest feature map's size
_IPT_INTER = 64            # inward-reference convs' hidden width
_DEC_INTER = 64            # decoder blocks' hidden width
_ASPP_WIDTH = 256          # deformable ASPP branch width
_ASPP_KERNELS = (1, 3, 7)  # deformable ASPP parallel kernels (after the 1×1 branch)
_GDT_WIDTH = 16            # gradient-attention hidden width
_SHIFT_MASK = -100.0       # Swin's additive mask between tokens from different regions of a shifted window
_PREFIXES = ("module.", "_orig_mod.")

# keys every BiRefNet checkpoint of the supported decoder layout has (after prefix stripping)
_SIGNATURE = ("decoder.conv_out1.0.weight", "decoder.lateral_block4.conv.weight", "squeeze_module.0.conv_in.weight",
              "decoder.ipt_blk5.conv1.weight", "decoder.gdt_convs_attn_4.0.weight")
_FAMILY = ("decoder.conv_out1.0.weight", "decoder.lateral_block4.conv.weight")


@dataclass(frozen=True)
class BiRefNetConfig:
    """What varies between published BiRefNet checkpoints: the Swin backbone, and the inward-reference order."""

    backbone: str = "swin_v1_l"
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    patch_order: str = "patch_major"

    def __post_init__(self):
        if self.patch_order not in PATCH_ORDERS:
            raise ValueError(f"patch_order must be one of {PATCH_ORDERS}, got {self.patch_order!r}")
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError("BiRefNet needs a 4-stage Swin backbone")

    @classmethod
    def preset(cls, backbone: str, patch_order: str = "patch_major") -> BiRefNetConfig:
        """``swin_v1_l`` (RMBG-2.0, BiRefNet general), ``swin_v1_b``, ``swin_v1_s``, ``swin_v1_t`` (BiRefNet_lite)."""
        if backbone not in SWIN_PRESETS:
            raise ValueError(f"unknown BiRefNet backbone {backbone!r}; known: {', '.join(SWIN_PRESETS)}")
        return cls(backbone=backbone, patch_order=patch_order, **SWIN_PRESETS[backbone])

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the four encoder outputs after concatenating the half-resolution pass ("cat" input)."""
        return tuple(2 * self.embed_dim * 2 ** i for i in range(4))

    @property
    def title(self) -> str:
        name = _BACKBONE_TITLES.get(self.backbone, f"Swin (embed {self.embed_dim})")
        return (f"BiRefNet, {name} backbone: embed {self.embed_dim}, depths {'-'.join(map(str, self.depths))}, "
                f"window {self.window_size}")


# ------------------------------------------------------------------------------------------------ Swin encoder


def _windows(x: Tensor, size: int) -> Tensor:
    """(B, H, W, C) with H, W multiples of ``size`` -> (B·nH·nW, size², C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // size, size, w // size, size, c).transpose(2, 3)
    return x.reshape(-1, size * size, c)


def _unwindows(x: Tensor, size: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_windows`: (B·nH·nW, size², C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // size, w // size, size, size, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def _relative_index(size: int) -> Tensor:
    """Index into the (2·size−1)² relative-position table for every (query, key) pair of a window."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + size - 1
    dx = xs[:, None] - xs[None, :] + size - 1
    return dy * (2 * size - 1) + dx


def _shift_mask(hp: int, wp: int, size: int, shift: int, device, dtype) -> Tensor:
    """(nW, size², size²) additive mask that keeps a shifted window's tokens from attending across the wrap-around."""
    def bands(n: int) -> Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - size).long() + (i >= n - shift).long()

    region = bands(hp)[:, None] * 3 + bands(wp)[None, :]
    region = _windows(region[None, :, :, None].to(dtype), size).squeeze(-1)
    same = region[:, :, None] == region[:, None, :]
    return torch.zeros(same.shape, device=device, dtype=dtype).masked_fill(~same, _SHIFT_MASK)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, size: int):
        super().__init__()
        self.heads, self.size = heads, size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * size - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_index(size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def reset_buffers(self) -> None:
        self.relative_position_index.copy_(_relative_index(self.size))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x (B·nW, N, C); mask None or (nW, N, N)."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # (1, heads, N, N)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias + mask.to(q.dtype).unsqueeze(1)).repeat(bw // nw, 1, 1, 1)  # (B·nW, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, size: int, shift: int):
        super().__init__()
        self.size, self.shift = size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, 4 * dim)

    def forward(self, x: Tensor, h: int, w: int, mask: Tensor) -> Tensor:
        b, _, c = x.shape
        s = self.size
        y = self.norm1(x).view(b, h, w, c)
        y = F.pad(y, (0, 0, 0, -w % s, 0, -h % s))  # pad right / bottom to whole windows (after the norm: zeros)
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = _unwindows(self.attn(_windows(y, s), mask if self.shift else None), s, hp, wp)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y[:, :h, :w].reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        # the 2×2 neighbours in Swin's order: (0,0), (1,0), (0,1), (1,1) as (row, column)
        x = torch.cat([x[:, r::2, q::2] for q in (0, 1) for r in (0, 1)], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, size: int, downsample: bool):
        super().__init__()
        self.size = size
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, size, size // 2 if i % 2 else 0) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, h: int, w: int) -> tuple[Tensor, Tensor | None]:
        s = self.size
        mask = _shift_mask(math.ceil(h / s) * s, math.ceil(w / s) * s, s, s // 2, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, h, w, mask)
        return x, (self.downsample(x, h, w) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        x = self.proj(F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p)))
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SwinBackbone(nn.Module):
    """Swin Transformer v1 returning the four stages' normalised outputs as (B, C, H, W) maps."""

    def __init__(self, cfg: BiRefNetConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.embed_dim)
        dims = [cfg.embed_dim * 2 ** i for i in range(4)]
        self.layers = nn.ModuleList(
            SwinStage(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, downsample=i < 3) for i in range(4))
        for i, d in enumerate(dims):
            self.add_module(f"norm{i}", nn.LayerNorm(d))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, stage in enumerate(self.layers):
            y, x = stage(x, h, w)
            y = getattr(self, f"norm{i}")(y)
            outs.append(y.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
            h, w = (h + 1) // 2, (w + 1) // 2
        return outs


# ----------------------------------------------------------------------------------------------------- decoder


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class DeformConv(nn.Module):
    """Modulated deformable convolution (DCNv2): offsets and a 0..2 modulation predicted from the input."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.pad = k // 2
        self.offset_conv = nn.Conv2d(cin, 2 * k * k, k, 1, self.pad)
        self.modulator_conv = nn.Conv2d(cin, k * k, k, 1, self.pad)
        self.regular_conv = nn.Conv2d(cin, cout, k, 1, self.pad, bias=False)
        for conv in (self.offset_conv, self.modulator_conv):  # start as a plain convolution
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        offset = self.offset_conv(x)
        modulation = 2.0 * torch.sigmoid(self.modulator_conv(x))
        weight = self.regular_conv.weight
        if x.dtype == torch.bfloat16:  # torchvision's kernels (CPU and CUDA) have no bfloat16: this op in float32
            out = deform_conv2d(x.float(), offset.float(), weight.float(), None, padding=self.pad,
                                mask=modulation.float())
            return out.to(x.dtype)
        return deform_conv2d(x, offset, weight, None, padding=self.pad, mask=modulation)


class DeformBranch(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.atrous_conv = DeformConv(cin, cout, k)
        self.bn = _bn(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.atrous_conv(x)))


class DeformASPP(nn.Module):
    """ASPP with deformable branches (1×1, then 1×1, 3×3, 7×7) plus a global-average branch, fused by a 1×1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.aspp1 = DeformBranch(c, _ASPP_WIDTH, 1)
        self.aspp_deforms = nn.ModuleList(DeformBranch(c, _ASPP_WIDTH, k) for k in _ASPP_KERNELS)
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, _ASPP_WIDTH, 1, bias=False),
                                             _bn(_ASPP_WIDTH), nn.ReLU())
        self.conv1 = nn.Conv2d(_ASPP_WIDTH * (2 + len(_ASPP_KERNELS)), c, 1, bias=False)
        self.bn1 = _bn(c)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.aspp1(x), *(branch(x) for branch in self.aspp_deforms)]
        pooled = self.global_avg_pool(x)
        branches.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return F.relu(self.bn1(self.conv1(torch.cat(branches, 1))))


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, _DEC_INTER, 3, 1, 1)
        self.bn_in = _bn(_DEC_INTER)
        self.dec_att = DeformASPP(_DEC_INTER)
        self.conv_out = nn.Conv2d(_DEC_INTER, cout, 3, 1, 1)
        self.bn_out = _bn(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn_in(self.conv_in(x)))
        return self.bn_out(self.conv_out(self.dec_att(x)))


class Lateral(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class InwardReference(nn.Module):
    """Two 3×3 convs (no activation between) over the image tiles stacked as channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, _IPT_INTER, 3, 1, 1)
        self.conv_out = nn.Conv2d(_IPT_INTER, cout, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv1(x))


def _gdt_convs(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, _GDT_WIDTH, 3, 1, 1), _bn(_GDT_WIDTH), nn.ReLU())


def _head(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, 1, 1))


def _up(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def image_tiles(image: Tensor, tile_h: int, tile_w: int, order: str) -> Tensor:
    """Cut (B, C, H, W) into (H/tile_h)×(W/tile_w) tiles and stack them as channels: (B, C·tiles, tile_h, tile_w).

    ``patch_major``: tiles in column-major order, each tile's C channels together (BiRefNet code before
    2024-11-05, RMBG-2.0). ``channel_major``: colour planes outermost, tiles row-major within (BiRefNet since).
    """
    b, c, h, w = image.shape
    rows, cols = h // tile_h, w // tile_w
    t = image.reshape(b, c, rows, tile_h, cols, tile_w)
    if order == "patch_major":
        t = t.permute(0, 4, 2, 1, 3, 5)      # b, col, row, c, th, tw
    else:
        t = t.permute(0, 1, 2, 4, 3, 5)      # b, c, row, col, th, tw
    return t.reshape(b, c * rows * cols, tile_h, tile_w)


class Decoder(nn.Module):
    def __init__(self, cfg: BiRefNetConfig):
        super().__init__()
        c0, c1, c2, c3 = reversed(cfg.stage_channels)   # deepest first
        ipt = (c0 // 8, c0 // 8, c1 // 8, c2 // 8, c3 // 8)     # inward-reference widths for stages 5..1
        tiles = (_TILE_GRID ** 2, (_TILE_GRID // 2) ** 2, (_TILE_GRID // 4) ** 2, (_TILE_GRID // 8) ** 2, 1)
        for n, width, count in zip((5, 4, 3, 2, 1), ipt, tiles, strict=True):
            self.add_module(f"ipt_blk{n}", InwardReference(3 * count, width))
        self.decoder_block4 = DecoderBlock(c0 + ipt[0], c1)
        self.decoder_block3 = DecoderBlock(c1 + ipt[1], c2)
        self.decoder_block2 = DecoderBlock(c2 + ipt[2], c3)
        self.decoder_block1 = DecoderBlock(c3 + ipt[3], c3 // 2)
        self.conv_out1 = _head(c3 // 2 + ipt[4])
        self.lateral_block4 = Lateral(c1, c1)
        self.lateral_block3 = Lateral(c2, c2)
        self.lateral_block2 = Lateral(c3, c3)
        # training-only heads: kept for the checkpoint's keys, unused below
        for n, c in ((4, c1), (3, c2), (2, c3)):
            self.add_module(f"conv_ms_spvn_{n}", nn.Conv2d(c, 1, 1))
        for n, c in ((4, c1), (3, c2), (2, c3)):
            self.add_module(f"gdt_convs_{n}", _gdt_convs(c))
        for n in (4, 3, 2):
            self.add_module(f"gdt_convs_pred_{n}", _head(_GDT_WIDTH))
        for n in (4, 3, 2):
            self.add_module(f"gdt_convs_attn_{n}", _head(_GDT_WIDTH))
        self.patch_order = cfg.patch_order

    def _with_reference(self, feat: Tensor, image: Tensor, n: int) -> Tensor:
        tiles = image_tiles(image, feat.shape[-2], feat.shape[-1], self.patch_order)
        return torch.cat([feat, getattr(self, f"ipt_blk{n}")(tiles)], 1)

    def _gate(self, p: Tensor, n: int) -> Tensor:
        attention = getattr(self, f"gdt_convs_attn_{n}")(getattr(self, f"gdt_convs_{n}")(p))
        return p * torch.sigmoid(attention)

    def forward(self, image: Tensor, x1: Tensor, x2: Tensor, x3: Tensor, x4: Tensor) -> Tensor:
        p = self._gate(self.decoder_block4(self._with_reference(x4, image, 5)), 4)
        p = _up(p, x3.shape[-2:]) + self.lateral_block4(x3)
        p = self._gate(self.decoder_block3(self._with_reference(p, image, 4)), 3)
        p = _up(p, x2.shape[-2:]) + self.lateral_block3(x2)
        p = self._gate(self.decoder_block2(self._with_reference(p, image, 3)), 2)
        p = _up(p, x1.shape[-2:]) + self.lateral_block2(x1)
        p = self.decoder_block1(self._with_reference(p, image, 2))
        p = _up(p, image.shape[-2:])
        return self.conv_out1(self._with_reference(p, image, 1))


class BiRefNet(nn.Module):
    """BiRefNet for inference. ``forward(image)``: B×3×H×W ImageNet-normalised, H and W multiples of 32 (1024 for
    the published checkpoints) -> B×1×H×W mask logits (apply ``sigmoid`` for the mask)."""

    def __init__(self, cfg: BiRefNetConfig | None = None):
        super().__init__()
        cfg = cfg or BiRefNetConfig()
        self.config = cfg
        self.bb = SwinBackbone(cfg)
        ch = cfg.stage_channels
        context = sum(ch[:3])  # the three shallower stages, resized onto the deepest
        self.squeeze_module = nn.Sequential(DecoderBlock(ch[3] + context, ch[3]))
        self.decoder = Decoder(cfg)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the buffers that are functions of the config (after ``to_empty`` or a partial load)."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.reset_buffers()
            elif isinstance(module, nn.BatchNorm2d) and module.num_batches_tracked is not None:
                module.num_batches_tracked.zero_()

    def encode(self, image: Tensor) -> list[Tensor]:
        h, w = image.shape[-2:]
        full = self.bb(image)
        half = self.bb(_up(image, (h // 2, w // 2)))
        feats = [torch.cat([f, _up(g, f.shape[-2:])], 1) for f, g in zip(full, half, strict=True)]
        deepest = feats[3]
        context = [_up(f, deepest.shape[-2:]) for f in feats[:3]]
        feats[3] = self.squeeze_module(torch.cat([*context, deepest], 1))
        return feats

    def forward(self, image: Tensor) -> Tensor:
        if image.ndim != 4 or image.shape[1] != 3:
            raise InputError("a B×3×H×W image tensor", f"shape {tuple(image.shape)}",
                             "Pass an RGB batch in channels-first layout.")
        h, w = image.shape[-2:]
        if h % _TILE_GRID or w % _TILE_GRID or h == 0 or w == 0:
            raise InputError(f"an image whose height and width are multiples of {_TILE_GRID} (the checkpoints "
                             "were trained at 1024×1024)", f"{w}×{h}",
                             "Resize the image to 1024×1024 (or another multiple of 32) before running BiRefNet.")
        x1, x2, x3, x4 = self.encode(image)
        return self.decoder(image, x1, x2, x3, x4)


# --------------------------------------------------------------------------------------- files and recognition


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def normalise_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict with the training code's ``module.`` / ``_orig_mod.`` prefixes removed (tensors untouched)."""
    return {_strip(k): v for k, v in state_dict.items()}


def is_birefnet_state_dict(keys: Iterable[str]) -> bool:
    """True when the keys are a BiRefNet checkpoint's (any backbone or decoder layout; :func:`build_birefnet`
    then says whether it can run it)."""
    names = {_strip(k) for k in keys}
    return all(k in names for k in _FAMILY) and any(k.startswith("bb.") for k in names)


_BLOCK = re.compile(r"^bb\.layers\.(\d+)\.blocks\.(\d+)\.")


def _swin_shape(keys: Mapping[str, Tensor]) -> dict | None:
    """Swin hyper-parameters read off the tensor shapes, or None when the backbone is not a 4-stage Swin v1."""
    embed = keys.get("bb.patch_embed.proj.weight")
    if embed is None or embed.ndim != 4:
        return None
    depth: dict[int, int] = {}
    for k in keys:
        m = _BLOCK.match(k)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depth[stage] = max(depth.get(stage, 0), block + 1)
    if sorted(depth) != [0, 1, 2, 3]:
        return None
    heads, window = [], None
    for stage in range(4):
        table = keys.get(f"bb.layers.{stage}.blocks.0.attn.relative_position_bias_table")
        if table is None or table.ndim != 2:
            return None
        side = math.isqrt(int(table.shape[0]))
        if side * side != table.shape[0] or side % 2 == 0:
            return None
        window = (side + 1) // 2
        heads.append(int(table.shape[1]))
    return {"embed_dim": int(embed.shape[0]), "depths": tuple(depth[i] for i in range(4)),
            "num_heads": tuple(heads), "window_size": window}


def _backbone_name(swin: dict) -> str:
    for name, preset in SWIN_PRESETS.items():
        if all(tuple(swin[k]) == tuple(v) if isinstance(v, tuple) else swin[k] == v for k, v in preset.items()):
            return name
    return "swin_custom"


def _first_keys(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return f"{len(keys)} tensors ({shown}{', …' if len(keys) > n else ''})"


_FIX = ("Put the model.safetensors of briaai/RMBG-2.0 or ZhengPeng7/BiRefNet (general, _lite, _HR, -matting) in "
        "models/background_removal and pick that file.")


def config_from_state_dict(state_dict: Mapping[str, Tensor], patch_order: str = "patch_major") -> BiRefNetConfig:
    """The :class:`BiRefNetConfig` a checkpoint needs, read off its keys and shapes. Raises ModelFileError."""
    sd = normalise_keys(state_dict)
    if not is_birefnet_state_dict(sd):
        raise ModelFileError(
            "a BiRefNet checkpoint (keys bb.layers.*, squeeze_module.*, decoder.ipt_blk5.*, decoder.conv_out1.0.*)",
            _first_keys(sd), _FIX)
    swin = _swin_shape(sd)
    if swin is None:
        raise ModelFileError(
            "a BiRefNet checkpoint with a Swin v1 backbone (bb.patch_embed.proj, bb.layers.0-3.blocks.*)",
            f"a BiRefNet checkpoint with another backbone ({_first_keys([k for k in sd if k.startswith('bb.')])})",
            "Only the Swin versions (RMBG-2.0, BiRefNet general / lite / HR / matting) are supported; " + _FIX)
    missing = [k for k in _SIGNATURE if k not in sd]
    if missing:
        raise ModelFileError(
            "a BiRefNet checkpoint of the 2024 decoder layout (inward reference at 5 scales, gradient attention)",
            f"a BiRefNet checkpoint without {', '.join(missing)} (an older or differently configured BiRefNet)",
            "Use a current RMBG-2.0 / BiRefNet model.safetensors; " + _FIX)
    return BiRefNetConfig(backbone=_backbone_name(swin), patch_order=patch_order, **swin)


def describe(state_dict: Mapping[str, Tensor]) -> str:
    """One line saying what the state dict is, for messages and logs. Never raises."""
    try:
        sd = normalise_keys(state_dict)
        if not is_birefnet_state_dict(sd):
            return f"not a BiRefNet checkpoint: {_first_keys(sd)}"
        try:
            cfg = config_from_state_dict(sd)
        except ModelFileError as err:
            return f"a BiRefNet checkpoint this build cannot run: {err.received}"
        params = sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "running_" not in k)
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values() if v.is_floating_point()})
        return f"{cfg.title}; {params / 1e6:.1f} M parameters, {'/'.join(dtypes) or 'no floating tensors'}"
    except Exception as err:  # noqa: BLE001 - a description must not fail the caller's error path
        return f"unreadable state dict ({type(err).__name__}: {err})"


_OPTIONAL = ("relative_position_index", "num_batches_tracked")  # recomputed when a file leaves them out


def _check_keys(model: BiRefNet, sd: Mapping[str, Tensor]) -> None:
    report = mismatch_report({k: v.shape for k, v in model.state_dict().items()}, sd, optional=_OPTIONAL)
    if report:
        raise ModelFileError(f"the tensors of {model.config.title}", f"{describe(sd)}; {report}",
                             "The file is incomplete or of another BiRefNet configuration; re-download it. " + _FIX)


def build_birefnet(state_dict: Mapping[str, Tensor] | None = None, config: BiRefNetConfig | None = None, *,
                   patch_order: str | None = None, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> BiRefNet:
    """Build BiRefNet in eval mode; with ``state_dict``, load it strictly (config recognised from it if not given).

    ``patch_order`` overrides the config's inward-reference order (see the module docstring). Without a state dict
    the weights are randomly initialised (``device="meta"`` gives a shape-only model).
    """
    if config is None:
        config = config_from_state_dict(state_dict) if state_dict is not None else BiRefNetConfig()
    if patch_order is not None:
        config = replace(config, patch_order=patch_order)
    if state_dict is None:
        with torch.device(device or "cpu"):
            model = BiRefNet(config)
        return model.to(dtype).eval()

    sd = normalise_keys(state_dict)
    if not is_birefnet_state_dict(sd):
        config_from_state_dict(sd)  # raises the "not BiRefNet" error
    with torch.device("meta"):
        model = BiRefNet(config)
    _check_keys(model, sd)
    model = model.to_empty(device=device or "cpu").to(dtype)
    model.reset_buffers()
    full = model.state_dict()
    full.update(sd)
    model.load_state_dict(full, strict=True)
    return model.eval()
