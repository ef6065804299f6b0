import torch

from models.motion_vae import MotionVAE, pad_gaussians
from reference import load_golden, load_golden_weights, load_manifest, rel_err
from utils.config import load_config


def _golden(dtype=torch.float32):
    t, meta = load_golden("motion_vae")
    model = MotionVAE(**meta["config"]["model"]).eval()
    model.load_state_dict(load_golden_weights("motion_vae"), strict=True)
    return model.to(dtype), {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in t.items()}, meta["tolerance"]


def test_golden_encoder():
    for dtype, tol_key, prefix in ((torch.float32, "tol", "enc.out."), (torch.float64, "tol64", "enc.out64.")):
        model, t, tol = _golden(dtype)
        queries, lengths = pad_gaussians([t["in.static_gs0"], t["in.static_gs1"]])
        with torch.no_grad():
            enc = model.encode(t["in.static_pc"], t["in.delta_pc"], queries, lengths)
        tol = tol[tol_key]
        assert rel_err(enc.posterior.mean.flatten(0, 1), t[prefix + "mean"]) <= tol
        assert rel_err(enc.posterior.logvar.flatten(0, 1), t[prefix + "logvar"]) <= tol
        assert rel_err(enc.delta_interp, t[prefix + "delta_interp"]) <= tol
        if dtype == torch.float32:
            assert rel_err(enc.kl().flatten(), t["enc.out.kl"]) <= tol
            assert rel_err(enc.anchors, t["enc.out.sampled_static_gs"]) <= tol
            offsets = torch.tensor([[0], [100]])  # golden indices are global rows of cat(gs0, gs1)
            assert torch.equal((enc.anchor_index + offsets).flatten(), t["enc.out.fps_index"])


def test_golden_decoder():
    for dtype, tol_key, key in ((torch.float32, "tol", "dec.out.delta"), (torch.float64, "tol64", "dec.out64.delta")):
        model, t, tol = _golden(dtype)
        queries, lengths = pad_gaussians([t["in.static_gs0"], t["in.static_gs1"]])
        assert torch.equal(queries, t["dec.in.queries"]) and torch.equal(lengths, t["dec.in.lengths"])
        with torch.no_grad():
            delta = model.decode(t["dec.in.z"].unflatten(0, (2, 3)), queries)
        assert rel_err(delta, t[key]) <= tol[tol_key]


def test_paper_config_loads_the_published_manifest_strictly():
    manifest = load_manifest("motion_vae")
    model = MotionVAE(**load_config("configs/vae.yml").model)
    assert sum(p.numel() for p in model.parameters()) == 125_206_318 == manifest["num_params"]
    g = torch.Generator().manual_seed(0)
    dtypes = {k: getattr(torch, v.split(".")[-1]) for k, v in manifest["non_float32_entries"].items()}
    sd = {k: torch.randn(shape, generator=g, dtype=dtypes.get(k, torch.float32)) for k, shape in manifest["state_dict"].items()}
    model.load_state_dict(sd, strict=True)
    assert model.position_encoding[0].omega.dtype == torch.float64
    assert set(model.state_dict()) == set(manifest["state_dict"])


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = MotionVAE(**load_config("configs/tiny/vae.yml").model).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(seed)
    n_pts, n_gs = model.num_inputs, 300
    static = torch.rand(2, n_pts, 3, generator=g) - 0.5
    delta = torch.randn(2, 4, n_pts, 3, generator=g) * 0.05
    gs = torch.cat([torch.rand(2, n_gs, 3, generator=g) - 0.5, torch.randn(2, n_gs, 11, generator=g)], -1)
    return model, static, delta, gs


def test_frames_in_one_batch_equal_frame_by_frame():
    model, static, delta, gs = _tiny()
    with torch.no_grad():
        enc = model.encode(static, delta, gs)
        out = model.decode(enc.posterior.mean, gs)
        for t in range(delta.shape[1]):
            one = model.encode(static, delta[:, t:t + 1], gs)
            torch.testing.assert_close(one.posterior.mean[:, 0], enc.posterior.mean[:, t], rtol=0, atol=1e-5)
            torch.testing.assert_close(model.decode(one.posterior.mean, gs)[:, 0], out[:, t], rtol=0, atol=1e-5)


def test_decoder_chunking_and_checkpointing_do_not_change_the_result():
    model, static, delta, gs = _tiny(1)
    z = torch.randn(2, 3, model.num_latents, model.latent_dim)
    ref = model.decode(z, gs)
    model.chunk_size = 7
    torch.testing.assert_close(model.decode(z, gs), ref, rtol=0, atol=1e-6)
    model.train()
    for layer in model.modules():  # no DropPath: only the checkpointing differs
        if hasattr(layer, "drop_path"):
            layer.drop_path = 0.0
    model.use_checkpoint = True
    zz = z.clone().requires_grad_(True)
    out = model.decode(zz, gs)
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-6)
    assert torch.isfinite(zz.grad).all() and zz.grad.abs().sum() > 0


def test_untrained_variation_is_zero():
    model = MotionVAE(**load_config("configs/tiny/vae.yml").model)
    _, static, delta, gs = _tiny()
    out, enc = model(static, delta, gs)
    assert torch.equal(out, torch.zeros(2, 4, gs.shape[1], 14))
    assert enc.kl().shape == (2, 4)


def test_golden_xyz_loss():
    from utils.losses import mesh_guided_xyz_loss

    t, meta = load_golden("motion_vae")
    queries, lengths = pad_gaussians([t["in.static_gs0"], t["in.static_gs1"]])
    loss, target = mesh_guided_xyz_loss(t["xyzloss.in.pred_delta"], queries[..., :3], lengths, t["in.static_pc"],
                                        t["in.static_pc"][:, None] + t["in.delta_pc"])
    assert rel_err(target, t["xyzloss.out.target"]) <= meta["tolerance"]["tol"]
    assert rel_err(loss, t["xyzloss.out.loss"]) <= meta["tolerance"]["tol"]
    # Padding never contributes: changing predictions on pad rows leaves the loss unchanged.
    pred = t["xyzloss.in.pred_delta"].clone()
    pred[1, :, 80:] += 5.0
    assert torch.equal(mesh_guided_xyz_loss(pred, queries[..., :3], lengths, t["in.static_pc"],
                                            t["in.static_pc"][:, None] + t["in.delta_pc"])[0], loss)
