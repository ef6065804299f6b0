"""TRELLIS sparse-structure flow transformer (docs/trellis.md §5): a dense DiT over the 16³ latent grid, conditioned
on DINOv2 tokens by cross-attention, predicting the flow velocity. Parameter names equal the released checkpoint
`ss_flow_img_dit_L_16l8_fp16`, whose safetensors load strictly (including the `pos_emb` buffer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.trellis.blocks import AbsolutePositionEmbedder, ModulatedTransformerCrossBlock, TimestepEmbedder


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, R, R, R) -> (B, C p³, R/p, R/p, R/p); the new channel is c p³ + i p² + j p + k for offset (i, j, k)."""
    b, c, *res = x.shape
    x = x.reshape(b, c, res[0] // p, p, res[1] // p, p, res[2] // p, p)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * p**3, *(r // p for r in res))


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    b, cp, *res = x.shape
    x = x.reshape(b, cp // p**3, p, p, p, *res)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, cp // p**3, *(r * p for r in res))


class SparseStructureFlowModel(nn.Module):
    """Takes the released constructor arguments (`ckpts/ss_flow_img_dit_L_16l8_fp16.json`).

    use_fp16 stores the Linear layers of `blocks` in float16 as the released file does; the forward runs the blocks in
    the dtype of their weights (float16 torso with float32 norms, trellis §5), so `model.float()` gives a float32 model.
    """

    def __init__(self, resolution: int = 16, in_channels: int = 8, model_channels: int = 1024,
                 cond_channels: int = 1024, out_channels: int = 8, num_blocks: int = 24, num_heads: int | None = 16,
                 num_head_channels: int = 64, mlp_ratio: float = 4, patch_size: int = 1, pe_mode: str = "ape",
                 use_fp16: bool = False, use_checkpoint: bool = False, share_mod: bool = False,
                 qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        super().__init__()
        if pe_mode != "ape" or share_mod:
            raise ValueError(f"SparseStructureFlowModel: only pe_mode='ape' and share_mod=False are supported "
                             f"(got {pe_mode!r}, {share_mod})")
        num_heads = num_heads or model_channels // num_head_channels
        self.resolution, self.patch_size, self.use_checkpoint = resolution, patch_size, use_checkpoint
        self.t_embedder = TimestepEmbedder(model_channels)
        # The APE of the token grid is a persistent buffer: the released file carries it and it is loaded from there.
        grid = resolution // patch_size
        axis = torch.arange(grid, dtype=torch.float32)
        coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # row x g² + y g + z
        self.register_buffer("pos_emb", AbsolutePositionEmbedder(model_channels, 3)(coords))
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
        self.blocks = nn.ModuleList(
            ModulatedTransformerCrossBlock(model_channels, cond_channels, num_heads, mlp_ratio, qk_rms_norm,
                                           qk_rms_norm_cross)
            for _ in range(num_blocks))
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """The released dtype layout: Linear layers inside `blocks` in float16; norms, gammas and the rest float32."""
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                m.half()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, in, R, R, R) noisy latent; t (B,) model time (1000 · flow time); cond (B, L, cond_channels).
        Returns the velocity (B, out, R, R, R) in x's dtype."""
        b, _, *res = x.shape
        h = patchify(x, self.patch_size).flatten(2).transpose(1, 2)  # (B, N, C p³), token index x*R² + y*R + z
        h = self.input_layer(h) + self.pos_emb[None]
        t_emb = self.t_embedder(t)
        dtype = self.blocks[0].adaLN_modulation[1].weight.dtype  # float16 torso under use_fp16
        h, t_emb, cond = h.to(dtype), t_emb.to(dtype), cond.to(dtype)
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, t_emb, cond, use_reentrant=False)
            else:
                h = blk(h, t_emb, cond)
        h = F.layer_norm(h.to(x.dtype), h.shape[-1:], eps=1e-5)  # no affine, eps 1e-5 (not the blocks' 1e-6)
        h = self.out_layer(h.to(self.out_layer.weight.dtype)).to(x.dtype)
        h = h.transpose(1, 2).reshape(b, -1, *(r // self.patch_size for r in res))
        return unpatchify(h, self.patch_size)
