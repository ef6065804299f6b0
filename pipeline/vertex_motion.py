"""The Gaussians' motion carried back to the vertices of the mesh they were sampled from.

    d = vertex_displacements(vertices, gaussian_xyz, delta_xyz)                 # (T, V, 3), same frame as the inputs
    d = mesh_displacement(mesh_canonical, azimuth_deg, canonical_xyz, delta_xyz, vertices)   # (T, V, 3), mesh units

The transfer is the mesh-guided KNN interpolation of training (utils/pointcloud.interpolate_displacements, which
utils/losses.mesh_guided_xyz_loss and the oracle use from mesh points to Gaussians) with the roles swapped: each vertex
takes the displacements of its k nearest canonical Gaussian centres, weighted by exp(-beta d² / r²) with r² their mean
squared distance, at the motion VAE's k = 8 and beta = 7. The same kernel both ways means no new smoothing scale to
choose, and the kernel's radius follows the local spacing of the points it reads from: with the surface sampled evenly
(pipeline/mesh_canonical.py) it reaches about 1.6 sample spacings, so parts further apart than that do not mix.
A binding through the sampled faces (each vertex averaging the Gaussians on its own faces) would follow topology
instead of distance, but would leave a vertex whose faces drew no sample without motion; the KNN has no such hole.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.alignment import rotation_z
from pipeline.mesh_canonical import MeshCanonical
from utils.pointcloud import interpolate_displacements

KNN_K, KNN_BETA = 8, 7.0   # the motion VAE's (configs: motion_vae.knn_k, beta)


@torch.no_grad()
def vertex_displacements(vertices, gaussian_xyz, delta_xyz, k: int = KNN_K, beta: float = KNN_BETA) -> torch.Tensor:
    """Vertices (V, 3), canonical Gaussian centres (N, 3) and their displacements per frame (T, N, 3), all in one
    frame -> vertex displacements (T, V, 3) in that frame (module docstring)."""
    xyz = torch.as_tensor(gaussian_xyz, dtype=torch.float64)
    delta = torch.as_tensor(delta_xyz, dtype=torch.float64).to(xyz.device)
    anchors = torch.as_tensor(np.asarray(vertices, np.float64)).to(xyz.device)
    return interpolate_displacements(anchors[None], xyz[None], (xyz + delta)[None], k=k, beta=beta)[0]


def mesh_displacement(canonical: MeshCanonical, azimuth_deg: float, canonical_xyz, delta_xyz,
                      vertices) -> np.ndarray:
    """Vertex displacements (T, V, 3) in the mesh's own frame and units, for vertices (V, 3) of that frame, from the
    canonical Gaussians the models saw (canonical_xyz (N, 3): the mesh's samples normalised and then turned by
    `azimuth_deg` about Z to match the video) and their Δxyz (T, N, 3). The vertices are moved into the Gaussians'
    frame, the motion interpolated there, then turned back and scaled to the mesh's units."""
    turn = rotation_z(azimuth_deg, torch.float64).numpy()
    model = canonical.to_model(vertices) @ turn.T
    d = vertex_displacements(model, canonical_xyz.detach().cpu(), delta_xyz.detach().cpu()).numpy()
    return canonical.extent * (d @ turn)   # row vectors: d @ R = (R^T d^T)^T, the inverse turn
