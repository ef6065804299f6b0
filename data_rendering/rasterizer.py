"""CPU triangle-mesh rasterizer for the synthetic 4D training renders (numba, numpy in and out).

Conventions (the same as utils/cameras.py and utils/render.py):
- Cameras: OpenCV world→camera extrinsics (camera looks +Z, +X right, +Y down) and *normalised* intrinsics, turned into
  pixels as ``fx·W, cx·W, fy·H, cy·H``. Pixel (i, j) is sampled at its centre (j + 0.5, i + 0.5): one sample per pixel,
  no antialiasing.
- Coverage: a pixel is covered by a triangle when its centre is inside the projected triangle. Centres exactly on an
  edge follow a half-open rule (the triangle that the centre would enter when nudged by (+ε, +ε²) owns it), and the
  edge functions are evaluated in an order that does not depend on the edge's direction, so a shared edge gives the
  two triangles exactly opposite values: no cracks and no double coverage along shared edges and at shared vertices.
- Visibility: z-buffer on camera depth. Depth, colours and uvs are interpolated perspective-correctly (weights w_i / z_i
  of the screen-space edge functions). Two-sided: no backface culling (the published Blender renders show both sides).
- Near plane: triangles with any vertex closer than ``near`` (camera z) are skipped, not clipped. The synthetic data
  keeps the camera far outside the object (radius 2 around a unit box), so no visible triangle ever crosses it.
- Colour: vertex colours (or 0.7 grey) times the texture sampled bilinearly at (u, 1 − v) in image rows (row 0 = top)
  with repeat wrapping, as MeshSequence stores it; both given → their product (glTF's base colour × COLOR_0).
  "lambert" multiplies by ``ambient + (1 − ambient)·|n·l|`` with n the world face normal (absolute value: two-sided)
  and l the light direction (default a headlight along each camera's optical axis); "flat-none" leaves it unshaded.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

SHADINGS = ("lambert", "flat-none")
DEFAULT_GREY = 0.7  # the colour MeshSequence.frame_colors gives a mesh without colours or texture


# ----------------------------------------------------------------------------------------------- kernels
@njit(cache=True, inline="always")
def _edge(ax, ay, bx, by, orient):
    """Set up the edge a→b of a triangle of orientation ``orient`` (±1) as (base x, base y, dx, dy, sign, owned).

    Its edge function at p is ``sign·(dx·(py − base y) − dy·(px − base x))``, positive inside. The base is always the
    endpoint with the larger y (ties: smaller x), whichever way the triangle runs along the edge, so the neighbour across
    a shared edge computes bit-identical products and only the (exact) sign differs. ``owned`` says whether a centre
    exactly on the edge belongs to this triangle: yes iff the inward normal points towards +x (ties: +y), i.e. iff the
    inside-positive traversal runs along the canonical direction; exactly one of two neighbours passes that test.
    """
    if ay > by or (ay == by and ax < bx):
        return ax, ay, bx - ax, by - ay, orient, orient > 0.0
    return bx, by, ax - bx, ay - by, -orient, orient < 0.0


@njit(cache=True, inline="always")
def _inside(w, owned):
    """The half-open test of one edge: strictly inside, or exactly on an edge this triangle owns."""
    return w > 0.0 or (w == 0.0 and owned)


@njit(cache=True)
def _rasterize_view(verts, faces, ext, kpx, near, face_id, depth, bary):
    """Fill face_id (H, W) (preset to −1), depth (H, W) and the perspective-correct barycentrics of vertices 1 and 2
    (H, W, 2) of the nearest triangle at every pixel centre, for one camera."""
    height, width = face_id.shape
    nv = verts.shape[0]
    sx, sy, sz, iz = np.empty(nv), np.empty(nv), np.empty(nv), np.empty(nv)
    for v in range(nv):
        x = ext[0, 0] * verts[v, 0] + ext[0, 1] * verts[v, 1] + ext[0, 2] * verts[v, 2] + ext[0, 3]
        y = ext[1, 0] * verts[v, 0] + ext[1, 1] * verts[v, 1] + ext[1, 2] * verts[v, 2] + ext[1, 3]
        z = ext[2, 0] * verts[v, 0] + ext[2, 1] * verts[v, 1] + ext[2, 2] * verts[v, 2] + ext[2, 3]
        sz[v] = z
        if z >= near:  # the last row of K is (0, 0, 1), checked by the caller
            iz[v] = 1.0 / z
            sx[v] = (kpx[0, 0] * x + kpx[0, 1] * y + kpx[0, 2] * z) / z
            sy[v] = (kpx[1, 1] * y + kpx[1, 2] * z) / z
    zbuf = np.full((height, width), np.inf)

    for f in range(faces.shape[0]):
        i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
        if sz[i0] < near or sz[i1] < near or sz[i2] < near:
            continue
        iz0, iz1, iz2 = iz[i0], iz[i1], iz[i2]
        x0, y0, x1, y1, x2, y2 = sx[i0], sy[i0], sx[i1], sy[i1], sx[i2], sy[i2]
        area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
        if not (area > 0.0 or area < 0.0):  # degenerate (or NaN)
            continue
        # Pixel rows / columns whose centres can lie inside; clamped in float first so huge projections cannot overflow.
        j0 = int(np.ceil(max(min(x0, x1, x2) - 0.5, 0.0)))
        j1 = int(np.floor(min(max(x0, x1, x2) - 0.5, width - 1.0)))
        r0 = int(np.ceil(max(min(y0, y1, y2) - 0.5, 0.0)))
        r1 = int(np.floor(min(max(y0, y1, y2) - 0.5, height - 1.0)))
        if j0 > j1 or r0 > r1:
            continue
        orient = 1.0 if area > 0.0 else -1.0  # two-sided: flip the edge signs instead of culling
        ax0, ay0, dx0, dy0, s0, own0 = _edge(x1, y1, x2, y2, orient)  # edge opposite vertex 0 → weight of vertex 0
        ax1, ay1, dx1, dy1, s1, own1 = _edge(x2, y2, x0, y0, orient)
        ax2, ay2, dx2, dy2, s2, own2 = _edge(x0, y0, x1, y1, orient)
        for i in range(r0, r1 + 1):
            py = i + 0.5
            row0, row1, row2 = dx0 * (py - ay0), dx1 * (py - ay1), dx2 * (py - ay2)
            entered = False
            for j in range(j0, j1 + 1):
                px = j + 0.5
                w0 = s0 * (row0 - dy0 * (px - ax0))
                w1 = s1 * (row1 - dy1 * (px - ax1))
                w2 = s2 * (row2 - dy2 * (px - ax2))
                if not (_inside(w0, own0) and _inside(w1, own1) and _inside(w2, own2)):
                    if entered:  # each w is monotone along the row (also in floating point): the hits are one run
                        break
                    continue
                entered = True
                # Screen-space weights / z are proportional to the 3D barycentrics; z = Σw / Σ(w/z).
                q1, q2 = w1 * iz1, w2 * iz2
                q = w0 * iz0 + q1 + q2
                if q <= 0.0:
                    continue
                rq = 1.0 / q
                z = (w0 + w1 + w2) * rq
                if z < zbuf[i, j]:
                    zbuf[i, j] = z
                    face_id[i, j] = f
                    bary[i, j, 0] = q1 * rq
                    bary[i, j, 1] = q2 * rq
    for i in range(height):
        for j in range(width):
            depth[i, j] = zbuf[i, j]


@njit(cache=True, inline="always")
def _bilinear_taps(th, tw, u, v):
    """Rows (ya, yb), columns (xa, xb) and fractions (wy, wx) of the bilinear sample at (u, 1 − v) of a (th, tw) texture:
    texel centres at integer + 0.5, repeat wrapping. Computed once per pixel for all channels."""
    x = (u - np.floor(u)) * tw - 0.5
    y = (1.0 - (v - np.floor(v))) * th - 0.5
    xf, yf = np.floor(x), np.floor(y)
    xa, ya = int(xf) % tw, int(yf) % th
    return ya, (ya + 1) % th, xa, (xa + 1) % tw, y - yf, x - xf


@njit(cache=True)
def _shade_view(faces, face_id, bary, colors, uvs, texture, has_texture, normals, light, ambient, lambert, rgba):
    """Straight RGBA (H, W, 4) from the visibility buffers: interpolated colour × texture × Lambert factor, alpha 1."""
    height, width = face_id.shape
    for i in range(height):
        for j in range(width):
            f = face_id[i, j]
            if f < 0:
                continue
            b1, b2 = bary[i, j, 0], bary[i, j, 1]
            b0 = 1.0 - b1 - b2
            a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
            shade = 1.0
            if lambert:
                cos = normals[f, 0] * light[0] + normals[f, 1] * light[1] + normals[f, 2] * light[2]
                shade = ambient + (1.0 - ambient) * abs(cos)
            if has_texture:
                u = b0 * uvs[a, 0] + b1 * uvs[b, 0] + b2 * uvs[c, 0]
                v = b0 * uvs[a, 1] + b1 * uvs[b, 1] + b2 * uvs[c, 1]
                ya, yb, xa, xb, wy, wx = _bilinear_taps(texture.shape[0], texture.shape[1], u, v)
            for k in range(3):
                value = b0 * colors[a, k] + b1 * colors[b, k] + b2 * colors[c, k]
                if has_texture:
                    top = (1.0 - wx) * texture[ya, xa, k] + wx * texture[ya, xb, k]
                    bottom = (1.0 - wx) * texture[yb, xa, k] + wx * texture[yb, xb, k]
                    value *= (1.0 - wy) * top + wy * bottom
                rgba[i, j, k] = value * shade
            rgba[i, j, 3] = 1.0


@njit(cache=True, parallel=True)
def _render_views(verts, faces, ext, kpx, near, colors, uvs, texture, has_texture, normals, lights, ambient, mode,
                  face_id, depth, rgba):
    """All views in parallel (one view per thread; buffers are per view). mode: −1 visibility only, 0 flat, 1 lambert."""
    height, width = face_id.shape[1], face_id.shape[2]
    for n in prange(ext.shape[0]):
        bary = np.empty((height, width, 2), np.float32)
        _rasterize_view(verts, faces, ext[n], kpx[n], near, face_id[n], depth[n], bary)
        if mode >= 0:
            _shade_view(faces, face_id[n], bary, colors, uvs, texture, has_texture, normals, lights[n], ambient,
                        mode == 1, rgba[n])


# ----------------------------------------------------------------------------------------------- public API
def _array(x, dtype, name, shape, reshape=None):
    """x (numpy, torch or nested lists) as a contiguous array of `dtype`, optionally reshaped, then checked against
    `shape` (None = any size)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=dtype)
    if reshape is not None and x.size % int(np.prod(reshape[1:])) == 0:
        x = x.reshape(reshape)
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"render_mesh: {name} must have shape {want}, got {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"render_mesh: {name} has non-finite values")
    return x


def _visibility_inputs(vertices, faces, extrinsics, intrinsics, width, height, near):
    verts = _array(vertices, np.float64, "vertices", (None, 3))
    faces = _array(faces, np.int64, "faces", (None, 3))
    if len(faces) and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError(f"render_mesh: face indices must lie in [0, {len(verts)}), found [{faces.min()}, {faces.max()}]")
    ext = _array(extrinsics, np.float64, "extrinsics", (None, 4, 4), reshape=(-1, 4, 4))
    k = _array(intrinsics, np.float64, "intrinsics", (None, 3, 3), reshape=(-1, 3, 3))
    if len(ext) != len(k):
        raise ValueError(f"render_mesh: {len(ext)} extrinsics but {len(k)} intrinsics")
    if not np.allclose(k[:, 2], [0.0, 0.0, 1.0], atol=1e-6) or not np.allclose(k[:, 1, 0], 0.0, atol=1e-9):
        raise ValueError("render_mesh: intrinsics must be pinhole [[fx, s, cx], [0, fy, cy], [0, 0, 1]] (normalised)")
    if width <= 0 or height <= 0 or not near > 0:
        raise ValueError(f"render_mesh: need width, height > 0 and near > 0, got {width}x{height}, near={near}")
    kpx = k * np.array([[width], [height], [1.0]])
    return verts, faces, ext, kpx, int(width), int(height)


def render_mesh(vertices, faces, extrinsics, intrinsics, width: int, height: int, vertex_colors=None, uvs=None,
                texture=None, shading: str = "lambert", ambient: float = 0.45, light_dir=None, near: float = 0.01) -> dict:
    """Rasterize one triangle mesh from N cameras (conventions in the module docstring).

    vertices (V, 3) world positions; faces (F, 3) vertex indices; extrinsics (N, 4, 4) OpenCV world→camera (or (4, 4));
    intrinsics (N, 3, 3) normalised (or (3, 3)); width, height in pixels.
    vertex_colors (V, 3) in [0, 1] or None (grey 0.7, or white under a texture); uvs (V, 2) with texture (Ht, Wt, 3),
    sampled at (u, 1 − v), row 0 = top, bilinear, repeat. shading "lambert" or "flat-none"; ambient in [0, 1];
    light_dir (3,) or (N, 3) world direction (its sign does not matter: two-sided), None = each camera's optical axis.
    near: triangles with a vertex at camera z < near are skipped.
    Returns dict(rgba (N, H, W, 4) float32 straight colour with alpha 1 where covered, else all 0;
                 depth (N, H, W) float32 camera z, inf where empty; face_id (N, H, W) int32, −1 where empty).
    Accepts numpy arrays or CPU torch tensors.
    """
    verts, faces, ext, kpx, width, height = _visibility_inputs(vertices, faces, extrinsics, intrinsics, width, height,
                                                               near)
    if shading not in SHADINGS:
        raise ValueError(f"render_mesh: shading must be one of {SHADINGS}, got {shading!r}")
    if (uvs is None) != (texture is None):
        raise ValueError("render_mesh: uvs and texture come together")
    nv, n = len(verts), len(ext)
    has_texture = texture is not None
    if vertex_colors is None:
        colors = np.full((nv, 3), 1.0 if has_texture else DEFAULT_GREY, np.float32)
    else:
        colors = _array(vertex_colors, np.float32, "vertex_colors", (nv, 3))
    if has_texture:
        uvs = _array(uvs, np.float64, "uvs", (nv, 2))
        texture = _array(texture, np.float32, "texture", (None, None, 3))
        if texture.shape[0] == 0 or texture.shape[1] == 0:
            raise ValueError("render_mesh: empty texture")
    else:
        uvs, texture = np.zeros((1, 2)), np.ones((1, 1, 3), np.float32)

    tri = verts[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    if light_dir is None:
        lights = ext[:, 2, :3].copy()  # the camera's +Z (viewing direction) in world: a headlight
    else:
        lights = _array(light_dir, np.float64, "light_dir", (None, 3), reshape=(-1, 3))
        if len(lights) not in (1, n):
            raise ValueError(f"render_mesh: light_dir must be (3,) or ({n}, 3), got {lights.shape}")
        lights = np.broadcast_to(lights, (n, 3)).copy()
    lights /= np.maximum(np.linalg.norm(lights, axis=1, keepdims=True), 1e-30)

    face_id = np.full((n, height, width), -1, np.int32)
    depth = np.empty((n, height, width), np.float32)
    rgba = np.zeros((n, height, width, 4), np.float32)
    _render_views(verts, faces, ext, kpx, float(near), colors, uvs, texture, has_texture, normals, lights,
                  float(ambient), 1 if shading == "lambert" else 0, face_id, depth, rgba)
    return {"rgba": rgba, "depth": depth, "face_id": face_id}


def silhouette(vertices, faces, extrinsics, intrinsics, width: int, height: int, near: float = 0.01) -> np.ndarray:
    """Alpha only, (N, H, W) float32 in {0, 1}: the coverage of :func:`render_mesh` without the shading pass."""
    verts, faces, ext, kpx, width, height = _visibility_inputs(vertices, faces, extrinsics, intrinsics, width, height,
                                                               near)
    n = len(ext)
    face_id = np.full((n, height, width), -1, np.int32)
    depth = np.empty((n, height, width), np.float32)
    dummy = np.zeros((1, 1, 1, 4), np.float32)  # same argument types as render_mesh: one compiled kernel serves both
    _render_views(verts, faces, ext, kpx, float(near), np.zeros((1, 3), np.float32), np.zeros((1, 2)),
                  np.ones((1, 1, 3), np.float32), False, np.zeros((1, 3)), np.zeros((n, 3)), 0.0, -1,
                  face_id, depth, dummy)
    return (face_id >= 0).astype(np.float32)
