"""The motion stage with the DiT compiled into CUDA graphs gives the eager motion stage's result, on a CUDA GPU."""
import dataclasses

import pytest
import torch

from models.dit import DiT
from models.dpm_solver import SamplerConfig
from models.motion_vae import MotionVAE
from pipeline.animate import MotionStage
from utils.config import load_config
from utils.gaussians import Gaussians

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_motion_stage_matches_eager():
    """Float32 on both sides: CUDA graphs and inductor's fusions may reorder sums, nothing more."""
    eager, canonical, tokens = tiny_stage_inputs(compile=False)
    compiled, _, _ = tiny_stage_inputs(compile=True)  # the same seeded weights
    want = eager(canonical, tokens, seed=3)
    got = compiled(canonical, tokens, seed=3)
    assert got.nfe == want.nfe == 6
    assert (got.latents - want.latents).abs().max() <= 1e-3 * want.latents.abs().max()
    assert (got.delta - want.delta).abs().max() <= 1e-3 * want.delta.abs().max()


CACHED_RUN = """
import sys, torch
from torch._dynamo.utils import counters
sys.path.insert(0, "tests")
from test_animate_gpu import tiny_stage_inputs
stage, canonical, tokens = tiny_stage_inputs(compile=True)
delta = stage(canonical, tokens, seed=3).delta
torch.save({"delta": delta.cpu(), "hits": counters["inductor"]["fxgraph_cache_hit"]}, sys.argv[1])
"""


def tiny_stage_inputs(compile: bool):
    """The tiny motion stage of these tests, seeded: the same weights, canonical and tokens in any call or process."""
    cfg = load_config("configs/tiny/diffusion.yml")
    torch.manual_seed(0)
    dit, vae = DiT(**cfg.model), MotionVAE(**cfg.motion_vae)
    with torch.no_grad():
        for p in dit.parameters():  # the zero-initialised output layers too, so the model output is not zero
            p.normal_(0, 0.05)
    stats = {"deformation_mean": torch.zeros(8), "deformation_std": torch.full((8,), 0.1),
             "static_mean": torch.zeros(14), "static_std": torch.ones(14)}
    n = 2000
    canonical = Gaussians(torch.rand(n, 3) - 0.5, torch.rand(n, 3), torch.zeros(n, 1), torch.full((n, 3), -4.5),
                          torch.randn(n, 4)).to("cuda")
    tokens = torch.randn(8, 37, cfg.model.image_cond_channels, device="cuda")
    sampling = dataclasses.replace(SamplerConfig.from_config(cfg.sampling), method="multistep", steps=6)
    stage = MotionStage(dit.cuda(), vae.cuda(), stats, sampling, cfg.data.num_static_cond, compile=compile)
    return stage, canonical, tokens


def test_a_second_process_loads_the_compiled_dit_from_the_cache(tmp_path):
    """Two processes compile the same motion stage with one TORCHINDUCTOR_CACHE_DIR: the second finds its graphs in
    the cache (FX graph cache hits), and both give the eager result."""
    import os
    import subprocess
    import sys
    stage, canonical, tokens = tiny_stage_inputs(compile=False)
    want = stage(canonical, tokens, seed=3).delta.cpu()
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}.pt"
        subprocess.run([sys.executable, "-c", CACHED_RUN, str(out)], env=env, check=True, timeout=900)
        runs.append(torch.load(out))
    assert runs[0]["hits"] == 0 < runs[1]["hits"]
    for r in runs:
        assert (r["delta"] - want).abs().max() <= 1e-3 * want.abs().max()
