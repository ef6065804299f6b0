"""Paper-scale model benchmarks (random weights, bf16 autocast): DiT forward, motion-VAE decode, and training steps.

    python benchmarks/bench_models.py                      # all cases on the default device
    python benchmarks/bench_models.py --cases dit_forward vae_decode --gaussians 200000 --frames 32
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.dit import DiT
from models.motion_vae import MotionVAE
from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from timing import measure
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def dit_inputs(cfg, batch, frames, device):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g)
    n = cfg.resolution
    return (r(batch, frames, n, cfg.in_channels), torch.rand(batch, device=device, generator=g) * 1000,
            r(batch, frames, 1370, cfg.image_cond_channels), r(batch, 4096, 14), r(batch, n, 3) * 0.3)


COMPILE = False


def timed(run, args, device):
    """measure(), then with --profile a kernel table of three more calls (where the GPU time goes)."""
    result = measure(run, args.repeats, device)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                run()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
    return result


def randomise(model):
    """Random weights everywhere (the zero-initialised layers too), so no branch is trivially zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def maybe_compile(model):
    return torch.compile(model, mode=COMPILE) if COMPILE else model


def case_dit_forward(args, device):
    cfg = load_config(ROOT / "configs/diffusion.yml").model
    model = maybe_compile(randomise(DiT(**cfg)).to(device).eval())
    x = dit_inputs(cfg, 1, args.frames, device)

    def run():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            model(*x)
    return f"DiT forward, T={args.frames}, batch 1", *timed(run, args, device)


def case_dit_train(args, device):
    cfg = load_config(ROOT / "configs/diffusion.yml").model
    cfg.recompute_image_attn = args.recompute_image_attn
    model = randomise(DiT(**cfg)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    model = maybe_compile(model)
    x = dit_inputs(cfg, 2, 24, device)

    def run():
        with torch.autocast(device.type, torch.bfloat16):
            loss = (model(*x).float() - x[0]).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    label = "DiT training step (fwd+bwd+AdamW), T=24, batch 2" + (", image attention recomputed"
                                                                  if cfg.recompute_image_attn else ", image attention kept")
    return label, *timed(run, args, device)


def vae_inputs(cfg, batch, frames, gaussians, device):
    g = torch.Generator(device=device).manual_seed(0)
    gs = torch.cat([torch.rand(batch, gaussians, 3, device=device, generator=g) - 0.5,
                    torch.randn(batch, gaussians, 11, device=device, generator=g) * 0.1], -1)
    static = torch.rand(batch, cfg.num_inputs, 3, device=device, generator=g) - 0.5
    delta = torch.randn(batch, frames, cfg.num_inputs, 3, device=device, generator=g) * 0.02
    return static, delta, gs


def case_vae_decode(args, device):
    cfg = load_config(ROOT / "configs/vae.yml").model
    model = randomise(MotionVAE(**cfg)).to(device).eval()
    _, _, gs = vae_inputs(cfg, 1, 1, args.gaussians, device)
    z = torch.randn(1, args.frames, cfg.num_latents, cfg.latent_dim, device=device)
    decode = maybe_compile(model.decode)

    def run():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            decode(z, gs)
    return f"motion-VAE decode, {args.gaussians} Gaussians x {args.frames} frames", *timed(run, args, device)


def case_vae_train(args, device):
    cfg = load_config(ROOT / "configs/vae.yml").model
    model = randomise(MotionVAE(**cfg, use_checkpoint=True)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    static, delta, gs = vae_inputs(cfg, 2, args.train_frames, args.train_gaussians, device)

    def run():
        with torch.autocast(device.type, torch.bfloat16):
            out, enc = model(static, delta, gs)
            loss = out.float().abs().mean() + 1e-6 * enc.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (f"motion-VAE training step (encode+decode+bwd+AdamW), batch 2, {args.train_frames} frame(s), "
            f"{args.train_gaussians} Gaussians"), *timed(run, args, device)


def shell_voxels(count: int, resolution: int, device) -> torch.Tensor:
    """About `count` voxels on a sphere shell: the surface-like occupancy of real objects (ragged swin windows)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = ((grid + 0.5 - resolution / 2).float().norm(dim=-1))
    order = torch.argsort((r - 0.44 * resolution).abs())
    return grid[order[:count]].to(device)


def _static_vae(args, device):
    cfg = load_config(ROOT / "configs/vae.yml").static_vae.backbones.vae.args
    model = randomise(StaticVAE(**cfg)).to(device).eval()
    coords = shell_voxels(args.voxels, cfg.resolution, device)
    x = SparseVoxels.from_list([coords], [torch.randn(len(coords), cfg.in_channels, device=device)])
    return model, x


def case_static_encode(args, device):
    model, x = _static_vae(args, device)

    def run():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            model.encode(x)
    return f"static-VAE encode, 64³, {args.voxels} voxels", *timed(run, args, device)


def case_static_decode(args, device):
    model, x = _static_vae(args, device)
    z = x.replace(torch.randn(len(x.feats), 8, device=device))

    def run():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            model.to_gaussians(model.decode(z))
    return f"static-VAE decode to Gaussians, 64³, {args.voxels} voxels", *timed(run, args, device)


CASES = {"dit_forward": case_dit_forward, "vae_decode": case_vae_decode, "dit_train": case_dit_train, "vae_train": case_vae_train,
         "static_encode": case_static_encode, "static_decode": case_static_decode}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--frames", type=int, default=32, help="frames for the DiT forward and the VAE decode")
    ap.add_argument("--gaussians", type=int, default=200_000, help="Gaussians for the VAE decode")
    ap.add_argument("--train-frames", type=int, default=1, help="frames per sample in the VAE training step")
    ap.add_argument("--train-gaussians", type=int, default=100_000)
    ap.add_argument("--voxels", type=int, default=20_000, help="active voxels for the static VAE")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    help="torch.compile the models first (optionally with a mode)")
    ap.add_argument("--profile", action="store_true", help="print a kernel table per case (GPU)")
    ap.add_argument("--recompute-image-attn", action=argparse.BooleanOptionalAction, default=True,
                    help="DiT training step: recompute the image cross-attention in the backward (less memory; "
                         "the DiT's default)")
    ap.add_argument("--sdpa", default="auto", choices=["auto", "flash", "cudnn", "efficient"],
                    help="restrict scaled_dot_product_attention to one kernel family")
    args = ap.parse_args()
    global COMPILE
    COMPILE = args.compile
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; bf16 autocast; {f'compiled ({args.compile})' if args.compile else 'eager'}; SDPA {args.sdpa}; "
          f"median of {args.repeats}")
    print("| case | median (ms) | peak memory (GiB) |\n|---|---|---|")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"auto": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], "flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION]}[args.sdpa]
    for c in args.cases:
        with sdpa_kernel(backends):
            label, sec, peak = CASES[c](args, device)
        print(f"| {label} | {sec * 1e3:.1f} | {peak:.2f} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
