"""TRELLIS sparse-structure decoder (docs/trellis.md §6): dense conv3d net, latent (B, 8, 16³) -> occupancy logits
(B, 1, 64³).

Parameter names follow the released `ss_dec_conv3d_16l8_fp16` checkpoint, so its safetensors load strictly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import LayerNorm32


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel dim (dim 1) of a (B, C, *spatial) tensor, in float32, affine, eps 1e-5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def _conv(cin: int, cout: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, padding=1)


def pixel_shuffle_3d(x: torch.Tensor, r: int = 2) -> torch.Tensor:
    """(B, r³·C, H, W, D) -> (B, C, rH, rW, rD) with out[b, c, rh+i, rw+j, rd+k] = in[b, r³c + r²i + rj + k, h, w, d]."""
    b, c8, h, w, d = x.shape
    c = c8 // r ** 3
    x = x.reshape(b, c, r, r, r, h, w, d).permute(0, 1, 5, 2, 6, 3, 7, 4)  # (b, c, h, i, w, j, d, k)
    return x.reshape(b, c, h * r, w * r, d * r)


class ResBlock3d(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))); channels unchanged, so the skip is the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm32(channels, eps=1e-5)
        self.norm2 = ChannelLayerNorm32(channels, eps=1e-5)
        self.conv1 = _conv(channels, channels)
        self.conv2 = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(h))) + x


class UpsampleBlock3d(nn.Module):
    """Conv3d(cin -> 8·cout) then a 3-D pixel shuffle by 2 (spatial size doubles)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _conv(cin, cout * 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureDecoder(nn.Module):
    """z (B, latent_channels, R, R, R) -> logits (B, out_channels, R·2^(len(channels)-1), ...).

    Released config: latent 8, channels [512, 128, 32], 2 res blocks per stage and 2 in the middle: 16³ -> 64³.
    Weights stay float32. With use_fp16 on CUDA, middle_block + blocks (the published "torso") run under float16
    autocast, while input_layer and out_layer run in float32 and the norms compute in float32 (trellis §6, §11).
    """

    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int, channels: list[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        if norm_type != "layer":  # the released decoder and the golden case use ChannelLayerNorm32 only
            raise NotImplementedError(f"norm_type {norm_type!r}")
        self.use_fp16 = use_fp16
        self.input_layer = _conv(latent_channels, channels[0])
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0]) for _ in range(num_res_blocks_middle)])
        blocks: list[nn.Module] = []
        for i, ch in enumerate(channels):
            blocks += [ResBlock3d(ch) for _ in range(num_res_blocks)]
            if i < len(channels) - 1:
                blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(ChannelLayerNorm32(channels[-1], eps=1e-5), nn.SiLU(),
                                       _conv(channels[-1], out_channels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(z)
        half = self.use_fp16 and h.is_cuda and h.dtype == torch.float32
        if half:  # published: activations cast to float16 before the torso, so residual sums are float16 too
            h = h.half()
        with torch.autocast("cuda", dtype=torch.float16) if half else contextlib.nullcontext():
            h = self.middle_block(h)
            for block in self.blocks:
                h = block(h)
        return self.out_layer(h.to(z.dtype))  # out_layer back in the input (float32) precision


def occupancy_coords(logits: torch.Tensor) -> torch.Tensor:
    """Pipeline occupancy rule: argwhere(logits > 0) as int32 [batch, x, y, z], row-major (lexicographic) order."""
    return torch.argwhere(logits > 0)[:, [0, 2, 3, 4]].int()
