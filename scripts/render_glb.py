"""A strip of frames of an animated glTF / GLB (such as inference's animated.glb), rendered on the CPU: a quick look at
an animated mesh without Blender.

    python scripts/render_glb.py outputs/demo/obj_00213/animated.glb --out strip.png --frames 6 --azimuth 30

The animation is evaluated at --frames times spread over it (data_rendering/gltf_import.py: morph targets, skins,
node animation), framed by the box around all of them, and rendered with its texture or colours
(data_rendering/rasterizer.py, Lambert shading) from one orbit camera on white, frame times labelled.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_rendering.gltf_import import load_animated_gltf
from data_rendering.rasterizer import render_mesh
from pipeline.outputs import label_patch
from utils import cli
from utils.cameras import orbit_cameras
from utils.fileio import atomic_write


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("glb", type=Path, help="an animated .glb or .gltf")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--azimuth", type=float, default=30.0, help="degrees about the up axis")
    ap.add_argument("--elevation", type=float, default=15.0)
    ap.add_argument("--size", type=int, default=256, help="pixels per frame")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if not args.glb.is_file():
        raise cli.InputError(f"{args.glb}: no such file")
    try:
        seq, meta = load_animated_gltf(args.glb, num_frames=args.frames)
    except ValueError as e:  # load_animated_gltf names the file and what is wrong with it
        raise cli.InputError(str(e)) from None
    lo, hi = seq.vertices.reshape(-1, 3).min(0), seq.vertices.reshape(-1, 3).max(0)
    verts = (seq.vertices - (lo + hi) / 2) / float((hi - lo).max())       # all frames in the unit cube
    ext, K = orbit_cameras(np.array([args.azimuth]), args.elevation, 2.0, 40.0)
    cells = []
    for t, v in enumerate(verts):
        rgba = render_mesh(v, seq.faces, ext[0].numpy(), K[0].numpy(), args.size, args.size, vertex_colors=seq.colors,
                           uvs=seq.uvs, texture=seq.texture)["rgba"][0]
        rgb = (rgba[..., :3] * rgba[..., 3:] + 1 - rgba[..., 3:]).clip(0, 1)
        cell = (rgb * 255 + 0.5).astype(np.uint8)
        patch = label_patch(f"t={meta['times'][t]:.2f} s", args.size)
        cell[: patch.shape[0], : patch.shape[1]] = patch
        cells.append(cell)
    strip = np.concatenate(cells, axis=1)
    atomic_write(args.out, lambda tmp: Image.fromarray(strip).save(tmp, format="PNG"), overwrite=args.overwrite)
    print(f"{args.out}: {len(cells)} frames of {args.glb} ({meta['num_vertices']} vertices, "
          f"{meta['num_morph_targets']} morph targets)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
