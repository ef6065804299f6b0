"""The DiT's attention shapes at paper scale: SDPA's default kernel against models/attention_kernel.py (bf16, CUDA).

    python benchmarks/bench_attention.py            # forward, and forward + backward, median ms per call

Each call is captured in a CUDA graph and replayed, so the figures are GPU time without Python launch overhead
(which torch.compile and CUDA graphs remove in the models too).

Shapes (batch, queries, keys, heads, head width) for the inference forward (T=32, batch 1) and the training step
(T=24, batch 2): spatial, temporal, image and static cross-attention, and the static cross-attention in its low-rank
form (models.attention.low_rank_cross_attention: every head's queries against the 14-d inputs padded to 16).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from models.attention_kernel import fused_attention
from timing import measure

SHAPES = {  # name: (batch, queries, keys, heads, head width)
    "spatial T32": (32, 512, 512, 16, 32), "temporal T32": (512, 32, 32, 16, 32),
    "image T32": (32, 512, 1370, 16, 32), "static T32": (1, 16384, 4096, 16, 32),
    "static low-rank T32": (1, 262144, 4096, 1, 16),
    "spatial B2 T24": (48, 512, 512, 16, 32), "temporal B2 T24": (1024, 24, 24, 16, 32),
    "image B2 T24": (48, 512, 1370, 16, 32), "static B2 T24": (2, 12288, 4096, 16, 32),
}


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def graphed(run):
    """run() captured in a CUDA graph after warm-up calls (Triton autotuning, cuDNN plans): returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def main():
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| shape (B, Lq, Lk, H, D) | SDPA fwd | ours fwd | ratio | SDPA fwd+bwd | ours fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, (b, lq, lk, h, d) in SHAPES.items():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, lq, 3, h, d, device=device, generator=g, dtype=torch.bfloat16)[:, :, 0]
        kv = torch.randn(b, lk, 2, h, d, device=device, generator=g, dtype=torch.bfloat16)
        k, v = kv[:, :, 0], kv[:, :, 1]
        grad = torch.randn(b, lq, h, d, device=device, generator=g, dtype=torch.bfloat16)
        row = []
        for mode in ("fwd", "bwd"):
            for fn in (sdpa, fused_attention):
                if mode == "fwd":
                    run = lambda: fn(q, k, v)
                else:
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                    run = lambda: torch.autograd.grad(fn(*leaves), leaves, grad)
                row.append(measure(graphed(run), 20, device)[0] * 1e3)
        print(f"| {name} ({b}, {lq}, {lk}, {h}, {d}) | {row[0]:.3f} | {row[1]:.3f} | {row[1] / row[0]:.2f} "
              f"| {row[2]:.3f} | {row[3]:.3f} | {row[3] / row[2]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
