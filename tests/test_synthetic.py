"""data_rendering/synthetic.py: procedural animated meshes, checked with geometry computed here (volumes by the
divergence theorem, pairwise distances, welded edges, hand-built bone chains), never with the module's own helpers."""
import itertools
import json
import math

import numpy as np
import pytest

from data_rendering import synthetic as S
from data_rendering.mesh import MeshSequence

COMBOS = list(itertools.product(S.SHAPES, S.MOTIONS))


# ----------------------------------------------------------------------------- independent geometry
def displacement(v):
    v = np.asarray(v, np.float64)
    return np.linalg.norm(v - v[:1], axis=-1).mean()


def areas(v, f):
    v = np.asarray(v, np.float64)
    a, b, c = v[..., f[:, 0], :], v[..., f[:, 1], :], v[..., f[:, 2], :]
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=-1)


def signed_volume(v, f):
    """Divergence theorem: sum over triangles of det[a, b, c] / 6 (positive for outward-wound closed surfaces)."""
    v = np.asarray(v, np.float64)
    return np.einsum("...i,...i->...", v[..., f[:, 0], :], np.cross(v[..., f[:, 1], :], v[..., f[:, 2], :])).sum(-1) / 6


def parts_of(meta):
    return {name: (start, stop) for name, start, stop in meta["parts"]}


def part_faces(faces, start, stop):
    keep = (faces >= start).all(1) & (faces < stop).all(1)
    return faces[keep]


def rigid_residual(p0, pt, count=150):
    """Largest change of a pairwise distance between frame 0 and frame t (0 for a rigid motion)."""
    idx = np.linspace(0, len(p0) - 1, min(count, len(p0))).astype(int)
    a, b = np.asarray(p0, np.float64)[idx], np.asarray(pt, np.float64)[idx]
    d0 = np.linalg.norm(a[:, None] - a[None], axis=-1)
    dt = np.linalg.norm(b[:, None] - b[None], axis=-1)
    return np.abs(d0 - dt).max()


def rot(axis, angle):
    """Hand-written rotation about a coordinate axis."""
    c, s = math.cos(angle), math.sin(angle)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


@pytest.fixture(scope="module")
def objects():
    """One object per (shape, motion), with a different seed each."""
    return {(sh, mo): S.make_object(100 + 7 * i, shape=sh, motion=mo) for i, (sh, mo) in enumerate(COMBOS)}


# ----------------------------------------------------------------------------- API
def test_families_and_bad_names():
    fam = S.families()
    assert set(fam) == {"shapes", "motions"}
    assert len(fam["shapes"]) >= 5 and len(fam["motions"]) >= 6
    assert "rigid" in fam["motions"]
    with pytest.raises(ValueError) as e:
        S.make_object(0, shape="teapot")
    assert all(name in str(e.value) for name in fam["shapes"])
    with pytest.raises(ValueError) as e:
        S.make_object(0, motion="teleport")
    assert all(name in str(e.value) for name in fam["motions"])
    with pytest.raises(ValueError):
        S.make_object(0, num_frames=1)


def test_deterministic_by_seed():
    a, meta_a = S.make_object(1234)
    b, meta_b = S.make_object(1234)
    for field in ("vertices", "faces", "colors", "uvs", "texture"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or (x.dtype == y.dtype and np.array_equal(x, y)), field
    assert meta_a == meta_b
    # naming the families the seed draws anyway gives the identical object
    c, meta_c = S.make_object(1234, shape=meta_a["shape"], motion=meta_a["motion"])
    assert np.array_equal(a.vertices, c.vertices) and meta_a == meta_c
    # other seeds give other objects
    others = [S.make_object(s, shape=meta_a["shape"], motion=meta_a["motion"])[0] for s in (1235, 1236)]
    for o in others:
        assert o.vertices.shape != a.vertices.shape or not np.allclose(o.vertices, a.vertices)


def test_random_choice_covers_families_and_both_colour_paths():
    metas = [S.make_object(seed, num_frames=4)[1] for seed in range(40)]
    assert len({m["shape"] for m in metas}) >= 5 and len({m["motion"] for m in metas}) >= 5
    modes = {m["appearance"]["mode"] for m in metas}
    assert modes == {"texture", "vertex_colors"}


def test_detail_knob_changes_triangle_count():
    counts = [len(S.make_object(5, shape="creature", motion="wave", detail=d)[0].faces) for d in range(4)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    with pytest.raises(ValueError):
        S.make_object(5, detail=9)


# ----------------------------------------------------------------------------- every object
def test_frame0_normalised(objects):
    for (sh, mo), (seq, meta) in objects.items():
        v0 = seq.vertices[0].astype(np.float64)
        lo, hi = v0.min(0), v0.max(0)
        assert np.abs((lo + hi) / 2).max() < 1e-6, (sh, mo)
        assert abs((hi - lo).max() - 1.0) < 1e-5, (sh, mo)


@pytest.mark.parametrize("shape,motion", COMBOS)
def test_every_combination_is_a_valid_moving_mesh(objects, shape, motion):
    seq, meta = objects[(shape, motion)]
    assert isinstance(seq, MeshSequence) and seq.num_frames == 24
    v, f = seq.vertices, seq.faces
    assert v.dtype == np.float32 and np.isfinite(v).all()
    assert f.min() >= 0 and f.max() < v.shape[1]
    assert (f[:, 0] != f[:, 1]).all() and (f[:, 1] != f[:, 2]).all() and (f[:, 0] != f[:, 2]).all()
    assert 800 <= len(f) <= 5000
    assert areas(v, f).min() > 1e-9                       # no degenerate triangle in any frame
    assert displacement(v) > 0.01                          # passes the published renderer's static test
    assert np.abs(v).max() <= 0.75 + 1e-6
    # smooth in time: no vertex jumps far between consecutive frames
    assert np.linalg.norm(np.diff(v.astype(np.float64), axis=0), axis=-1).max() <= 0.1 + 1e-6
    # appearance: exactly one of the two MeshSequence paths, values in range
    if seq.texture is None:
        assert seq.colors.shape == (v.shape[1], 3) and 0 <= seq.colors.min() and seq.colors.max() <= 1
    else:
        assert seq.colors is None and seq.uvs.shape == (v.shape[1], 2)
        assert 0 <= seq.uvs.min() and seq.uvs.max() <= 1 and seq.texture.ndim == 3 and seq.texture.shape[2] == 3
    # metadata: JSON round trip, the names given, parts tiling the vertices
    assert json.loads(json.dumps(meta)) == meta
    assert meta["shape"] == shape and meta["motion"] == motion
    ranges = sorted((start, stop) for _, start, stop in meta["parts"])
    assert ranges[0][0] == 0 and ranges[-1][1] == v.shape[1]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("shape", S.SHAPES)
def test_closed_and_consistently_wound(objects, shape):
    """Each part is a closed surface wound outwards: after welding coincident vertices (uv seams), every directed
    edge appears once and its reverse once, and the divergence-theorem volume of every part is positive."""
    for motion in ("spin", "wave"):   # one coloured or textured object each, whatever the seed drew
        seq, meta = objects[(shape, motion)]
        v0, f = seq.vertices[0], seq.faces
        _, weld = np.unique(v0, axis=0, return_inverse=True)
        wf = weld.reshape(-1)[f]
        edges = np.concatenate([wf[:, [0, 1]], wf[:, [1, 2]], wf[:, [2, 0]]])
        edge_set = {tuple(e) for e in edges.tolist()}
        assert len(edge_set) == len(edges), "a directed edge is used twice: inconsistent winding"
        assert all((b, a) in edge_set for a, b in edge_set), "open boundary"
        for name, (start, stop) in parts_of(meta).items():
            assert signed_volume(v0, part_faces(f, start, stop)) > 0, name


@pytest.mark.parametrize("frames,seeds", [(2, (40, 44)), (3, (41,))])
def test_short_clips_still_move(frames, seeds):
    """Few frames catch little of a drawn motion (seed 40's tree/spin moves < 0.01 at its drawn size in 2 frames)."""
    for shape, motion in COMBOS:
        for seed in seeds:
            seq, _ = S.make_object(seed, num_frames=frames, shape=shape, motion=motion, detail=0)
            assert seq.num_frames == frames
            assert displacement(seq.vertices) > 0.01, (shape, motion, seed)
            assert np.abs(seq.vertices).max() <= 0.75 + 1e-6


def test_many_seeds_pass_the_bounds_and_motion_checks():
    for seed in range(300, 330):
        seq, meta = S.make_object(seed, num_frames=12, detail=0)
        assert displacement(seq.vertices) > 0.01, seed
        assert np.abs(seq.vertices).max() <= 0.75 + 1e-6, seed


# ----------------------------------------------------------------------------- rigid
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rigid_transforms_are_exact(seed):
    seq, meta = S.make_object(seed, shape=S.SHAPES[seed % len(S.SHAPES)], motion="rigid")
    T = np.array(meta["rigid_transforms"], np.float64)
    assert T.shape == (seq.num_frames, 4, 4)
    assert np.array_equal(T[0], np.eye(4))
    v = seq.vertices.astype(np.float64)
    for t in range(seq.num_frames):
        R, tr = T[t, :3, :3], T[t, :3, 3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12) and abs(np.linalg.det(R) - 1) < 1e-12
        assert np.abs(v[0] @ R.T + tr - v[t]).max() < 1e-6
    f = seq.faces
    lengths = np.linalg.norm(v[:, f[:, 0]] - v[:, f[:, 1]], axis=-1)
    assert np.abs(lengths - lengths[:1]).max() < 1e-5
    assert displacement(v) > 0.01


# ----------------------------------------------------------------------------- skinning
def test_forward_kinematics_and_lbs_match_a_hand_computation():
    # Two bones along +X: bone 0 pivots at the origin, bone 1 (its child) at (1, 0, 0). Both turn 90 degrees about Z.
    parents, joints = [-1, 0], np.array([[0.0, 0, 0], [1.0, 0, 0]])
    quarter = rot("z", math.pi / 2)
    rotations = np.stack([np.stack([np.eye(3), np.eye(3)]), np.stack([quarter, quarter])])  # frame 0 rest, frame 1
    G = S.forward_kinematics(parents, joints, rotations)
    assert np.allclose(G[0], np.eye(4))
    rest = np.array([[0.5, 0.0, 0.0],    # 100% bone 0
                     [2.0, 0.0, 0.0],    # 100% bone 1
                     [1.0, 0.5, 0.0]])   # 50/50
    weights = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    posed = S.linear_blend_skinning(rest, weights, G)
    assert np.allclose(posed[0], rest)
    # by hand: bone 0 takes (x, y) to (-y, x). Bone 1 turns about its pivot (1,0,0) first: (2,0,0) -> (1,1,0),
    # then bone 0's turn: (1,1,0) -> (-1,1,0).
    assert np.allclose(posed[1, 0], [0.0, 0.5, 0.0], atol=1e-12)
    assert np.allclose(posed[1, 1], [-1.0, 1.0, 0.0], atol=1e-12)
    # the 50/50 vertex: bone 0 gives (-0.5, 1, 0); bone 1 gives (1,0.5,0)->(0.5,0,0)->(0,0.5,0); average
    assert np.allclose(posed[1, 2], [(-0.5 + 0.0) / 2, (1.0 + 0.5) / 2, 0.0], atol=1e-12)
    with pytest.raises(ValueError):
        S.forward_kinematics([1, -1], joints, rotations)   # a child before its parent


def test_chain_weights_partition_of_unity():
    s = np.linspace(0, 3, 301)
    w = S.chain_weights(s, 3, blend=0.25)
    assert w.shape == (301, 3) and (w >= 0).all() and np.allclose(w.sum(1), 1.0)
    for b in range(3):                      # the middle of each bone belongs to it alone
        assert np.allclose(S.chain_weights(np.array([b + 0.5]), 3, 0.25)[0], np.eye(3)[b])
    assert np.abs(np.diff(w, axis=0)).max() < 0.05   # smooth blend across the joints (no jumps)
    at_joint = S.chain_weights(np.array([1.0]), 3, 0.25)[0]
    assert np.allclose(at_joint, [0.5, 0.5, 0.0])


def test_articulated_creature_single_bone_parts_are_rigid_and_limbs_bend(objects):
    seq, meta = objects[("creature", "articulated")]
    parts, v = parts_of(meta), seq.vertices
    for name in ("torso", "head"):        # weighted 100% to one bone: follow it rigidly
        start, stop = parts[name]
        assert max(rigid_residual(v[0, start:stop], v[t, start:stop]) for t in range(seq.num_frames)) < 1e-5
    bends = []
    for name in ("leg_l", "leg_r"):       # two bones blended at the knee: not rigid
        start, stop = parts[name]
        bends.append(max(rigid_residual(v[0, start:stop], v[t, start:stop]) for t in range(seq.num_frames)))
    assert max(bends) > 1e-3


# ----------------------------------------------------------------------------- spin, wave, squash, bend
@pytest.mark.parametrize("shape", S.SHAPES)
def test_spinning_parts_are_rigid_and_the_rest_is_still(objects, shape):
    seq, meta = objects[(shape, "spin")]
    parts, v = parts_of(meta), seq.vertices
    spinning = {name for sp in meta["motion_params"]["spinners"] for name in sp["parts"]}
    assert spinning
    for name, (start, stop) in parts.items():
        residual = max(rigid_residual(v[0, start:stop], v[t, start:stop]) for t in range(seq.num_frames))
        assert residual < 1e-5, name
        moved = np.abs(v[:, start:stop] - v[:1, start:stop]).max()
        assert (moved > 0.01) if name in spinning else (moved == 0.0), name


def test_waving_flag_keeps_pole_and_attached_edge_fixed(objects):
    seq, meta = objects[("flag", "wave")]
    parts, v = parts_of(meta), seq.vertices.astype(np.float64)
    for name in ("pole", "finial"):
        start, stop = parts[name]
        assert np.array_equal(v[:, start:stop], np.broadcast_to(v[:1, start:stop], v[:, start:stop].shape))
    start, stop = parts["pole"]
    axis_xy = v[0, start:stop, :2].mean(0)
    start, stop = parts["sheet"]
    sheet = v[:, start:stop]
    dist = np.linalg.norm(sheet[0, :, :2] - axis_xy, axis=-1)
    attached = dist < dist.min() + 1e-4
    far = dist >= np.quantile(dist, 0.9)           # (frame 0 is already waving, so the free edge is not straight)
    assert attached.sum() >= 4 and far.sum() >= 4
    motion = np.linalg.norm(sheet - sheet[:1], axis=-1).max(0)
    assert motion[attached].max() < 1e-7
    assert motion[far].max() > 0.05


@pytest.mark.parametrize("shape", S.SHAPES)
def test_squash_and_stretch_preserves_volume(objects, shape):
    seq, meta = objects[(shape, "squash_stretch")]
    vol = signed_volume(seq.vertices, seq.faces)
    assert vol[0] > 0
    assert np.abs(vol / vol[0] - 1).max() < 0.03
    extents = np.ptp(seq.vertices.astype(np.float64), axis=1)
    assert np.abs(extents / extents[:1] - 1).max() > 0.03      # it really squashes


def _rod(length=2.0, count=21):
    """A bare Shape: points on the Z axis plus a point off it, for checking the deformation formulas by hand."""
    pts = np.concatenate([np.outer(np.linspace(0, length, count), [0, 0, 1.0]), [[0.3, 0.0, length]]])
    z = np.array([0.0, 0.0, 1.0])
    return S.Shape("rod", pts, np.zeros((0, 3), np.int64), np.zeros((len(pts), 2)), [("rod", 0, len(pts))],
                   (np.zeros(3), z, length), np.outer([0, length], z), {}, [])


def test_bend_maps_the_axis_onto_a_circular_arc():
    rod = _rod()
    length = rod.axis[2]
    params = dict(bend=0.9, twist=0.0, bend_frequency=1, twist_frequency=1, azimuth=0.0, swirl=0,
                  phases=[math.pi / 2, 0.0])                   # sin = 1 at tau = 0: full bend angle
    out = S._apply_bend_twist(rod, params, np.array([0.0]), 1.0)[0]
    kappa = 0.9 / length
    radius = 1 / kappa
    axis_pts, z = out[:-1], rod.vertices[:-1, 2]
    # the bend direction is some unit vector e perpendicular to Z; the centre of curvature is at radius·e
    e = axis_pts[-1, :2] / np.linalg.norm(axis_pts[-1, :2])
    centre = np.array([*(radius * e), 0.0])
    assert np.allclose(np.linalg.norm(axis_pts - centre, axis=1), radius, atol=1e-12)
    # arc length from the base equals the original height
    start = -centre / radius
    cosang = np.clip(((axis_pts - centre) / radius) @ start, -1, 1)
    assert np.allclose(np.arccos(cosang) * radius, z, atol=1e-9)


def test_twist_turns_sections_by_an_angle_growing_with_height():
    rod = _rod()
    params = dict(bend=0.0, twist=0.7, bend_frequency=1, twist_frequency=1, azimuth=0.0, swirl=0,
                  phases=[0.0, math.pi / 2])
    out = S._apply_bend_twist(rod, params, np.array([0.0]), 1.0)[0]
    assert np.allclose(out[:-1], rod.vertices[:-1], atol=1e-12)     # the axis itself does not move
    tip = out[-1]                                                   # (0.3, 0, L) turns by the full 0.7 rad
    assert np.allclose(tip, [0.3 * math.cos(0.7), 0.3 * math.sin(0.7), rod.axis[2]], atol=1e-12)
