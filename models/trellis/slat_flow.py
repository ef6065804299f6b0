"""TRELLIS structured-latent (SLat) flow model (docs/trellis.md §8): a U-shaped sparse network around a DiT.

Sparse res blocks at the 64³ voxel level, one 2× sparse downsampling to the occupied 2×2×2 cells (32³), 24 modulated
cross blocks over those cells, then res blocks that upsample back to the input sites with [h, skip] concatenations.
Parameter names equal the released checkpoint `slat_flow_img_dit_L_64l8p2_fp16`, whose safetensors load strictly.

Per-object attention: the dense `ModulatedTransformerCrossBlock` runs once per batch element on that element's
contiguous rows (exact; nothing is padded or masked, and GVFDiffusion's batch is 1, so it is a single call).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.sparse import SparseVoxels
from models.trellis.blocks import AbsolutePositionEmbedder, LayerNorm32, ModulatedTransformerCrossBlock, TimestepEmbedder
from models.trellis.sparse_conv import DownsampleMap, SparseConv3d, downsample_map, sparse_downsample, sparse_upsample


class SparseResBlock3d(nn.Module):
    """Time-modulated sparse res block. Keys: norm1.*, conv1.conv.*, conv2.conv.*, emb_layers.1.*, and
    skip_connection.* when channels != out_channels (norm2 has no affine, hence no keys)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        if downsample and upsample:
            raise ValueError("SparseResBlock3d: downsample and upsample are exclusive")
        self.downsample, self.upsample = downsample, upsample
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels, 3)
        self.conv2 = SparseConv3d(out_channels, out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.skip_connection = nn.Linear(channels, out_channels) if channels != out_channels else nn.Identity()

    def forward(self, x: SparseVoxels, emb: torch.Tensor, dmap: DownsampleMap | None = None) -> SparseVoxels:
        """x (N, channels) features; emb (B, emb_channels); dmap: the map to undo, for an upsampling block."""
        scale, shift = self.emb_layers(emb).to(x.feats.dtype).chunk(2, dim=1)  # scale FIRST (trellis §13.5)
        # Re-sample before anything else; the skip below sees the re-sampled x (trellis §13.6).
        if self.downsample:
            x, _ = sparse_downsample(x, 2)
        elif self.upsample:
            x = sparse_upsample(x, dmap)
        b = x.coords[:, 0].long()                                   # per-row batch element for the modulation
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = F.silu(self.norm2(h.feats) * (1 + scale[b]) + shift[b])
        h = self.conv2(x.replace(h)).feats
        return x.replace(h + self.skip_connection(x.feats))


class SLatFlowModel(nn.Module):
    """Takes the released constructor arguments (`ckpts/slat_flow_img_dit_L_64l8p2_fp16.json`).

    use_fp16 stores the Linear and sparse-conv parameters of input_blocks, blocks and out_blocks in float16 (norm
    affines, q/k gammas, t_embedder, input_layer and out_layer stay float32), as the released file does; the torso
    then runs in float16. `model.float()` gives a float32 model.
    """

    def __init__(self, resolution: int = 64, in_channels: int = 8, model_channels: int = 1024,
                 cond_channels: int = 1024, out_channels: int = 8, num_blocks: int = 24, num_heads: int | None = 16,
                 num_head_channels: int = 64, mlp_ratio: float = 4, patch_size: int = 2, num_io_res_blocks: int = 2,
                 io_block_channels: list[int] | None = (128,), pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, use_skip_connection: bool = True, share_mod: bool = False,
                 qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        super().__init__()
        io = list(io_block_channels or [])
        if pe_mode != "ape" or share_mod or 2 ** len(io) != patch_size:
            raise ValueError(f"SLatFlowModel: need pe_mode='ape', share_mod=False and patch_size == "
                             f"2**len(io_block_channels) (got {pe_mode!r}, {share_mod}, {patch_size}, {io})")
        num_heads = num_heads or model_channels // num_head_channels
        self.resolution, self.use_checkpoint, self.use_skip_connection = resolution, use_checkpoint, use_skip_connection
        self.t_embedder = TimestepEmbedder(model_channels)
        self.pos_embedder = AbsolutePositionEmbedder(model_channels, 3)   # no state: computed on the coarse coords
        self.input_layer = nn.Linear(in_channels, io[0] if io else model_channels)
        # Per level: (num_io_res_blocks - 1) plain blocks, then one block that changes width and downsamples 2×.
        self.input_blocks = nn.ModuleList()
        for chs, nxt in zip(io, io[1:] + [model_channels]):
            self.input_blocks.extend(SparseResBlock3d(chs, model_channels) for _ in range(num_io_res_blocks - 1))
            self.input_blocks.append(SparseResBlock3d(chs, model_channels, nxt, downsample=True))
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(model_channels, cond_channels, num_heads, mlp_ratio, qk_rms_norm,
                                           qk_rms_norm_cross)
            for _ in range(num_blocks))
        # Mirror image: an upsampling block, then plain ones; inputs are [h, skip] when skips are on (2× width).
        k = 2 if use_skip_connection else 1
        self.out_blocks = nn.ModuleList()
        for chs, prev in zip(reversed(io), [model_channels] + io[::-1][:-1]):
            self.out_blocks.append(SparseResBlock3d(prev * k, model_channels, chs, upsample=True))
            self.out_blocks.extend(SparseResBlock3d(chs * k, model_channels, chs) for _ in range(num_io_res_blocks - 1))
        self.out_layer = nn.Linear(io[0] if io else model_channels, out_channels)
        if use_fp16:
            self.convert_to_fp16()

    @property
    def torso(self) -> list[nn.Module]:
        return [self.input_blocks, self.blocks, self.out_blocks]

    def convert_to_fp16(self) -> None:
        """The released dtype layout: Linear and sparse-conv parameters of the torso in float16, the rest float32."""
        for part in self.torso:
            for m in part.modules():
                if isinstance(m, (nn.Linear, SparseConv3d)):
                    m.half()

    def forward(self, x: SparseVoxels, t: torch.Tensor, cond: torch.Tensor) -> SparseVoxels:
        """x: noisy SLat (N, in_channels) on the 64³ sites, rows grouped by batch element; t (B,) model time
        (1000 · flow time); cond (B, L, cond_channels). Returns the velocity (N, out_channels) on x's sites and rows."""
        dtype = self.blocks[0].adaLN_modulation[1].weight.dtype if len(self.blocks) else x.feats.dtype
        h = x.replace(self.input_layer(x.feats.to(self.input_layer.weight.dtype)).to(dtype))
        t_emb = self.t_embedder(t).to(dtype)
        cond = cond.to(dtype)

        skips, maps = [], []
        for blk in self.input_blocks:
            if blk.downsample:
                maps.append(downsample_map(h.coords, 2))   # cached: the same map the block's downsample uses
            h = blk(h, t_emb)
            skips.append(h.feats)

        h = h.replace(h.feats + self.pos_embedder(h.coords[:, 1:].float()).to(dtype))
        # Each object attends only to its own cells: run the dense block on each batch element's contiguous rows.
        sizes = torch.bincount(h.coords[:, 0].long(), minlength=len(t)).tolist()
        feats = list(h.feats.split(sizes))
        for blk in self.blocks:
            for b, f in enumerate(feats):
                args = (f[None], t_emb[b:b + 1], cond[b:b + 1])
                if self.use_checkpoint and self.training and torch.is_grad_enabled():
                    feats[b] = checkpoint(blk, *args, use_reentrant=False)[0]
                else:
                    feats[b] = blk(*args)[0]
        h = h.replace(torch.cat(feats))

        for blk in self.out_blocks:
            if self.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skips.pop()], dim=1))   # [h, skip] order (trellis §13.9)
            h = blk(h, t_emb, maps.pop() if blk.upsample else None)

        f = F.layer_norm(h.feats.to(x.feats.dtype), h.feats.shape[-1:], eps=1e-5)   # no affine, eps 1e-5
        return x.replace(self.out_layer(f.to(self.out_layer.weight.dtype)).to(x.feats.dtype))
