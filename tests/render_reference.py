"""A brute-force float64 rasterizer written independently of utils/render.py: every Gaussian at every pixel,
visited in depth order, no tiles, no culling boxes. Tests (CPU and GPU) hold both backends to it."""
import numpy as np
import torch


def random_scene(n, seed, batch=(), device="cpu", dtype=torch.float32, spread=0.5, scale_range=(-5.5, -3.5)):
    """Random Gaussians in a cube of half-size `spread` around the origin (our pre-activation parameters)."""
    from utils.gaussians import Gaussians

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*batch, n, *s, generator=g, dtype=torch.float64)
    xyz = (r(3) * 2 - 1) * spread
    f_dc = (r(3) * 2 - 1) * 1.5
    opacity_logit = (r(1) * 2 - 1) * 3
    scale_pre = scale_range[0] + r(3) * (scale_range[1] - scale_range[0])
    quat = torch.randn(*batch, n, 4, generator=g, dtype=torch.float64)
    return Gaussians(xyz, f_dc, opacity_logit, scale_pre, quat).to(device=device, dtype=dtype)


def _rotmat(q):
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def reference_render(gaussians, viewmat, k_norm, width, height, eps2d=0.1, near=0.01, far=1e10, background=(0, 0, 0)):
    """One set (N,) and one camera: viewmat (4,4) OpenCV w2c, normalised K.

    Returns rgb (H,W,3), alpha (H,W), depth (H,W) and the number of pixels stopped by the transmittance cut-off."""
    gg = gaussians.to(device="cpu", dtype=torch.float64).detach()
    xyz, rgb_all = gg.xyz.numpy(), gg.rgb.numpy()
    quat, scale, opac = gg.quat.numpy(), gg.scale.numpy(), gg.opacity.numpy()[:, 0]
    vm = np.asarray(viewmat, dtype=np.float64)
    k = np.asarray(k_norm, dtype=np.float64)
    fx, fy, cx, cy = k[0, 0] * width, k[1, 1] * height, k[0, 2] * width, k[1, 2] * height
    rot, t = vm[:3, :3], vm[:3, 3]

    splats = []
    for i in range(len(xyz)):
        pc = rot @ xyz[i] + t
        z = pc[2]
        if z < near or z > far:
            continue
        m = _rotmat(quat[i]) @ np.diag(scale[i])
        cov_c = rot @ (m @ m.T) @ rot.T
        tanx, tany = 0.5 * width / fx, 0.5 * height / fy
        u = np.clip(pc[0] / z, -(cx / fx + 0.3 * tanx), (width - cx) / fx + 0.3 * tanx)
        v = np.clip(pc[1] / z, -(cy / fy + 0.3 * tany), (height - cy) / fy + 0.3 * tany)
        jac = np.array([[fx / z, 0, -fx * u / z], [0, fy / z, -fy * v / z]])
        cov = jac @ cov_c @ jac.T
        det0 = np.linalg.det(cov)
        cov = cov + eps2d * np.eye(2)
        det = np.linalg.det(cov)
        if det <= 0:
            continue
        o = opac[i] * np.sqrt(max(0.0, det0 / det))
        splats.append((z, i, np.array([fx * pc[0] / z + cx, fy * pc[1] / z + cy]), np.linalg.inv(cov), o))
    splats.sort(key=lambda s: (s[0], s[1]))

    jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    trans = np.ones((height, width))
    done = np.zeros((height, width), dtype=bool)
    color = np.zeros((height, width, 3))
    depth = np.zeros((height, width))
    for z, i, mean, conic, o in splats:
        dx, dy = mean[0] - jj, mean[1] - ii
        sigma = 0.5 * (conic[0, 0] * dx * dx + conic[1, 1] * dy * dy) + conic[0, 1] * dx * dy
        alpha = np.minimum(0.999, o * np.exp(-sigma))
        hit = (sigma >= 0) & (alpha >= 1 / 255) & ~done
        nxt = trans * (1 - alpha)
        stop = hit & (nxt <= 1e-4)
        done |= stop
        hit &= ~stop
        w = np.where(hit, alpha * trans, 0.0)
        color += w[..., None] * rgb_all[i]
        depth += w * z
        trans = np.where(hit, nxt, trans)
    alpha_img = 1 - trans
    color += trans[..., None] * np.asarray(background, dtype=np.float64)
    return color, alpha_img, depth / np.maximum(alpha_img, 1e-10), int(done.sum())
