"""Procedural animated meshes: the embedded default source of 4D training objects (no download, no Blender).

    seq, meta = make_object(seed, num_frames=24)                    # shape and motion drawn from the seed
    seq, meta = make_object(7, shape="windmill", motion="spin")     # or chosen (see families())

An object is built in its own "shape space" (Z up, standing on z = 0, facing -Y, i.e. the published front camera),
animated there, turned by a random yaw, then normalised by frame 0's bounding box exactly as the published renderer
does (centred, largest extent 1; MeshSequence.normalized). Every object is checked before it is returned: all frames
stay inside [-0.75, 0.75]^3, no vertex moves more than 2.4 / num_frames in one frame (0.1 at 24 frames), and the
mean vertex displacement is at least 0.015 (the published renderer drops objects below 0.01). A motion that fails is
rescaled; a shape that still fails is redrawn from the same generator, so the result is a pure function of
(seed, num_frames, shape, motion, detail).

Shapes (each with random proportions): creature (capsule torso, legs, arms, head with eyes), tree (trunk, branches,
leaf clusters), flag (a thin closed sheet on a pole), blob (bumpy superquadric with a tilted ring), windmill (tower,
nacelle, hub, 2-6 blades), snake (tapered sinuous tube with a head).
Motions: articulated (a bone hierarchy, linear-blend skinning), bend_twist, wave (travelling sine waves, attached end
fixed), squash_stretch (volume-preserving), spin (rigid rotation of sub-parts), rigid (the whole object; the metadata
holds the exact per-frame 4x4 transforms in the normalised frame).

Time: frame t is at clip time tau = t / num_frames, and frequencies are in cycles per clip, so every clip length shows
the whole motion. Every part is a closed surface with outward triangles; coloured objects are welded (watertight),
textured ones repeat the vertices along uv seams (closed geometrically, not topologically).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np

from data_rendering.mesh import MeshSequence

SHAPES = ("creature", "tree", "flag", "blob", "windmill", "snake")
MOTIONS = ("articulated", "bend_twist", "wave", "squash_stretch", "spin", "rigid")
BOUND = 0.75             # every coordinate of every frame stays within [-BOUND, BOUND] (normalised units)
MIN_DISPLACEMENT = 0.015  # mean vertex displacement kept above this (the published renderer rejects < 0.01)
MAX_SPEED = 2.4           # no vertex moves more than MAX_SPEED / num_frames in one frame (0.1 at 24 frames)
TEXTURE_PROBABILITY = 0.35
_ATTEMPTS = 8
TAU = 2.0 * np.pi


def families() -> dict[str, list[str]]:
    """The available shape and motion family names."""
    return {"shapes": list(SHAPES), "motions": list(MOTIONS)}


# ============================================================================================== small geometry helpers
def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _smoothstep(x) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _perpendicular(d, rng=None) -> np.ndarray:
    """A unit vector perpendicular to d (random around d when rng is given)."""
    d = _unit(d)
    trial = rng.normal(size=3) if rng is not None else np.array([0.0, 0.0, 1.0])
    if rng is None and abs(d[2]) > 0.9:
        trial = np.array([1.0, 0.0, 0.0])
    trial = trial - (trial @ d) * d
    return _unit(trial)


def axis_angle_matrix(axis, angle) -> np.ndarray:
    """Rotation matrices (..., 3, 3) by Rodrigues' formula; axis (..., 3) and angle (...) broadcast together.
    A zero angle gives the identity exactly."""
    axis = _unit(axis)
    angle = np.asarray(angle, dtype=np.float64)
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    c, s = np.cos(angle), np.sin(angle)
    k = 1.0 - c
    rows = [[c + x * x * k, x * y * k - z * s, x * z * k + y * s],
            [y * x * k + z * s, c + y * y * k, y * z * k - x * s],
            [z * x * k - y * s, z * y * k + x * s, c + z * z * k]]
    rows = [np.broadcast_arrays(*r) for r in rows]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def mean_displacement(vertices) -> float:
    """Mean over frames and vertices of |v_t - v_0| (the published renderer's "is it moving" test)."""
    v = np.asarray(vertices, dtype=np.float64)
    return float(np.linalg.norm(v - v[:1], axis=-1).mean())


def motion_faults(vertices) -> dict[str, str]:
    """The rules every training object keeps that a normalised (T, V, 3) animation breaks, as {rule: why}: "bounds"
    (a coordinate outside ±BOUND), "speed" (a vertex moving more than MAX_SPEED / T in one frame) and "static" (mean
    displacement under MIN_DISPLACEMENT). Empty when it keeps them all. Shared with data_rendering/game_assets, which
    holds real clips to the same rules."""
    v = np.asarray(vertices, dtype=np.float64)
    faults = {}
    reach, limit = float(np.abs(v).max()), MAX_SPEED / len(v)
    step = float(np.linalg.norm(np.diff(v, axis=0), axis=-1).max())
    if reach > BOUND:
        faults["bounds"] = f"a coordinate reaches {reach:.3f} > {BOUND}"
    if step > limit:
        faults["speed"] = f"a vertex moves {step:.3f} > {limit:.3f} in one frame"
    motion = mean_displacement(v)
    if motion < MIN_DISPLACEMENT:
        faults["static"] = f"mean displacement {motion:.4f} < {MIN_DISPLACEMENT}"
    return faults


# ============================================================================================== skinning
def chain_weights(s, num_bones: int, blend: float = 0.3) -> np.ndarray:
    """Skinning weights (V, num_bones) for points at chain coordinate s in [0, num_bones] (bone i spans [i, i+1]).

    Across each inner joint j the weight passes from bone j-1 to bone j by a smoothstep over [j - blend, j + blend].
    Bone i's weight is ramp_i - ramp_{i+1} for decreasing ramps with ramp_0 = 1 and ramp_n = 0, so the weights are
    non-negative and sum to one; away from the joints a point belongs to one bone only.
    """
    s = np.asarray(s, dtype=np.float64)
    blend = min(max(blend, 1e-6), 0.5)
    ramps = [np.ones_like(s)]
    ramps += [_smoothstep((s - j + blend) / (2.0 * blend)) for j in range(1, num_bones)]
    ramps += [np.zeros_like(s)]
    return np.stack([ramps[i] - ramps[i + 1] for i in range(num_bones)], axis=-1)


def forward_kinematics(parents, joints, rotations) -> np.ndarray:
    """World transforms (T, B, 4, 4) of a bone hierarchy posed by local rotations.

    parents (B,): parent index, -1 for a root; parents come before their children. joints (B, 3): rest position of
    each bone's pivot (world, rest pose = identity). rotations (T, B, 3, 3): rotation of each bone about its pivot,
    expressed in rest-pose world axes. G_b = G_parent(b) · Translate(j_b) · R_b · Translate(-j_b); since the rest
    pose is the identity, G_b maps rest positions directly to posed positions (no inverse bind matrices needed).
    """
    rotations = np.asarray(rotations, dtype=np.float64)
    joints = np.asarray(joints, dtype=np.float64)
    frames, bones = rotations.shape[:2]
    local = np.zeros((frames, bones, 4, 4))
    local[..., :3, :3] = rotations
    local[..., :3, 3] = joints - np.einsum("tbij,bj->tbi", rotations, joints)
    local[..., 3, 3] = 1.0
    world = np.empty_like(local)
    for b, p in enumerate(parents):
        if p >= b:
            raise ValueError(f"forward_kinematics: bone {b} has parent {p}; parents must come first")
        world[:, b] = local[:, b] if p < 0 else world[:, p] @ local[:, b]
    return world


def linear_blend_skinning(rest, weights, transforms) -> np.ndarray:
    """Posed vertices (T, V, 3): v_t = (sum_b w_vb · G_tb) · v_rest, with rest (V, 3), weights (V, B) and bone
    transforms (T, B, 4, 4)."""
    rest = np.asarray(rest, dtype=np.float64)
    weights = np.asarray(weights, np.float64)
    blended = np.einsum("vb,tbij->tvij", weights, np.asarray(transforms, np.float64)[..., :3, :])
    return np.einsum("tvij,vj->tvi", blended[..., :3], rest) + blended[..., 3]


# ============================================================================================== primitive surfaces
def _circle(n: int) -> np.ndarray:
    a = TAU * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], -1)


def _superellipse(n: int, e: float) -> np.ndarray:
    c = _circle(n)
    return np.sign(c) * np.abs(c) ** e


def _zigzag(n: int) -> np.ndarray:
    """Triangulate a convex loop 0..n-1 from both ends inwards; triangles wind like the loop (counter-clockwise)."""
    tris, lo, hi = [], 0, n - 1
    while hi - lo >= 2:
        tris.append((lo, lo + 1, hi))
        lo += 1
        if hi - lo >= 2:
            tris.append((lo, hi - 1, hi))
            hi -= 1
    return np.array(tris, dtype=np.int64)


def _tube(centres, scales, loop, *, ends: str, seam: bool, normal0=None):
    """A swept surface: a 2-D loop (n, 2), counter-clockwise, scaled per row by scales (m, 2) and placed in the
    plane normal to the centreline (m, 3) with parallel-transported frames (normal, binormal = tangent x normal).

    ends: "round" (the first and last centre are pole vertices, closed by fans), "flat" (end loops closed by a
    zigzag) or "closed" (the centreline is a loop, e.g. a torus). With seam, the first loop column (and for "closed"
    the first row) is repeated so that uvs can run 0..1 without wrapping. Returns (vertices, faces, uvs) with
    outward-facing triangles: the loop turns counter-clockwise about the tangent, so (i,j),(i,j+1),(i+1,j+1) has an
    outward normal.
    """
    centres = np.asarray(centres, dtype=np.float64)
    scales = np.broadcast_to(np.asarray(scales, dtype=np.float64), (len(centres), 2))
    if ends == "closed":
        tangents = _unit(np.roll(centres, -1, 0) - np.roll(centres, 1, 0))
    else:
        tangents = _unit(np.gradient(centres, axis=0))
    normals = np.empty_like(centres)
    normals[0] = _perpendicular(tangents[0]) if normal0 is None else _unit(normal0)
    for i in range(len(centres)):  # transport: drop the component along the new tangent
        prev = normals[i - 1] if i else normals[0]
        normals[i] = _unit(prev - (prev @ tangents[i]) * tangents[i])
    binormals = np.cross(tangents, normals)

    rows = slice(1, -1) if ends == "round" else slice(None)
    n = len(loop)
    cols = np.concatenate([loop, loop[:1]]) if seam else loop
    ring = (centres[rows, None] + cols[None, :, :1] * scales[rows, None, :1] * normals[rows, None]
            + cols[None, :, 1:] * scales[rows, None, 1:] * binormals[rows, None])
    if ends == "closed":
        v_row = np.arange(len(centres)) / len(centres)
        if seam:
            ring, v_row = np.concatenate([ring, ring[:1]]), np.append(v_row, 1.0)
    else:   # v runs with arc length
        arclen = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(centres, axis=0), axis=1))])
        v_row = (arclen / max(arclen[-1], 1e-12))[rows]
    m, c = ring.shape[:2]
    verts = ring.reshape(-1, 3)
    uvs = np.stack(np.broadcast_arrays(np.arange(c)[None] / n, v_row[:, None]), -1).reshape(-1, 2)

    wrap_cols, wrap_rows = not seam, ends == "closed" and not seam
    i, j = np.meshgrid(np.arange(m if wrap_rows else m - 1), np.arange(c if wrap_cols else c - 1), indexing="ij")
    i1, j1 = (i + 1) % m, (j + 1) % c
    a, b, cc, d = i * c + j, i * c + j1, i1 * c + j1, i1 * c + j
    faces = [np.stack([a, b, cc], -1).reshape(-1, 3), np.stack([a, cc, d], -1).reshape(-1, 3)]

    jj = np.arange(c if wrap_cols else c - 1)
    jn = (jj + 1) % c
    if ends == "round":
        first, last = len(verts), len(verts) + 1
        verts = np.concatenate([verts, centres[[0, -1]]])
        uvs = np.concatenate([uvs, [[0.5, 0.0], [0.5, 1.0]]])
        faces.append(np.stack([np.full_like(jj, first), jn, jj], -1))
        top = (m - 1) * c
        faces.append(np.stack([np.full_like(jj, last), top + jj, top + jn], -1))
    elif ends == "flat":
        zig = _zigzag(n)
        faces.append(zig[:, ::-1])              # start loop faces -tangent
        faces.append(zig + (m - 1) * c)         # end loop faces +tangent
    return verts, np.concatenate(faces).astype(np.int64), uvs


def _rows(length: float, radius: float, n: int, most: int | None = None) -> int:
    """Rows along a tube so that quads are roughly square (within limits that keep the triangle budget)."""
    return int(np.clip(round(length / (TAU * max(radius, 1e-6) / n)), 2, most or 2 * n))


def _round_tube(centres, radii, n, seam, aspect=1.0, normal0=None):
    """A tube along centres (m, 3) with radii (m,) closed by hemispherical caps of the end radii (cross-section an
    ellipse r x aspect·r)."""
    centres, radii = np.asarray(centres, float), np.asarray(radii, float)
    d0, d1 = _unit(centres[1] - centres[0]), _unit(centres[-1] - centres[-2])
    a = np.linspace(0.0, np.pi / 2, max(n // 4, 2) + 1)   # 0 at the pole, pi/2 where the cap meets the tube
    path = np.concatenate([centres[0] - np.outer(radii[0] * np.cos(a), d0), centres[1:-1],
                           centres[-1] + np.outer(radii[-1] * np.cos(a[::-1]), d1)])
    r = np.concatenate([radii[0] * np.sin(a), radii[1:-1], radii[-1] * np.sin(a[::-1])])
    return _tube(path, np.stack([r, r * aspect], -1), _circle(n), ends="round", seam=seam,
                 normal0=normal0 if normal0 is not None else _perpendicular(d0))


def _capsule(p0, p1, r0, r1, n, seam, aspect=1.0, normal0=None):
    """A straight round tube from p0 to p1 with radii r0 -> r1."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    s = np.linspace(0.0, 1.0, _rows(np.linalg.norm(p1 - p0), (r0 + r1) / 2, n) + 1)
    return _round_tube(p0 + np.outer(s, p1 - p0), r0 + s * (r1 - r0), n, seam, aspect, normal0)


def _superquadric(radii, e1, e2, n, seam, centre=(0, 0, 0)):
    """Superquadric around centre (|x/a|^(2/e2) + |y/b|^(2/e2))^(e2/e1) + |z/c|^(2/e1) = 1; e = 1 is an ellipsoid."""
    eta = np.linspace(-np.pi / 2, np.pi / 2, max(n // 2, 3) + 1)
    s, c = np.sin(eta), np.cos(eta)
    lat_z, lat_r = np.sign(s) * np.abs(s) ** e1, np.abs(c) ** e1
    centres = np.asarray(centre, float) + np.outer(lat_z * radii[2], [0.0, 0.0, 1.0])
    return _tube(centres, np.stack([lat_r * radii[0], lat_r * radii[1]], -1), _superellipse(n, e2), ends="round",
                 seam=seam, normal0=(1.0, 0.0, 0.0))


def _sphere(centre, radius, n, seam):
    return _superquadric(np.full(3, radius), 1.0, 1.0, n, seam, centre)


def _torus(major, minor, n, seam):
    """A torus around the Z axis through the origin."""
    a = TAU * np.arange(2 * n) / (2 * n)
    centres = major * np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], -1)
    return _tube(centres, (minor, minor), _circle(max(n // 2, 6)), ends="closed", seam=seam,
                 normal0=(1.0, 0.0, 0.0))


def _placed(mesh, rotation=None, translation=(0.0, 0.0, 0.0)):
    v, f, uv = mesh
    if rotation is not None:
        v = v @ np.asarray(rotation).T
    return v + np.asarray(translation, float), f, uv


# ============================================================================================== shapes
@dataclass
class Skeleton:
    """A bone hierarchy with its pose generator: bone b turns about axes[b] through joints[b] by
    amplitudes[b] · (sin(2π·freqs[b]·f·tau + phases[b]) + offsets[b])  (offset 1: a joint flexing one way only).
    """
    names: list
    parents: list
    joints: np.ndarray
    weights: np.ndarray      # (V, B)
    axes: np.ndarray
    amplitudes: np.ndarray
    phases: np.ndarray
    offsets: np.ndarray
    freqs: np.ndarray


@dataclass
class Shape:
    """A rest-pose mesh in shape space with the rigging every motion family needs."""
    name: str
    vertices: np.ndarray                       # (V, 3) rest pose in shape space
    faces: np.ndarray
    uvs: np.ndarray                            # (V, 2) per-part uvs in [0, 1]
    parts: list                                # (name, start, stop): contiguous vertex ranges, each a closed surface
    axis: tuple                                # (origin, unit direction, length): main axis for bend/squash/wave
    spine: np.ndarray                          # (k+1, 3) joint chain for the generic articulated motion
    wave: dict                                 # origin, direction, normal, length, pinned, parts (None: all)
    spinners: list                             # dicts: parts, pivot, axis (unit), kind ("spin" | "swing"), amplitude
    anchors: dict = field(default_factory=dict)  # part -> point: the part takes that point's chain weights and wave
    #                                              offset, so rigid bits (leaves, rotor, head) are not warped
    skeleton: Skeleton | None = None
    params: dict = field(default_factory=dict)

    def mask(self, names) -> np.ndarray:
        m = np.zeros(len(self.vertices), bool)
        for name, start, stop in self.parts:
            if names is None or name in names:
                m[start:stop] = True
        return m

    def part_index(self) -> np.ndarray:
        idx = np.zeros(len(self.vertices), np.int64)
        for k, (_, start, stop) in enumerate(self.parts):
            idx[start:stop] = k
        return idx

    def anchored(self, values_fn) -> np.ndarray:
        """values_fn(points (N,3)) per vertex, with each anchored part taking its anchor's value."""
        out = values_fn(self.vertices)
        for name, start, stop in self.parts:
            if name in self.anchors:
                out[start:stop] = values_fn(np.asarray(self.anchors[name], float)[None])[0]
        return out


class _Assembly:
    """Concatenates part meshes, remembering each part's vertex range."""

    def __init__(self):
        self.v, self.f, self.uv, self.parts = [], [], [], []
        self.count = 0

    def add(self, name, mesh) -> tuple:
        v, f, uv = mesh
        self.v.append(v)
        self.f.append(f + self.count)
        self.uv.append(uv)
        self.parts.append((name, self.count, self.count + len(v)))
        self.count += len(v)
        return self.parts[-1]

    def arrays(self):
        return np.concatenate(self.v), np.concatenate(self.f), np.concatenate(self.uv)


def _straight_spine(origin, direction, length, bones):
    return np.asarray(origin, float) + np.outer(np.linspace(0, length, bones + 1), direction)


def _horizontal(rng) -> np.ndarray:
    a = rng.uniform(0, TAU)
    return np.array([np.cos(a), np.sin(a), 0.0])


def _creature(rng, n, seam) -> Shape:
    leg_len, leg_r = rng.uniform(0.55, 0.95), rng.uniform(0.07, 0.12)
    torso_len, torso_r = rng.uniform(0.45, 0.85), rng.uniform(0.17, 0.28)
    arm_len, arm_r = rng.uniform(0.45, 0.8), rng.uniform(0.05, 0.09)
    head_r = torso_r * rng.uniform(0.7, 1.15)
    hip_x, splay = torso_r * rng.uniform(0.4, 0.65), rng.uniform(0.0, 0.35)
    pelvis, top = leg_len, leg_len + torso_len
    asm = _Assembly()
    asm.add("torso", _capsule((0, 0, pelvis), (0, 0, top), torso_r, torso_r * rng.uniform(0.8, 1.1), n, seam))
    head_c = np.array([0.0, 0.0, top + torso_r * 0.6 + head_r * 0.8])
    asm.add("head", _superquadric(head_r * np.array([1.0, rng.uniform(0.85, 1.1), rng.uniform(0.85, 1.15)]),
                                  1.0, 1.0, n, seam, head_c))
    eye_r, eye_a = head_r * rng.uniform(0.15, 0.25), rng.uniform(0.3, 0.55)
    for side in (-1, 1):
        p = head_c + head_r * np.array([side * np.sin(eye_a), -np.cos(eye_a) * 0.95, 0.25])
        asm.add(f"eye_{'rl'[side > 0]}", _sphere(p, eye_r, max(n // 2, 6), seam))
    limbs = {}   # facing -Y, the creature's right side is -X
    for side, tag in ((-1, "r"), (1, "l")):
        hip = np.array([side * hip_x, 0.0, pelvis])
        foot = np.array([side * hip_x, 0.0, leg_r])
        limbs[f"leg_{tag}"] = (hip, foot, leg_r, leg_r * 0.85)
    for side, tag in ((-1, "r"), (1, "l")):
        shoulder = np.array([side * (torso_r + arm_r * 1.2), 0.0, top - arm_r])
        hand = shoulder + arm_len * _unit([side * np.sin(splay), 0.0, -np.cos(splay)])
        limbs[f"arm_{tag}"] = (shoulder, hand, arm_r, arm_r * 0.8)
    for name, (p0, p1, r0, r1) in limbs.items():
        asm.add(name, _capsule(p0, p1, r0, r1, n, seam))
    v, f, uv = asm.arrays()

    # Skeleton: torso root at the pelvis; head at the neck; two-bone legs and arms with joints at mid-limb.
    names = ["torso", "head"]
    parents = [-1, 0]
    joints = [np.array([0.0, 0.0, pelvis]), np.array([0.0, 0.0, top])]
    w = np.zeros((len(v), 2 + 4 * 2))
    part = {name: (s, e) for name, s, e in asm.parts}
    w[part["torso"][0]:part["torso"][1], 0] = 1.0
    for eye_or_head in ("head", "eye_l", "eye_r"):
        w[part[eye_or_head][0]:part[eye_or_head][1], 1] = 1.0
    for name, (p0, p1, _, _) in limbs.items():
        upper, lower = len(names), len(names) + 1
        names += [f"{name}_upper", f"{name}_lower"]
        parents += [0, upper]
        joints += [p0, (p0 + p1) / 2]
        start, stop = part[name]
        t = np.clip((v[start:stop] - p0) @ (p1 - p0) / np.sum((p1 - p0) ** 2), 0, 1)
        w[start:stop, [upper, lower]] = chain_weights(2 * t, 2, blend=0.25)
    style = str(rng.choice(["walk", "jumping_jack"]))
    x, y, z = np.eye(3)
    pi2 = np.pi / 2
    # bone: (axis, amplitude rad, phase, offset, frequency multiple). Rest pose hangs down; the creature faces -Y,
    # so +angle about X swings a limb backwards, and +angle about Y swings a downward limb towards -X (its right side).
    if style == "walk":   # legs and arms swing in opposition; knees flex backwards, elbows forwards
        pose = {"torso": (y, 0.06, 0, 0, 1), "head": (x, 0.12, pi2, 0, 2),
                "leg_l_upper": (x, 0.45, 0, 0, 1), "leg_l_lower": (x, 0.35, -pi2, 1, 1),
                "leg_r_upper": (x, 0.45, np.pi, 0, 1), "leg_r_lower": (x, 0.35, pi2, 1, 1),
                "arm_l_upper": (x, 0.45, np.pi, 0, 1), "arm_l_lower": (x, -0.3, pi2, 1, 1),
                "arm_r_upper": (x, 0.45, 0, 0, 1), "arm_r_lower": (x, -0.3, -pi2, 1, 1)}
    else:                 # arms and legs open sideways together, from the rest pose at frame 0
        pose = {"torso": (z, 0.1, 0, 0, 1), "head": (x, 0.12, 0, 0, 1),
                "leg_r_upper": (y, 0.2, -pi2, 1, 1), "leg_r_lower": (x, 0.15, -pi2, 1, 1),
                "leg_l_upper": (y, -0.2, -pi2, 1, 1), "leg_l_lower": (x, 0.15, -pi2, 1, 1),
                "arm_r_upper": (y, 0.7, -pi2, 1, 1), "arm_r_lower": (y, 0.3, -pi2, 1, 1),
                "arm_l_upper": (y, -0.7, -pi2, 1, 1), "arm_l_lower": (y, -0.3, -pi2, 1, 1)}
    axes, amps, phases, offsets, freqs = (np.array(col, float) for col in zip(*(pose[b] for b in names)))
    skel = Skeleton(names, parents, np.array(joints), w, axes, amps * rng.uniform(0.8, 1.2, len(amps)), phases,
                    offsets, freqs)
    height = head_c[2] + head_r
    spine = _straight_spine((0, 0, 0), z, height, 3)
    spinners = [dict(parts=[arm], pivot=limbs[arm][0], axis=x, kind="swing", amplitude=rng.uniform(0.8, 1.6))
                for arm in ("arm_l", "arm_r")]
    spinners.append(dict(parts=["head", "eye_l", "eye_r"], pivot=joints[1], axis=z, kind="swing",
                         amplitude=rng.uniform(0.4, 0.9)))
    params = dict(leg_length=leg_len, leg_radius=leg_r, torso_length=torso_len, torso_radius=torso_r,
                  arm_length=arm_len, arm_radius=arm_r, head_radius=head_r, arm_splay=splay, style=style)
    return Shape("creature", v, f, uv, asm.parts, (np.zeros(3), z, height), spine,
                 dict(origin=np.zeros(3), direction=z, normal=_horizontal(rng), length=height, pinned=True, parts=None),
                 spinners, anchors={"head": head_c, "eye_l": head_c, "eye_r": head_c}, skeleton=skel, params=params)


def _tree(rng, n, seam) -> Shape:
    height = rng.uniform(1.0, 1.6)
    r0 = height * rng.uniform(0.04, 0.08)
    r1 = r0 * rng.uniform(0.45, 0.7)
    asm = _Assembly()
    rows = _rows(height, r0, n)
    zs = np.linspace(0, height, rows + 1)
    radius = r0 + (r1 - r0) * zs / height
    asm.add("trunk", _tube(np.outer(zs, [0, 0, 1]), np.stack([radius, radius], -1), _circle(n), ends="flat",
                           seam=seam, normal0=(1, 0, 0)))
    crown, anchors = [], {}
    count = int(rng.integers(2, 5))
    azimuths = rng.uniform(0, TAU) + TAU * np.arange(count) / count + rng.uniform(-0.3, 0.3, count)
    for k, az in enumerate(azimuths):
        h = height * rng.uniform(0.4, 0.85)
        elevation = rng.uniform(0.35, 1.0)
        length = height * rng.uniform(0.3, 0.55)
        rb = (r0 + (r1 - r0) * h / height) * rng.uniform(0.45, 0.7)
        base = np.array([0.0, 0.0, h])
        tip = base + length * np.array([np.cos(az) * np.cos(elevation), np.sin(az) * np.cos(elevation),
                                        np.sin(elevation)])
        asm.add(f"branch_{k}", _capsule(base, tip, rb, rb * 0.6, max(n // 2, 6), seam))
        leaf_r = height * rng.uniform(0.12, 0.22)
        leaf = _superquadric(leaf_r * np.array([1.0, rng.uniform(0.8, 1.2), rng.uniform(0.6, 0.9)]),
                             rng.uniform(0.7, 1.1), 1.0, n, seam, tip)
        asm.add(f"leaves_{k}", leaf)
        anchors[f"leaves_{k}"] = tip
        crown += [f"branch_{k}", f"leaves_{k}"]
    top_r = height * rng.uniform(0.2, 0.3)
    top_c = np.array([0.0, 0.0, height + top_r * 0.5])
    asm.add("leaves_top", _superquadric(top_r * np.array([1.0, rng.uniform(0.8, 1.2), rng.uniform(0.7, 1.1)]),
                                        rng.uniform(0.7, 1.1), 1.0, n, seam, top_c))
    anchors["leaves_top"] = top_c
    v, f, uv = asm.arrays()
    z = np.array([0.0, 0.0, 1.0])
    total = top_c[2] + top_r
    return Shape("tree", v, f, uv, asm.parts, (np.zeros(3), z, total), _straight_spine((0, 0, 0), z, total, 3),
                 dict(origin=np.zeros(3), direction=z, normal=_horizontal(rng), length=total, pinned=True, parts=None),
                 [dict(parts=crown + ["leaves_top"], pivot=np.zeros(3), axis=z, kind="swing",
                       amplitude=rng.uniform(0.5, 1.2))],
                 anchors=anchors, params=dict(height=height, trunk_radius=r0, branches=count))


def _flag(rng, n, seam) -> Shape:
    pole_h, pole_r = rng.uniform(1.2, 1.8), rng.uniform(0.02, 0.035)
    width = pole_h * rng.uniform(0.45, 0.75)
    sheet_h = width * rng.uniform(0.45, 0.75)
    top = pole_h - rng.uniform(0.02, 0.1)
    x0, half = pole_r * 0.5, 0.006
    asm = _Assembly()
    zs = np.linspace(0, pole_h, _rows(pole_h, pole_r * 8, n) + 1)
    asm.add("pole", _tube(np.outer(zs, [0, 0, 1]), (pole_r, pole_r), _circle(max(n // 2, 6)), ends="flat", seam=seam,
                          normal0=(1, 0, 0)))
    ball_c = np.array([0.0, 0.0, pole_h + pole_r])
    asm.add("finial", _sphere(ball_c, pole_r * rng.uniform(1.6, 2.5), max(n // 2, 6), seam))
    # The sheet is a thin closed slab swept upwards: its cross-section runs out along y = -half and back along +half.
    xs = np.linspace(x0, x0 + width, 2 * n)
    loop = np.concatenate([np.stack([xs, np.full_like(xs, -half)], -1),
                           np.stack([xs[::-1], np.full_like(xs, half)], -1)])
    zs = np.linspace(top - sheet_h, top, n + 1)
    asm.add("sheet", _tube(np.outer(zs, [0, 0, 1]), (1.0, 1.0), loop, ends="flat", seam=seam, normal0=(1, 0, 0)))
    v, f, uv = asm.arrays()
    z = np.array([0.0, 0.0, 1.0])
    return Shape("flag", v, f, uv, asm.parts, (np.zeros(3), z, pole_h), _straight_spine((0, 0, 0), z, pole_h, 3),
                 dict(origin=np.array([x0, 0.0, 0.0]), direction=np.array([1.0, 0, 0]), normal=np.array([0, 1.0, 0]),
                      length=width, pinned=True, parts=["sheet"]),
                 [dict(parts=["sheet"], pivot=np.zeros(3), axis=z, kind="swing", amplitude=rng.uniform(0.4, 0.8))],
                 anchors={"finial": ball_c},
                 params=dict(pole_height=pole_h, pole_radius=pole_r, width=width, sheet_height=sheet_h))


def _blob(rng, n, seam) -> Shape:
    radii = rng.uniform(0.4, 0.7, 3)
    e1, e2 = rng.uniform(0.45, 1.4, 2)
    centre = np.array([0.0, 0.0, radii[2]])
    v, f, uv = _superquadric(radii, e1, e2, 2 * n, seam, centre)
    # Bumps: a smooth radial factor of the direction from the centre (seam copies move together).
    dirs = _unit(rng.normal(size=(3, 3)))
    amp, freq, phase = rng.uniform(0.03, 0.07, 3), rng.uniform(2.0, 4.0, 3), rng.uniform(0, TAU, 3)
    rel = v - centre
    u = _unit(rel + 1e-12)
    v = centre + rel * (1.0 + (amp * np.sin(freq * (u @ dirs.T) + phase)).sum(-1, keepdims=True))
    asm = _Assembly()
    asm.add("body", (v, f, uv))
    major = max(radii[0], radii[1]) * rng.uniform(1.25, 1.55)
    tilt = axis_angle_matrix(_horizontal(rng), rng.uniform(0.2, 0.5))
    asm.add("ring", _placed(_torus(major, major * rng.uniform(0.05, 0.09), 2 * n, seam), tilt, centre))
    v, f, uv = asm.arrays()
    z = np.array([0.0, 0.0, 1.0])
    return Shape("blob", v, f, uv, asm.parts, (np.zeros(3), z, 2 * radii[2]),
                 _straight_spine((0, 0, 0), z, 2 * radii[2], 3),
                 dict(origin=np.zeros(3), direction=z, normal=_horizontal(rng), length=2 * radii[2], pinned=True,
                      parts=None),
                 [dict(parts=["ring"], pivot=centre, axis=z, kind="spin", amplitude=rng.uniform(0.5, 1.0) *
                       rng.choice([-1, 1]))],
                 anchors={"ring": centre},
                 params=dict(radii=radii, exponents=[e1, e2], ring_radius=major))


def _windmill(rng, n, seam) -> Shape:
    height = rng.uniform(1.0, 1.5)
    rb = height * rng.uniform(0.07, 0.12)
    rt = rb * rng.uniform(0.5, 0.8)
    boxy = rng.random() < 0.5
    asm = _Assembly()
    zs = np.linspace(0, height, _rows(height, rb, n) + 1)
    radius = rb + (rt - rb) * zs / height
    asm.add("tower", _tube(np.outer(zs, [0, 0, 1]), np.stack([radius, radius], -1),
                           _superellipse(n, 0.35 if boxy else 1.0), ends="flat", seam=seam, normal0=(1, 0, 0)))
    hub_c = np.array([0.0, -rt * 2.2, height])
    asm.add("nacelle", _capsule((0, rt, height), hub_c, rt * 1.1, rt * 0.9, n, seam))
    hub_r = rt * rng.uniform(1.0, 1.4)
    asm.add("hub", _sphere(hub_c - (0, hub_r * 0.4, 0), hub_r, n, seam))
    blades = int(rng.integers(2, 7))
    length = height * rng.uniform(0.5, 0.8)
    width = length * rng.uniform(0.07, 0.13)
    pitch = rng.uniform(0.2, 0.6)
    rotor = ["hub"]
    for k in range(blades):   # one blade points straight up, so spinning never leaves frame 0's top
        a = np.pi / 2 + TAU * k / blades
        radial = np.array([np.cos(a), 0.0, np.sin(a)])
        flat = axis_angle_matrix(radial, pitch) @ np.cross(radial, [0.0, 1.0, 0.0])
        asm.add(f"blade_{k}", _capsule(hub_c + radial * hub_r * 0.5, hub_c + radial * (length - width * 0.5),
                                       width, width * 0.6, max(n // 2, 6), seam, aspect=0.2, normal0=flat))
        rotor.append(f"blade_{k}")
    v, f, uv = asm.arrays()
    z = np.array([0.0, 0.0, 1.0])
    total = height + length
    return Shape("windmill", v, f, uv, asm.parts, (np.zeros(3), z, total), _straight_spine((0, 0, 0), z, height, 3),
                 dict(origin=np.zeros(3), direction=z, normal=_horizontal(rng), length=total, pinned=True, parts=None),
                 [dict(parts=rotor, pivot=hub_c, axis=np.array([0.0, 1.0, 0.0]), kind="spin",
                       amplitude=rng.uniform(0.4, 0.9) * rng.choice([-1, 1]))],
                 anchors={name: hub_c for name in rotor + ["nacelle"]},
                 params=dict(height=height, blades=blades, blade_length=length, boxy_tower=bool(boxy)))


def _snake(rng, n, seam) -> Shape:
    """A sinuous tapered tube lying along +X on the ground, in two parts that meet in a ball joint (the tail can
    swing), with a head and eyes at the +X end."""
    length = rng.uniform(1.6, 2.4)
    r = length * rng.uniform(0.035, 0.055)
    wiggle, waves, phase = length * rng.uniform(0.04, 0.12), rng.uniform(0.5, 1.5), rng.uniform(0, TAU)
    rows = _rows(length, r, n, most=5 * n)
    s = np.linspace(0, 1, rows + 1)
    centres = np.stack([s * length, wiggle * np.sin(TAU * waves * s + phase), np.full_like(s, r)], -1)
    radius = r * (0.15 + 0.85 * _smoothstep(s / 0.35)) * (1 - 0.2 * _smoothstep((s - 0.85) / 0.15))
    joint = int(rows * rng.uniform(0.3, 0.45))
    asm = _Assembly()
    asm.add("tail", _round_tube(centres[:joint + 1], radius[:joint + 1], n, seam))
    asm.add("body", _round_tube(centres[joint:], radius[joint:], n, seam))
    tangent = _unit(centres[-1] - centres[-3])
    head_len, head_r = r * rng.uniform(2.2, 3.2), r * rng.uniform(1.1, 1.5)
    neck = centres[-1]
    head_c = neck + tangent * head_len * 0.6
    side = _unit(np.cross([0.0, 0.0, 1.0], tangent))            # facing +X, +Y is the snake's left
    frame = np.stack([side, np.cross(tangent, side), tangent], -1)  # local x -> side, y -> up, z -> forward
    asm.add("head", _placed(_superquadric(np.array([head_r, head_r * 0.75, head_len]), 1.0, 1.0, n, seam),
                            frame, head_c))
    for sign in (-1, 1):
        eye = head_c + sign * side * head_r * 0.7 + np.array([0, 0, head_r * 0.4]) + tangent * head_len * 0.35
        asm.add(f"eye_{'rl'[sign > 0]}", _sphere(eye, head_r * 0.25, max(n // 2, 6), seam))
    v, f, uv = asm.arrays()
    x, z = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
    total = head_c[0] + head_len
    spine = np.concatenate([centres[np.linspace(0, rows, 5).round().astype(int)], [head_c + tangent * head_len]])
    head = ["head", "eye_l", "eye_r"]
    return Shape("snake", v, f, uv, asm.parts, (np.zeros(3), x, total), spine,
                 dict(origin=np.zeros(3), direction=x, normal=np.array([0.0, 1.0, 0.0]), length=total, pinned=False,
                      parts=None),
                 [dict(parts=head, pivot=neck, axis=z, kind="swing", amplitude=rng.uniform(0.5, 0.9)),
                  dict(parts=["tail"], pivot=centres[joint], axis=z, kind="swing", amplitude=rng.uniform(0.4, 0.8))],
                 anchors={name: head_c for name in head},
                 params=dict(length=length, radius=r, wiggle=wiggle, head_length=head_len, joint=s[joint]))


_SHAPE_BUILDERS = {"creature": _creature, "tree": _tree, "flag": _flag, "blob": _blob, "windmill": _windmill,
                   "snake": _snake}


# ============================================================================================== motions
# Each motion has draw(rng, shape, most) -> params (keys starting with "_" stay out of the metadata; frequencies are
# whole cycles per clip, at most `most`: 1 for clips under 8 frames, where two cycles would alias back to frame 0) and
# apply(shape, params, tau (T,), amp) -> (T, V, 3) shape-space vertices; amp scales the motion for the bounds fit.
def _polyline_coordinate(points, line) -> np.ndarray:
    """Chain coordinate of each point on a polyline: segment index + fraction along the nearest segment."""
    a, ab = line[:-1], np.diff(line, axis=0)
    t = np.clip(np.einsum("vkj,kj->vk", points[:, None] - a, ab) / np.sum(ab * ab, -1), 0.0, 1.0)
    dist = np.linalg.norm(points[:, None] - (a + t[..., None] * ab), axis=-1)
    k = dist.argmin(1)
    return k + t[np.arange(len(points)), k]


def _chain_skeleton(rng, shape: Shape) -> Skeleton:
    """A bone per spine segment, each turning about a random axis across its segment; the phase lags down the chain
    so the bending travels. Vertices blend between neighbouring bones near each joint."""
    spine = shape.spine
    bones = len(spine) - 1
    s = shape.anchored(lambda p: _polyline_coordinate(p, spine))
    axes = np.stack([_perpendicular(spine[b + 1] - spine[b], rng) for b in range(bones)])
    lag = rng.uniform(0.3, 1.2)
    return Skeleton([f"bone_{b}" for b in range(bones)], list(range(-1, bones - 1)), spine[:-1].copy(),
                    chain_weights(s, bones, 0.35), axes, rng.uniform(0.12, 0.3, bones) * rng.choice([-1, 1], bones),
                    rng.uniform(0, TAU) - lag * np.arange(bones), np.zeros(bones), np.ones(bones))


def _draw_articulated(rng, shape, most):
    skel = shape.skeleton if shape.skeleton is not None else _chain_skeleton(rng, shape)
    f = int(rng.integers(1, most + 1))   # twice the frequency, half the angles: the same joint speeds
    return dict(frequency=f, amplitude_scale=1.0 / f, bones=skel.names, parents=skel.parents, _skeleton=skel)


def _apply_articulated(shape, p, tau, amp):
    sk = p["_skeleton"]
    wave = np.sin(TAU * p["frequency"] * sk.freqs * tau[:, None] + sk.phases) + sk.offsets
    angles = amp * p["amplitude_scale"] * sk.amplitudes * wave
    transforms = forward_kinematics(sk.parents, sk.joints, axis_angle_matrix(sk.axes[None], angles))
    return linear_blend_skinning(shape.vertices, sk.weights, transforms)


def _draw_bend_twist(rng, shape, most):
    fb, ft = (int(f) for f in rng.integers(1, most + 1, 2))
    return dict(bend=rng.uniform(0.35, 0.8) / fb, twist=rng.uniform(0.0, 0.9) * rng.choice([-1, 1]) / ft,
                bend_frequency=fb, twist_frequency=ft, azimuth=rng.uniform(0, TAU), swirl=int(rng.integers(0, 2)),
                phases=rng.uniform(0, TAU, 2))


def _apply_bend_twist(shape, p, tau, amp):
    """Twist about the main axis by an angle growing with height, then bend the axis into a circular arc
    (Barr's deformations); both angles oscillate, and with swirl the bending direction turns round once."""
    origin, d, length = shape.axis
    e1 = _perpendicular(d)
    e2 = np.cross(d, e1)
    rel = shape.vertices - origin
    x, y, z = rel @ e1, rel @ e2, rel @ d
    t = tau[:, None]
    twist = amp * p["twist"] * np.sin(TAU * p["twist_frequency"] * t + p["phases"][1]) * np.clip(z / length, 0, None)
    bend = amp * p["bend"] * np.sin(TAU * p["bend_frequency"] * t + p["phases"][0]) / length  # curvature (T, 1)
    az = p["azimuth"] + TAU * p["swirl"] * t                       # (T, 1) direction of the bend
    c, s = np.cos(twist), np.sin(twist)
    x, y = x * c - y * s, x * s + y * c                            # twisted
    xb, yb = x * np.cos(az) + y * np.sin(az), -x * np.sin(az) + y * np.cos(az)
    theta = bend * np.clip(z, 0, None)
    half = theta / 2
    xb_new = z * np.sin(half) * np.sinc(half / np.pi) + xb * np.cos(theta)   # z(1 - cos θ)/θ + x cos θ
    z_new = z * np.sinc(theta / np.pi) - xb * np.sin(theta)                   # z sin θ/θ - x sin θ
    x, y = xb_new * np.cos(az) - yb * np.sin(az), xb_new * np.sin(az) + yb * np.cos(az)
    return origin + x[..., None] * e1 + y[..., None] * e2 + z_new[..., None] * d


def _draw_wave(rng, shape, most):
    return dict(amplitude=rng.uniform(0.1, 0.18), wavenumber=rng.uniform(0.6, 1.6),
                frequency=int(rng.integers(1, most + 1)), cross=rng.uniform(-0.5, 0.5), exponent=rng.uniform(1.0, 1.6),
                phase=rng.uniform(0, TAU), ripple=rng.uniform(0.0, 0.3))


def _apply_wave(shape, p, tau, amp):
    """Travelling sine waves along the wave direction, displacing along its normal; with pinned, the envelope
    u^exponent is zero at the attached end (u = 0), so that end never moves."""
    w = shape.wave
    side = np.cross(w["direction"], w["normal"])
    u = shape.anchored(lambda q: (q - w["origin"]) @ w["direction"] / w["length"])
    v = shape.anchored(lambda q: (q - w["origin"]) @ side / w["length"])
    envelope = np.clip(u, 0, None) ** p["exponent"] if w["pinned"] else 0.5 + 0.5 * np.clip(u, 0, 1)
    t = tau[:, None]
    wave = np.sin(TAU * (p["wavenumber"] * u + p["cross"] * v - p["frequency"] * t) + p["phase"])
    wave += p["ripple"] * np.sin(TAU * (2.3 * p["wavenumber"] * u - 2 * p["frequency"] * t) + 2 * p["phase"])
    offset = amp * p["amplitude"] * w["length"] * envelope * wave * shape.mask(w["parts"])
    return shape.vertices + offset[..., None] * w["normal"]


def _draw_squash(rng, shape, most):
    return dict(strength=rng.uniform(0.1, 0.22), frequency=int(rng.integers(1, most + 1)),
                wavenumber=rng.uniform(0.0, 0.8), phase=rng.uniform(0, TAU))


def _apply_squash(shape, p, tau, amp):
    """Stretch by s(u, t) = exp(a·sin(2π(f·t - k·u/L) + φ)) along the main axis and by 1/sqrt(s) across it.

    The axial position becomes u' = ∫_0^u s, the lateral offset is divided by sqrt(s(u)); the Jacobian is triangular
    with diagonal (s, 1/√s, 1/√s), so the map preserves volume exactly for any profile s (k = 0: a uniform bounce;
    k > 0: a bulge travelling up the body). The base (u = 0) stays put.
    """
    origin, d, length = shape.axis
    rel = shape.vertices - origin
    u = rel @ d
    lateral = rel - u[:, None] * d
    grid = np.linspace(min(u.min(), 0.0), max(u.max(), 0.0), 513)
    out = np.empty((len(tau),) + shape.vertices.shape)
    for i, t in enumerate(tau):
        def stretch(x):
            return np.exp(amp * p["strength"] * np.sin(TAU * (p["frequency"] * t - p["wavenumber"] * x / length)
                                                        + p["phase"]))
        sg = stretch(grid)
        integral = np.concatenate([[0.0], np.cumsum((sg[1:] + sg[:-1]) / 2 * np.diff(grid))])
        integral -= np.interp(0.0, grid, integral)
        out[i] = origin + np.interp(u, grid, integral)[:, None] * d + lateral / np.sqrt(stretch(u))[:, None]
    return out


def _draw_spin(rng, shape, most):
    return dict(frequency=1, phases=rng.uniform(0, TAU, len(shape.spinners)),
                spinners=[dict(parts=sp["parts"], kind=sp["kind"], amplitude=sp["amplitude"]) for sp in shape.spinners])


def _apply_spin(shape, p, tau, amp):
    """Rigid rotation of each spinner's parts about its pivot, starting from the rest pose at frame 0: "spin" turns
    continuously (amplitude = turns per clip), "swing" oscillates (amplitude = radians) with a random phase, so that
    even a two-frame clip catches it away from its start."""
    out = np.repeat(shape.vertices[None], len(tau), 0)
    for sp, phase in zip(shape.spinners, p["phases"]):
        if sp["kind"] == "spin":
            angle = amp * sp["amplitude"] * TAU * tau
        else:
            angle = amp * sp["amplitude"] * (np.sin(TAU * p["frequency"] * tau + phase) - np.sin(phase))
        rot = axis_angle_matrix(sp["axis"], angle)
        m = shape.mask(sp["parts"])
        out[:, m] = np.einsum("tij,vj->tvi", rot, shape.vertices[m] - sp["pivot"]) + sp["pivot"]
    return out


def _draw_rigid(rng, shape, most):
    fa, ft = (int(f) for f in rng.integers(1, most + 1, 2))
    return dict(axis=_unit([*rng.normal(0, 0.25, 2), 1.0]), angle=rng.uniform(0.3, 0.9) * rng.choice([-1, 1]) / fa,
                angle_frequency=fa, translation=rng.uniform(-0.12, 0.12, 3) / ft, translation_frequency=ft,
                phases=rng.uniform(0, TAU, 3))


def rigid_transforms(p, tau, amp=1.0) -> np.ndarray:
    """(T, 4, 4) rotation about an axis near Z through the origin plus a translation, both oscillating and both
    exactly zero at tau = 0 (frame 0 is the identity)."""
    angle = amp * p["angle"] * np.sin(TAU * p["angle_frequency"] * tau)
    phases = np.asarray(p["phases"])
    trans = amp * np.asarray(p["translation"]) * (np.sin(TAU * p["translation_frequency"] * tau[:, None] + phases)
                                                  - np.sin(phases))
    out = np.zeros((len(tau), 4, 4))
    out[:, :3, :3] = axis_angle_matrix(p["axis"], angle)
    out[:, :3, 3] = trans
    out[:, 3, 3] = 1.0
    return out


_MOTIONS = {"articulated": (_draw_articulated, _apply_articulated), "bend_twist": (_draw_bend_twist, _apply_bend_twist),
            "wave": (_draw_wave, _apply_wave), "squash_stretch": (_draw_squash, _apply_squash),
            "spin": (_draw_spin, _apply_spin), "rigid": (_draw_rigid, None)}


# ============================================================================================== appearance
def _palette(rng, count: int) -> np.ndarray:
    hues = (rng.random() + np.arange(count) / count + rng.uniform(-0.08, 0.08, count)) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, rng.uniform(0.35, 0.9), rng.uniform(0.45, 0.95)) for h in hues])


VERTEX_PATTERNS = ("parts", "gradient", "stripes", "spots", "checker")
TEXTURE_PATTERNS = ("checker", "stripes", "dots", "gradient")


def _vertex_colors(rng, shape: Shape, palette) -> tuple[np.ndarray, dict]:
    """A colour field over the rest pose (unit-box coordinates q), optionally with per-part accent colours."""
    lo, hi = shape.vertices.min(0), shape.vertices.max(0)
    q = (shape.vertices - lo) / (hi - lo).max()
    pattern = str(rng.choice(VERTEX_PATTERNS))
    c0, c1 = palette[0], palette[1]
    direction = _unit(rng.normal(size=3))
    info = dict(pattern=pattern)
    if pattern == "parts":
        mix = None
        colors = palette[shape.part_index() % len(palette)]
    elif pattern == "gradient":
        t = q @ direction
        mix = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    elif pattern == "stripes":
        freq = rng.uniform(3.0, 8.0)
        mix = _smoothstep(0.5 + 3.0 * np.sin(TAU * freq * (q @ direction)))
        info.update(frequency=freq, direction=direction)
    elif pattern == "spots":
        centres = q[rng.choice(len(q), size=int(rng.integers(8, 20)))]
        radius = rng.uniform(0.05, 0.12)
        dist = np.linalg.norm(q[:, None] - centres[None], axis=-1).min(1)
        mix = 1.0 - _smoothstep((dist - radius) / (0.3 * radius) + 0.5)
        info.update(radius=radius)
    else:
        cells = int(rng.integers(3, 8))
        mix = (np.floor(q * cells).astype(int).sum(1) % 2).astype(float)
        info.update(cells=cells)
    if mix is not None:
        colors = c0 + mix[:, None] * (c1 - c0)
        if len(shape.parts) > 1 and rng.random() < 0.5:   # accents: the other parts take palette colours
            idx = shape.part_index()
            colors = np.where((idx > 0)[:, None], palette[2 + idx % (len(palette) - 2)], colors)
            info.update(accent_parts=True)
    return np.clip(colors, 0, 1).astype(np.float32), info


def _texture(rng, shape: Shape, palette, size: int = 64) -> tuple[np.ndarray, np.ndarray, dict]:
    """One texture tile per part (up to 4, reused cyclically), side by side; each part's uvs map into its tile with a
    small inset so that bilinear filtering never reaches the neighbouring tile."""
    tiles = min(len(shape.parts), 4)
    c = (np.arange(size) + 0.5) / size
    tu, tv = np.meshgrid(c, 1.0 - c)   # row 0 is the top of the image: v = 1
    image, names = [], []
    for k in range(tiles):
        pattern = str(rng.choice(TEXTURE_PATTERNS))
        a, b = palette[k % len(palette)], palette[(k + 1) % len(palette)]
        cells = int(rng.integers(2, 7))
        if pattern == "checker":
            mix = (np.floor(tu * cells * 2) + np.floor(tv * cells)) % 2
        elif pattern == "stripes":
            mix = (np.floor((tu * rng.choice([0, 1]) + tv) * cells * 2) % 2)
        elif pattern == "dots":
            fu, fv = (tu * cells * 2) % 1 - 0.5, (tv * cells) % 1 - 0.5
            mix = (fu ** 2 + fv ** 2 < 0.09).astype(float)
        else:
            mix = 0.5 + 0.5 * np.sin(TAU * (tu + tv * rng.uniform(0.5, 2.0)))
        image.append(a + mix[..., None] * (b - a))
        names.append(pattern)
    tile = shape.part_index() % tiles
    uvs = np.stack([(tile + 0.03 + 0.94 * shape.uvs[:, 0]) / tiles, 0.03 + 0.94 * shape.uvs[:, 1]], -1)
    return uvs.astype(np.float32), np.concatenate(image, axis=1).astype(np.float32), dict(tile_patterns=names)


# ============================================================================================== the object
def _resolution(detail: int) -> int:
    return 4 * (2 + detail)


def _animate(shape: Shape, motion: str, params: dict, tau, amp: float, yaw: float):
    """Normalised (T, V, 3) float32 vertices, plus the rigid transforms for the rigid family."""
    turn = axis_angle_matrix([0.0, 0.0, 1.0], yaw)
    if motion == "rigid":
        rest = MeshSequence(shape.vertices[None] @ turn.T, np.zeros((0, 3))).normalized().vertices[0]
        transforms = rigid_transforms(params, tau, amp)
        moved = np.einsum("tij,vj->tvi", transforms[:, :3, :3], rest.astype(np.float64)) + transforms[:, None, :3, 3]
        return moved.astype(np.float32), transforms
    frames = _MOTIONS[motion][1](shape, params, tau, amp) @ turn.T
    return MeshSequence(frames, np.zeros((0, 3))).normalized().vertices, None


def _fit(shape, motion, params, tau, yaw):
    """Scale the drawn motion (from 1, by 0.8 down or 1.25 up) until the object stays inside the bounds and under
    the speed limit and still moves enough; (vertices, transforms, scale), or None when no scale up to ~3 does."""
    amp = 1.0
    for _ in range(20):
        verts, transforms = _animate(shape, motion, params, tau, amp, yaw)
        faults = motion_faults(verts)
        inside, moving = not ({"bounds", "speed"} & faults.keys()), "static" not in faults
        if inside and moving:
            return verts, transforms, amp
        if not inside:
            amp *= 0.8
        elif amp >= 2.5:
            return None
        else:
            amp *= 1.25
    return None


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def make_object(seed: int, num_frames: int = 24, *, shape: str | None = None, motion: str | None = None,
                detail: int = 1) -> tuple[MeshSequence, dict]:
    """A procedural animated mesh and its metadata; a pure function of the arguments.

    shape, motion: names from families() or None (drawn from the seed; the draw happens either way, so naming the
    family a seed would draw gives the identical object). num_frames >= 2. detail: 0..4, the ring resolution
    4·(2 + detail); detail 1 gives about 1-3k triangles, and the count grows with the square of the resolution.

    Returns a MeshSequence normalised by frame 0 (centred, largest extent 1, Z up) with either per-vertex colours or
    uvs + texture, and a JSON-serialisable dict: seed, num_frames, detail, shape, motion, shape_params,
    motion_params, appearance (mode "vertex_colors" | "texture", palette, pattern names), parts ([name, start, stop]
    vertex ranges, each a closed surface), yaw, amplitude (the scale the bounds fit applied to the drawn motion),
    attempt, mean_displacement, max_abs_coordinate, num_vertices, num_faces, and for motion "rigid" also
    rigid_transforms: (T, 4, 4) nested lists with vertices[t] = R_t · vertices[0] + t_t (frame 0 the identity).
    """
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"make_object: unknown shape {shape!r}; choose one of {', '.join(SHAPES)} (or None)")
    if motion is not None and motion not in MOTIONS:
        raise ValueError(f"make_object: unknown motion {motion!r}; choose one of {', '.join(MOTIONS)} (or None)")
    if int(num_frames) < 2:
        raise ValueError(f"make_object: num_frames must be at least 2 (a motion needs two frames), got {num_frames}")
    if not 0 <= int(detail) <= 4:
        raise ValueError(f"make_object: detail must be in 0..4, got {detail}")
    rng = np.random.default_rng(seed)
    drawn_shape, drawn_motion = SHAPES[rng.integers(len(SHAPES))], MOTIONS[rng.integers(len(MOTIONS))]
    shape_name, motion_name = shape or drawn_shape, motion or drawn_motion
    tau = np.arange(num_frames) / num_frames
    for attempt in range(_ATTEMPTS):
        textured = bool(rng.random() < TEXTURE_PROBABILITY)
        sh = _SHAPE_BUILDERS[shape_name](rng, _resolution(int(detail)), textured)
        params = _MOTIONS[motion_name][0](rng, sh, 2 if num_frames >= 8 else 1)
        yaw = float(rng.uniform(-0.6, 0.6))
        palette = _palette(rng, int(rng.integers(3, 6)))
        if textured:
            uvs, texture, look = _texture(rng, sh, palette)
            colors = None
        else:
            colors, look = _vertex_colors(rng, sh, palette)
            uvs = texture = None
        fitted = _fit(sh, motion_name, params, tau, yaw)
        if fitted is not None:
            break
    else:
        raise RuntimeError(f"make_object: no valid {shape_name}/{motion_name} object for seed {seed} "
                           f"in {_ATTEMPTS} attempts")
    verts, transforms, amp = fitted
    seq = MeshSequence(verts, sh.faces, colors=colors, uvs=uvs, texture=texture)
    meta = dict(seed=int(seed), num_frames=int(num_frames), detail=int(detail), shape=shape_name, motion=motion_name,
                shape_params=sh.params, motion_params=params,
                appearance=dict(mode="texture" if textured else "vertex_colors", palette=palette, **look),
                parts=[[name, start, stop] for name, start, stop in sh.parts], yaw=yaw, amplitude=amp,
                attempt=attempt, mean_displacement=mean_displacement(verts),
                max_abs_coordinate=float(np.abs(verts).max()), num_vertices=len(sh.vertices), num_faces=len(sh.faces))
    if transforms is not None:
        meta["rigid_transforms"] = transforms
    return seq, _jsonable(meta)


if __name__ == "__main__":  # `python -m data_rendering.synthetic --out data/synth --num 200` writes a whole dataset
    # Run data_rendering/synthetic_dataset.py as the program, exactly as `python -m data_rendering.synthetic_dataset`
    # (same arguments and exit status). runpy, not an import, keeps the dependency one-way: synthetic_dataset imports
    # this module, never the reverse. alter_sys=True makes it the real __main__ module, which the spawned --workers
    # processes need to find its functions.
    import runpy

    runpy.run_module("data_rendering.synthetic_dataset", run_name="__main__", alter_sys=True)
