"""The TRELLIS image-to-3D canonical stage at the released configs with random weights (models/trellis/).

    python benchmarks/bench_trellis.py                          # stage + sparse conv, on the default device
    python benchmarks/bench_trellis.py --cases stage --voxels 10000 20000 40000 --autocast none fp16

stage: DINOv2 ViT-L/14-reg conditioning of one 518² image, then ImageTo3D (SS flow 12 steps cfg 7.5, SS decoder,
SLat flow 12 steps cfg 3, both with the [0.5, 1] guidance interval: 22 model calls each; static-VAE Gaussian decode).
Random weights decode an arbitrary occupancy, so the SS decoder's logits (computed and timed) are replaced by a sphere
shell of a given voxel count: real objects occupy roughly 10k-40k of the 64³ cells, mostly on their surface.
sparse_conv: the submanifold 3×3×3 conv against a dense conv3d over the whole 64³ grid at the same channels.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from bench_models import randomise, shell_voxels
from models.sparse import SparseVoxels
from models.static_vae import StaticVAE
from models.trellis.image_to_3d import ImageTo3D
from models.trellis.slat_flow import SLatFlowModel
from models.trellis.sparse_conv import SparseConv3d, neighbour_map
from models.trellis.ss_decoder import SparseStructureDecoder
from models.trellis.ss_flow import SparseStructureFlowModel
from timing import measure, tests_module
from utils.config import load_config

load_manifest = tests_module("reference").load_manifest

RELEASED = {SparseStructureFlowModel: "trellis_ss_flow_img_dit_L_16l8_fp16",
            SparseStructureDecoder: "trellis_ss_dec_conv3d_16l8_fp16",
            SLatFlowModel: "trellis_slat_flow_img_dit_L_64l8p2_fp16"}


def released(cls, device):
    """The network at its released config (fp16 torso as stored), random weights, built directly on the device."""
    cfg = load_manifest(RELEASED[cls])["config"]
    with torch.device(device):
        model = cls(**cfg)
    return randomise(model).eval()


class ShellOccupancy(torch.nn.Module):
    """Runs the real decoder (so its time counts), then returns logits that are positive exactly on `coords`."""

    def __init__(self, decoder, coords):
        super().__init__()
        self.decoder, self.coords = decoder, coords

    def forward(self, z):
        logits = self.decoder(z)
        out = torch.full_like(logits, -1.0)
        c = self.coords.long()
        out[0, 0, c[:, 0], c[:, 1], c[:, 2]] = 1.0
        return out


def dinov2_vitl14_reg(device):
    """DINOv2 ViT-L/14 with registers at its released shape, random weights, through our extractor."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from utils.image_features import get_extractor
    cfg = Dinov2WithRegistersConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096, patch_size=14, image_size=518, num_register_tokens=4)
    with tempfile.TemporaryDirectory() as tmp:
        Dinov2WithRegistersModel(cfg).save_pretrained(tmp)
        return get_extractor("dinov2_vitl14_reg", device=device, weights=tmp)


def case_stage(args, device):
    ss_flow, ss_dec, slat_flow = (released(c, device) for c in RELEASED)
    vae_cfg = load_config(ROOT / "configs/vae.yml").static_vae
    with torch.device(device):
        static_vae = randomise(StaticVAE.from_config(vae_cfg)).eval()
    extractor = dinov2_vitl14_reg(device)
    image = torch.rand(1, 3, 518, 518)
    weights_gib = sum(p.numel() * p.element_size() for m in (ss_flow, ss_dec, slat_flow, static_vae, extractor.model)
                      for p in m.parameters()) / 2**30
    print(f"weights on the device: {weights_gib:.2f} GiB (DINOv2 float32, TRELLIS fp16 torsos, static VAE float32)")
    print("| voxels | autocast | DINOv2 (ms) | SS flow (ms) | SS decode (ms) | SLat flow (ms) | Gaussian decode (ms) "
          "| stage total (ms) | with DINOv2 (ms) | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|")
    for autocast in args.autocast:
        dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[autocast]
        for n in args.voxels:
            coords = shell_voxels(n, 64, device)
            stage = ImageTo3D(ss_flow, ShellOccupancy(ss_dec, coords), slat_flow, static_vae,
                              torch.zeros(8), torch.ones(8), autocast_dtype=dtype)
            records = []
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

            def run():
                sync()
                t0 = time.perf_counter()
                tokens = extractor.trellis_condition(image)
                sync()
                t1 = time.perf_counter()
                _, info = stage(tokens, seed=0)
                records.append((t1 - t0, info["seconds"], info["nfe"]))
                assert info["num_voxels"] == n
            measure(run, args.repeats, device, warmup=1)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            timed = records[1:]  # the first record is the warm-up call
            med = lambda f: statistics.median(f(r) for r in timed) * 1e3
            parts = [med(lambda r, k=k: r[1][k]) for k in ("ss_flow", "ss_decode", "slat_flow", "gs_decode")]
            total = med(lambda r: sum(r[1].values()))
            print(f"| {n} | {autocast} | {med(lambda r: r[0]):.0f} | " + " | ".join(f"{p:.0f}" for p in parts)
                  + f" | **{total:.0f}** | {med(lambda r: r[0] + sum(r[1].values())):.0f} | {peak:.2f} |", flush=True)
            assert timed[0][2] == {"ss": 22, "slat": 22}, timed[0][2]


def case_sparse_conv(args, device):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print("| active voxels (of 64³) | channels | sparse fwd (ms) | dense fwd (ms) | sparse fwd+bwd (ms) "
          "| dense fwd+bwd (ms) | neighbour map (ms) |\n|---|---|---|---|---|---|---|")
    for n in args.voxels:
        for ch in args.channels:
            coords = shell_voxels(n, 64, device)
            x = SparseVoxels.from_list([coords], [torch.randn(n, ch, device=device, dtype=dtype)])
            conv = SparseConv3d(ch, ch).to(device, dtype)
            dense = torch.nn.Conv3d(ch, ch, 3, padding=1).to(device, dtype)
            grid = torch.zeros(1, ch, 64, 64, 64, device=device, dtype=dtype)
            c = coords.long()
            grid[0, :, c[:, 0], c[:, 1], c[:, 2]] = x.feats.T
            xs = x.replace(x.feats.clone().requires_grad_())
            gd = grid.clone().requires_grad_()
            with torch.no_grad():
                t_sf, _ = measure(lambda: conv(x), args.repeats, device)
                t_df, _ = measure(lambda: dense(grid), args.repeats, device)
            t_sb, _ = measure(lambda: conv(xs).feats.float().sum().backward(), args.repeats, device)
            t_db, _ = measure(lambda: dense(gd).float().sum().backward(), args.repeats, device)
            fresh = lambda: neighbour_map(x.coords.clone())  # a new tensor each call: no cache hit
            t_map, _ = measure(fresh, args.repeats, device)
            print(f"| {n} | {ch} | {t_sf * 1e3:.2f} | {t_df * 1e3:.2f} | {t_sb * 1e3:.2f} | {t_db * 1e3:.2f} "
                  f"| {t_map * 1e3:.2f} |", flush=True)
            with torch.no_grad():  # the comparison is only fair if the two compute the same thing
                dense.weight.copy_(conv.conv.weight.permute(0, 4, 1, 2, 3))
                dense.bias.copy_(conv.conv.bias)
                ref = dense(grid.float() if dtype == torch.float32 else grid)[0, :, c[:, 0], c[:, 1], c[:, 2]].T
                err = (conv(x).feats.float() - ref.float()).abs().max().item()
            assert err < (5e-2 if dtype == torch.float16 else 1e-4), err


CASES = {"stage": case_stage, "sparse_conv": case_sparse_conv}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--voxels", type=int, nargs="+", default=[20_000])
    ap.add_argument("--channels", type=int, nargs="+", default=[128], help="sparse_conv: in = out channels")
    ap.add_argument("--autocast", nargs="+", default=["none"], choices=["none", "fp16", "bf16"],
                    help="stage: autocast around the networks (the released torsos are fp16 either way)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; median of {args.repeats}")
    for c in args.cases:
        CASES[c](args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
