import torch

from models.dit import DiT
from reference import load_golden, load_golden_weights, load_manifest, rel_err
from utils.config import load_config


def _golden_model(dtype=torch.float32):
    t, meta = load_golden("dit")
    model = DiT(**meta["config"]["model"]).eval()
    model.load_state_dict(load_golden_weights("dit"), strict=True)
    return model.to(dtype), t, meta["tolerance"]


def _run(model, t, dtype):
    args = [t[k].to(dtype) for k in ("in.x", "in.t", "in.cond_images", "in.static_latent", "in.deformation_position_xyz")]
    return model(*args)


def test_golden_dit_forward_stage_by_stage():
    model, t, tol = _golden_model()
    assert rel_err(model.t_embedder(t["in.t"]), t["dbg.t_emb"]) <= tol["tol"]
    assert rel_err(model.pos_embedder(t["in.deformation_position_xyz"]), t["dbg.pos_embed"]) <= tol["tol"]
    blocks = []
    hooks = [blk.register_forward_hook(lambda m, i, o: blocks.append(o)) for blk in model.blocks]
    with torch.no_grad():
        out = _run(model, t, torch.float32)
    for h in hooks:
        h.remove()
    assert rel_err(blocks[0], t["dbg.block0"]) <= tol["tol"]
    assert rel_err(blocks[1], t["dbg.block1"]) <= tol["tol"]
    assert rel_err(out, t["out.v"]) <= tol["tol"]
    model64, _, _ = _golden_model(torch.float64)
    with torch.no_grad():
        assert rel_err(_run(model64, t, torch.float64), t["out64.v"]) <= tol["tol64"]


def test_paper_config_loads_the_published_manifest_strictly():
    manifest = load_manifest("dit")
    cfg = load_config("configs/diffusion.yml")
    model = DiT(**cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 105_511_440 == manifest["num_params"]
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in manifest["state_dict"].items()}
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.blocks[7].static_cross_attn.to_kv.weight, sd["blocks.7.static_cross_attn.to_kv.weight"])
    assert set(model.state_dict()) == set(manifest["state_dict"])


def test_untrained_model_predicts_zero_and_any_frame_count_works():
    cfg = load_config("configs/tiny/diffusion.yml").model
    model = DiT(**cfg).eval()
    b, n = 2, cfg.resolution
    g = torch.Generator().manual_seed(1)
    cond = lambda t_len: dict(cond_images=torch.randn(b, t_len, 6, cfg.image_cond_channels, generator=g),
                              static_latent=torch.randn(b, 20, 14, generator=g),
                              deformation_position_xyz=torch.rand(b, n, 3, generator=g) - 0.5)
    x = torch.randn(b, 3, n, cfg.in_channels, generator=g)
    assert torch.equal(model(x, torch.tensor([5.0, 900.0]), **cond(3)), torch.zeros_like(x))  # zero-initialised output layers
    for p in model.parameters():  # make every layer matter
        torch.nn.init.normal_(p, std=0.05)
    for t_len in (1, 5):
        c = cond(t_len)
        # Frames carry no position embedding: identical frames (latents and image tokens) give identical outputs.
        c["cond_images"] = c["cond_images"][:, :1].expand(-1, t_len, -1, -1)
        xs = x[:, :1].expand(-1, t_len, -1, -1)
        out = model(xs, torch.tensor([5.0, 900.0]), **c)
        assert out.shape == (b, t_len, n, cfg.out_channels)
        torch.testing.assert_close(out, out[:, :1].expand_as(out), rtol=0, atol=1e-5)
    # ... and frames do interact through temporal attention: changing frame 0 changes frame 1.
    c = cond(2)
    out = model(x[:, :2], torch.tensor([5.0, 900.0]), **c)
    x2 = x[:, :2].clone()
    x2[:, 0] += 1
    assert (model(x2, torch.tensor([5.0, 900.0]), **c)[:, 1] - out[:, 1]).abs().max() > 1e-3


def test_golden_training_loss_with_the_dit():
    from models.diffusion import GaussianDiffusion

    model, t, tol = _golden_model()
    diffusion = GaussianDiffusion.from_config(load_golden("diffusion")[1]["config"]["diffusion"])
    cond = dict(cond_images=t["in.cond_images"], static_latent=t["in.static_latent"],
                deformation_position_xyz=t["in.deformation_position_xyz"])
    x0, noise, steps = t["loss.in.x_start"], t["loss.in.noise"], t["loss.in.t"]
    assert rel_err(diffusion.q_sample(x0, steps, noise), t["loss.out.x_t"]) <= tol["tol"]
    with torch.no_grad():
        out = model(t["loss.out.x_t"], diffusion.model_time(steps), **cond)
        mse = diffusion.training_loss(model, x0, steps, noise, **cond)
    assert rel_err(out, t["loss.out.model_output"]) <= tol["tol"]
    assert rel_err(mse, t["loss.out.mse"]) <= tol["tol"]


def test_low_rank_static_path_equals_the_published_form(monkeypatch):
    """The GPU path runs the static cross-attention in the condition's input space: the same function, and (training)
    the same parameter gradients."""
    cfg = load_config("configs/tiny/diffusion.yml").model
    torch.manual_seed(3)
    model = DiT(**cfg).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    b, n, t_len = 2, cfg.resolution, 3
    args = (torch.randn(b, t_len, n, cfg.in_channels), torch.tensor([5.0, 900.0]),
            torch.randn(b, t_len, 6, cfg.image_cond_channels), torch.randn(b, 20, 14), torch.rand(b, n, 3) - 0.5)
    args = [a.double() for a in args]
    weight = torch.randn(b, t_len, n, cfg.out_channels, dtype=torch.float64)

    def run():
        out = model(*args)
        return out, torch.autograd.grad((out * weight).sum(), list(model.parameters()))

    assert not model.static_low_rank(args[0], args[3])  # CPU: the published form
    want, grads_want = run()
    monkeypatch.setattr(DiT, "static_low_rank", lambda self, x, static_latent: True)
    got, grads = run()
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    for (name, _), g, g_want in zip(model.named_parameters(), grads, grads_want):
        torch.testing.assert_close(g, g_want, rtol=1e-9, atol=1e-11, msg=name)


def test_recomputed_image_attention_gives_the_same_gradients_and_saves_its_keys_and_values():
    cfg = load_config("configs/tiny/diffusion.yml").model
    torch.manual_seed(4)
    model = DiT(**cfg).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    b, n, t_len, img = 2, cfg.resolution, 3, 40
    args = [a.double() for a in (torch.randn(b, t_len, n, cfg.in_channels), torch.tensor([5.0, 900.0]),
                                 torch.randn(b, t_len, img, cfg.image_cond_channels), torch.randn(b, 20, 14),
                                 torch.rand(b, n, 3) - 0.5)]
    weight = torch.randn(b, t_len, n, cfg.out_channels, dtype=torch.float64)

    def run(recompute):
        for blk in model.blocks:
            blk.recompute_image_attn = recompute
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = model(*args)
        return torch.autograd.grad((out * weight).sum(), list(model.parameters())), sum(saved)

    grads_want, saved_want = run(False)
    grads, saved = run(True)
    for (name, _), g, g_want in zip(model.named_parameters(), grads, grads_want):
        torch.testing.assert_close(g, g_want, rtol=1e-12, atol=1e-14, msg=name)
    # at least each block's image keys and values (b*t frames x img tokens x 2 x channels, float64) are not kept
    assert saved_want - saved >= cfg.num_blocks * b * t_len * img * 2 * cfg.model_channels * 8
