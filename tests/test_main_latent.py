import torch

import main_latent
from datasets import layout
from models.dit import DiT
from utils.checkpoint import load_checkpoint
from utils.config import load_config

CONFIG = "configs/tiny/diffusion.yml"


def _latent_dataset(root, names=("obj0", "obj1"), frames=8):
    cfg = load_config(CONFIG)
    n, c = cfg.model.resolution, cfg.model.in_channels
    g = torch.Generator().manual_seed(0)
    for name in names:
        path = layout.latent_path(root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"latent_mean": torch.randn(frames, n, c, generator=g), "latent_std": torch.full((frames, n, c), 0.05),
                    "fps_sampled_gs_1024": torch.randn(n, 14, generator=g), "fps_sampled_gs_4096": torch.randn(256, 14, generator=g)},
                   path)
        layout.write_cond_features(layout.cond_features_path(root, name, "patch"),
                                   torch.randn(frames, 10, cfg.model.image_cond_channels, generator=g))
    for which in layout.LATENT_STATS:
        shape = (cfg.model.in_channels,) if which.startswith("deformation") else (14,)
        value = torch.zeros(shape) if which.endswith("mean") else torch.ones(shape)
        torch.save(value, layout.latent_stats_path(root, which))


def test_dit_trains_on_t_frames(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _latent_dataset(root)
    seen = []
    forward = DiT.forward

    def spy(self, x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return forward(self, x, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(DiT, "forward", spy)
    assert main_latent.main(["--config", CONFIG, "--data-root", str(root), "--out", str(out), "train.max_steps=6",
                             "train.batch_size=2", "train.sample_timesteps=4", "train.lr=2e-3", "train.warmup_steps=5",
                             "train.log_interval=3", "train.save_interval=3", "data.end_idx=null"]) == 0
    # Acceptance: T frames reach the model (B, T, N, C), not one frame as in the published trainer.
    assert set(seen) == {(2, 4, 64, 8)}
    # The checkpoint holds a finite DiT that loads strictly into a fresh model.
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    weights = load_checkpoint(latest / "model_dit.safetensors")[0]
    DiT(**load_config(CONFIG).model).load_state_dict(weights, strict=True)
    assert latest.name == "step_0000006" and all(torch.isfinite(w).all() for w in weights.values())


def test_loss_falls_on_a_fixed_batch(tmp_path):
    """Training on one batch lowers its v-prediction loss, measured on the same fixed (t, noise) draws before and after."""
    root = tmp_path / "data"
    _latent_dataset(root, names=("obj0",))
    cfg = load_config(CONFIG, ["train.lr=3e-3", "train.warmup_steps=1", "train.uncond_p=0"])
    dataset = main_latent.build_dataset(cfg, root, None)
    batch = {k: v[None] for k, v in dataset[0].items()}
    torch.manual_seed(0)
    model = DiT(**cfg.model)
    diffusion = main_latent.GaussianDiffusion.from_config(cfg.diffusion)
    g = torch.Generator().manual_seed(1)
    probe_t = torch.linspace(50, 950, 8).long()
    probe_noise = torch.randn(8, *batch["x"].shape[1:], generator=g)
    cond = {k: batch[k].float().expand(8, *batch[k].shape[1:]) for k in ("cond_images", "static_latent", "deformation_position_xyz")}

    def probe():
        with torch.no_grad():
            return float(diffusion.training_loss(model, batch["x"].expand(8, *batch["x"].shape[1:]), probe_t,
                                                 probe_noise, **cond).mean())

    before = probe()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    x = batch["x"].expand(8, *batch["x"].shape[1:])
    for _ in range(100):
        t = diffusion.sample_timesteps(8, generator=g)
        loss = diffusion.training_loss(model, x, t, **cond).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = probe()
    assert after < 0.75 * before, (before, after)
