"""utils/fps_cuda.py picks exactly the reference's points (utils/pointcloud.farthest_point_sample on the CPU): on a
CUDA GPU through its CUDA graph, and, where Triton is installed without a GPU, kernel by kernel in Triton's CPU
interpreter (a subprocess: TRITON_INTERPRET must be set before Triton is imported)."""
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch

from utils.pointcloud import farthest_point_sample

CASES = """
import torch
from utils.fps_cuda import farthest_point_sample_cuda
from utils.pointcloud import farthest_point_sample

def cases(device):
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(7.0)] * 3, indexing="ij"), -1).view(-1, 3)
    yield torch.randn(3000, 3, generator=g), 300, 0            # across several blocks
    yield torch.cat([grid, grid]) * 0.1, 500, 5                  # exact ties and duplicates, another start
    yield torch.rand(1500, 3, generator=g) - 0.5, 1500, 0        # every point, to the last one

def check(device):
    for points, count, start in cases(device):
        want = farthest_point_sample(points[None], count, start=start)[0]
        got = farthest_point_sample_cuda(points.to(device), count, start=start).cpu()
        assert torch.equal(got, want), (count, (got != want).nonzero()[:3])
    print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available() or find_spec("triton") is None, reason="needs Triton (CPU interpreter)")
def test_kernel_picks_the_reference_points_in_the_interpreter():
    code = CASES + "\ncheck('cpu')\n"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_picks_the_reference_points_on_the_gpu():
    namespace = {}
    exec(CASES, namespace)
    namespace["check"]("cuda")
    # The inference shapes: 4096 picks of 160k Gaussians, equal to the CPU reference.
    from utils.fps_cuda import farthest_point_sample_cuda
    points = torch.rand(160_000, 3, generator=torch.Generator().manual_seed(1)) - 0.5
    want = farthest_point_sample(points[None], 4096)[0]
    assert torch.equal(farthest_point_sample_cuda(points.cuda(), 4096).cpu(), want)
