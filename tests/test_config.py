"""utils/config.py and the shipped configs. Expected numbers are written out here from docs/published_system.md, never
read back from the code under test."""
import copy
import pickle
from pathlib import Path

import pytest
import yaml

from utils.config import Config, ConfigError, load_config, merge, save_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def key_paths(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= key_paths(v, prefix + k + ".")
    return out


# ---------------------------------------------------------------------------------------------- paper configs

def test_paper_motion_vae_values():
    m = load_config(CONFIGS / "vae.yml").model  # docs/published_system.md §2
    assert (m.depth, m.dim, m.queries_dim, m.heads, m.dim_head) == (12, 768, 768, 12, -1)
    assert (m.num_inputs, m.num_latents, m.latent_dim, m.output_dim) == (8192, 512, 16, 14)
    assert (m.input_dim, m.gs_dim, m.chunk_size, m.knn_k, m.beta, m.drop_path) == (3, 14, 8192, 8, 7.0, 0.1)
    assert m.weight_tie_layers is False and m.decoder_ff is False


def test_paper_static_vae_values():
    s = load_config(CONFIGS / "vae.yml").static_vae  # published §3
    assert s.backbones.vae.name == "SparseTransformerVAE" and s.framework.name == "SparseVAE"
    a = s.backbones.vae.args
    assert (a.resolution, a.in_channels, a.model_channels, a.latent_channels) == (64, 1024, 768, 8)
    assert (a.num_blocks, a.num_heads, a.num_head_channels, a.mlp_ratio, a.out_channels) == (12, 12, 64, 4, 112)
    assert (a.attn_mode, a.window_size, a.pe_mode) == ("swin", 8, "ape")
    assert a.use_old_attn_impl is False and a.norm_output is True and a.use_fp16 is True
    f = s.framework.args
    assert (f.resolution, f.loss_type, f.lamda_kl, f.lambda_ssim, f.lambda_lpips, f.mem_ratio) == (64, "l1", 1e-6, 0.2, 0.2, 0.2)
    assert f.regularizations.MipGS == {"lambda_vol": 10000.0, "lambda_opacity": 0.001}
    g = f.representation_config.MipGS
    assert g.lr == {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1}
    assert (g.num_gaussians, g.voxel_size, g.perturb_offset, g.reg_mode) == (8, 1.5, True, "soft_invoxel")
    assert (g["2d_filter_kernel_size"], g["3d_filter_kernel_size"]) == (0.1, 0.0009)
    assert (g.scaling_bias, g.opacity_bias, g.scaling_activation) == (0.004, 0.1, "softplus")


def test_static_vae_block_has_the_published_key_names():
    # The key sets of the golden README static_vae config (published backbones.vae.args / framework.args).
    s = load_config(CONFIGS / "vae.yml").static_vae
    assert set(s.backbones.vae.args) == {
        "attn_mode", "in_channels", "latent_channels", "mlp_ratio", "model_channels", "norm_output", "num_blocks",
        "num_head_channels", "num_heads", "out_channels", "pe_mode", "resolution", "use_checkpoint", "use_fp16",
        "use_old_attn_impl", "window_size"}
    assert set(s.framework.args) == {"lambda_lpips", "lambda_ssim", "lamda_kl", "loss_type", "mem_ratio",
                                     "regularizations", "representation_config", "resolution"}
    assert set(s.framework.args.representation_config.MipGS) == {
        "2d_filter_kernel_size", "3d_filter_kernel_size", "lr", "num_gaussians", "opacity_bias", "perturb_offset",
        "reg_mode", "scaling_activation", "scaling_bias", "voxel_size"}


def test_paper_vae_training_values():
    cfg = load_config(CONFIGS / "vae.yml")
    t = cfg.train  # published §4.1 README command
    assert (t.batch_size, t.grad_accum, t.lr, t.weight_decay, t.static_lr_scale) == (2, 2, 5e-5, 0.0, 0.1)
    assert (t.kl_weight, t.xyz_weight, t.l1_weight, t.lpips_weight, t.ssim_weight) == (1e-6, 1.0, 1.0, 0.2, 0.2)
    assert (t.static_vae_steps, t.warmup_steps, t.grad_clip, t.ema_rate) == (150000, 1000, 1.0, 0.9999)
    assert (t.save_interval, t.log_interval, t.sample_timesteps, t.load_camera) == (5000, 100, 1, 1)
    d = cfg.data
    assert (d.num_points, d.num_timesteps, d.num_views, d.image_resolution, d.background) == (8192, 24, 50, 512, "white")
    assert isinstance(t.lr, float) and isinstance(t.kl_weight, float)


def test_paper_dit_values():
    m = load_config(CONFIGS / "diffusion.yml").model  # published §5
    assert (m.in_channels, m.out_channels, m.model_channels, m.num_blocks) == (16, 16, 512, 12)
    assert (m.num_heads, m.num_head_channels, m.mlp_ratio, m.resolution) == (16, 32, 4, 512)
    assert (m.image_cond_channels, m.static_cond_channels, m.pe_mode, m.patch_size) == (1024, 14, "ape", 1)
    assert (m.qk_rms_norm, m.qk_rms_norm_cross, m.share_mod, m.no_temporal_attn) == (True, False, False, False)
    assert m.use_checkpoint is False


def test_dit_block_has_the_published_key_names():
    # The key set of the golden README dit config.
    assert set(load_config(CONFIGS / "diffusion.yml").model) == {
        "image_cond_channels", "in_channels", "mlp_ratio", "model_channels", "no_temporal_attn", "num_blocks",
        "num_head_channels", "num_heads", "out_channels", "patch_size", "pe_mode", "qk_rms_norm",
        "qk_rms_norm_cross", "resolution", "share_mod", "static_cond_channels", "use_checkpoint", "use_fp16",
        "use_skip_connection"}


def test_paper_diffusion_block_equals_the_published_one():
    d = load_config(CONFIGS / "diffusion.yml").diffusion  # golden README `diffusion` config, published §5.1
    assert d.to_dict() == {"learn_sigma": False, "noise_schedule": "cosine", "predict_type": "v",
                           "predict_xstart": False, "rescale_learned_sigmas": True, "rescale_timesteps": True,
                           "sigma_small": False, "steps": 1000, "use_kl": False}


def test_paper_diffusion_training_and_sampling_values():
    cfg = load_config(CONFIGS / "diffusion.yml")
    t = cfg.train  # published §4.2
    assert (t.batch_size, t.grad_accum, t.lr, t.weight_decay, t.uncond_p) == (2, 2, 5e-5, 0.0, 0.1)
    assert (t.sample_timesteps, t.warmup_steps, t.grad_clip, t.ema_rate) == (24, 1000, 1.0, 0.9999)
    s = cfg.sampling  # published §6
    assert (s.algorithm_type, s.order, s.skip_type, s.t_start, s.t_end) == ("dpmsolver++", 2, "time_uniform", 1.0, 1e-3)
    assert s.method in ("adaptive", "multistep") and s.steps <= 25
    assert (s.atol, s.rtol, s.guidance_scale, s.guidance_scale2) == (0.0078, 0.05, 1.0, 1.0)
    assert (s.num_frames, s.fov_deg, s.radius, s.resolution) == (32, 49.1, 2.0, 512)


def test_motion_vae_block_is_shared_and_consistent_with_the_dit():
    for vae_file, diff_file in [("vae.yml", "diffusion.yml"), ("tiny/vae.yml", "tiny/diffusion.yml"),
                                ("small/vae.yml", "small/diffusion.yml")]:
        vae, diff = load_config(CONFIGS / vae_file), load_config(CONFIGS / diff_file)
        assert diff.motion_vae.to_dict() == vae.model.to_dict(), (vae_file, diff_file)
        assert diff.model.in_channels == diff.model.out_channels == diff.motion_vae.latent_dim
        assert diff.model.resolution == diff.motion_vae.num_latents
        assert diff.model.num_heads * diff.model.num_head_channels == diff.model.model_channels
        assert vae.data.num_points == vae.model.num_inputs
        assert vae.data.voxel_resolution == vae.static_vae.backbones.vae.args.resolution \
            == vae.static_vae.framework.args.resolution


# ---------------------------------------------------------------------------------------------- tiny configs

def test_tiny_configs_override_sizes_and_inherit_the_rest():
    vae = load_config(CONFIGS / "tiny" / "vae.yml")
    assert (vae.model.depth, vae.model.dim, vae.model.heads, vae.model.num_inputs) == (2, 96, 4, 1024)
    assert (vae.model.num_latents, vae.model.latent_dim) == (64, 8)
    assert vae.model.output_dim == 14 and vae.model.knn_k == 8 and vae.model.beta == 7.0  # inherited
    a = vae.static_vae.backbones.vae.args
    assert (a.model_channels, a.num_blocks, a.num_heads, a.in_channels) == (64, 2, 4, 32)
    assert a.out_channels == 112 and a.attn_mode == "swin" and a.window_size == 8  # inherited
    assert vae.static_vae.framework.args.representation_config.MipGS.scaling_bias == 0.004  # inherited 4 levels down
    assert vae.train.batch_size == 1 and vae.train.lr == 5e-5 and vae.train.kl_weight == 1e-4
    assert "base" not in vae

    diff = load_config(CONFIGS / "tiny" / "diffusion.yml")
    assert (diff.model.model_channels, diff.model.num_blocks, diff.model.num_heads) == (64, 2, 4)
    assert (diff.model.num_head_channels, diff.model.image_cond_channels, diff.model.resolution) == (16, 32, 64)
    assert diff.model.qk_rms_norm is True and diff.model.static_cond_channels == 14  # inherited
    assert diff.diffusion.steps == 1000 and diff.diffusion.noise_schedule == "cosine"  # inherited
    assert diff.sampling.t_end == 1e-3 and diff.train.uncond_p == 0.1
    assert diff.data.posterior_draws is False and load_config(CONFIGS / "diffusion.yml").data.posterior_draws is True


@pytest.mark.parametrize("scale", ["tiny", "small"])
@pytest.mark.parametrize("name", ["vae.yml", "diffusion.yml"])
def test_scaled_configs_have_the_paper_structure(scale, name):
    paper = load_config(CONFIGS / name).to_dict()
    raw = yaml.safe_load((CONFIGS / scale / name).read_text())
    assert raw.pop("base") == f"../{name}"
    # A key in the scaled file that the paper file lacks is a typo: it would silently change nothing.
    assert key_paths(raw) <= key_paths(paper)
    assert key_paths(load_config(CONFIGS / scale / name).to_dict()) == key_paths(paper)


# ---------------------------------------------------------------------------------------------- Config object

def test_config_attribute_and_item_access_and_to_dict():
    cfg = Config({"model": {"depth": 3, "blocks": [{"w": 1}]}, "lr": 0.1})
    assert cfg.model.depth == cfg["model"]["depth"] == 3
    assert isinstance(cfg.model, Config) and isinstance(cfg.model.blocks[0], Config)
    assert cfg.model.blocks[0].w == 1
    cfg.model.width = {"a": 2}
    assert cfg.model.width.a == 2
    plain = cfg.to_dict()
    assert plain == {"model": {"depth": 3, "blocks": [{"w": 1}], "width": {"a": 2}}, "lr": 0.1}
    assert type(plain) is dict and type(plain["model"]) is dict and type(plain["model"]["blocks"][0]) is dict
    with pytest.raises(AttributeError, match="nope"):
        cfg.nope
    assert not hasattr(cfg, "nope") and getattr(cfg, "nope", 7) == 7
    clone = copy.deepcopy(cfg)
    clone.model.depth = 9
    assert cfg.model.depth == 3 and isinstance(clone, Config)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert isinstance(cfg.copy(), Config)


def test_merge_is_recursive_and_does_not_alias():
    base = Config({"a": {"b": 1, "c": [1, 2]}, "d": 4})
    out = merge(base, {"a": {"b": 2}, "e": 5})
    assert out.to_dict() == {"a": {"b": 2, "c": [1, 2]}, "d": 4, "e": 5}
    out.a.c.append(3)
    assert base.a.c == [1, 2]


# ---------------------------------------------------------------------------------------------- overrides

def test_overrides_parse_types():
    cfg = load_config(CONFIGS / "tiny" / "vae.yml", [
        "train.lr=1e-4", "model.depth=3", "model.decoder_ff=true", "data.root=/tmp/x",
        "data.list_file=null", "model.beta=7", "+train.milestones=[1, 2]", "+extra.deep.key=on"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.depth == 3 and isinstance(cfg.model.depth, int)
    assert cfg.model.decoder_ff is True
    assert cfg.data.root == "/tmp/x" and cfg.data.list_file is None
    assert cfg.train.milestones == [1, 2]
    assert cfg.extra.deep.key is True
    assert cfg.model.dim == 96  # untouched


def test_override_of_unknown_key_fails_naming_it():
    with pytest.raises(ConfigError, match=r"train\.lrr") as info:
        load_config(CONFIGS / "vae.yml", ["train.lrr=1"])
    assert "vae.yml" in str(info.value) and "lr" in str(info.value)
    with pytest.raises(ConfigError, match=r"nosuch\.deep"):
        load_config(CONFIGS / "vae.yml", ["nosuch.deep=1"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(CONFIGS / "vae.yml", ["train.lr.x=1"])


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=3", "+=3", "train.lr=[1,"])
def test_malformed_override_fails(bad):
    with pytest.raises(ConfigError, match="override"):
        load_config(CONFIGS / "vae.yml", [bad])


# ---------------------------------------------------------------------------------------------- files

def test_yaml_exponent_floats_without_dot(tmp_path):
    cfg = load_config(write(tmp_path / "c.yml", "a: 1e-6\nb: -5E+3\nc: 100\nd: '1e-6'\ne: 1.5\n"))
    assert cfg.to_dict() == {"a": 1e-6, "b": -5000.0, "c": 100, "d": "1e-6", "e": 1.5}
    assert isinstance(cfg.a, float) and isinstance(cfg.c, int)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yml", "a: 1\nb:\n  c: 2\n d: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yml, line 4"):
        load_config(path)


def test_duplicate_key_names_line(tmp_path):
    path = write(tmp_path / "dup.yml", "a: 1\nb: 2\na: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yml, line 3.*duplicate key 'a'"):
        load_config(path)


def test_missing_file_and_non_mapping_top_level(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.yml"):
        load_config(tmp_path / "nothere.yml")
    with pytest.raises(ConfigError, match=r"list\.yml.*mapping"):
        load_config(write(tmp_path / "list.yml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"empty\.yml.*mapping"):
        load_config(write(tmp_path / "empty.yml", "# only a comment\n"))


def test_save_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "tiny" / "diffusion.yml", ["train.lr=3e-4"])
    out = save_config(cfg, tmp_path / "run" / "config.yml")
    assert [p.name for p in out.parent.iterdir()] == ["config.yml"]  # no temporary file left behind
    back = load_config(out)
    assert back == cfg and back.train.lr == 3e-4 and back.sampling.t_end == 1e-3
    assert "base" not in yaml.safe_load(out.read_text())
    # a plain YAML reader sees the same data (floats written with a dot, not only our loader's extension)
    assert yaml.safe_load(out.read_text()) == cfg.to_dict()


def test_base_chain_resolves_relative_paths(tmp_path):
    write(tmp_path / "root.yml", "model: {depth: 12, dim: 768}\ntrain: {lr: 1.0e-4, steps: 10}\nkeep: [1, 2]\n")
    write(tmp_path / "mid" / "mid.yml", "base: ../root.yml\nmodel: {dim: 64}\ntrain: {steps: 5}\n")
    leaf = write(tmp_path / "mid" / "sub" / "leaf.yml", "base: ../mid.yml\ntrain: {steps: 2}\nkeep: [3]\n")
    cfg = load_config(leaf)
    assert cfg.to_dict() == {"model": {"depth": 12, "dim": 64}, "train": {"lr": 1e-4, "steps": 2}, "keep": [3]}
    # several bases: later ones win, the file itself wins over all
    write(tmp_path / "other.yml", "model: {depth: 2}\nextra: 1\n")
    multi = write(tmp_path / "multi.yml", "base: [root.yml, other.yml]\ntrain: {lr: 0.5}\n")
    assert load_config(multi).to_dict() == {"model": {"depth": 2, "dim": 768}, "train": {"lr": 0.5, "steps": 10},
                                            "keep": [1, 2], "extra": 1}


def test_base_errors(tmp_path):
    child = write(tmp_path / "child.yml", "base: missing.yml\na: 1\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.yml.*child\.yml"):
        load_config(child)
    write(tmp_path / "x.yml", "base: y.yml\n")
    write(tmp_path / "y.yml", "base: x.yml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "x.yml")
    with pytest.raises(ConfigError, match=r"bad\.yml.*base"):
        load_config(write(tmp_path / "bad.yml", "base: 3\n"))



def test_a_key_its_base_lacks_is_a_typo_unless_added_with_plus(tmp_path):
    write(tmp_path / "root.yml", "train: {max_steps: 10, lr: 0.1}\n")
    typo = write(tmp_path / "typo.yml", "base: root.yml\ntrain: {max_stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"typo\.yml: unknown key 'train\.max_stepz'.*did you mean train\.max_steps"):
        load_config(typo)
    added = write(tmp_path / "added.yml", "base: root.yml\ntrain: {+note: x, max_steps: 3}\n+extra: {a: 1}\n")
    assert load_config(added).to_dict() == {"train": {"max_steps": 3, "lr": 0.1, "note": "x"}, "extra": {"a": 1}}

# ---------------------------------------------------------------------------------------------- accelerate

@pytest.mark.parametrize("name, dist, procs, precision, cpu", [
    ("cpu.yaml", "NO", 1, "no", True),
    ("multi_gpu.yaml", "MULTI_GPU", 8, "bf16", False),
])
def test_accelerate_configs(name, dist, procs, precision, cpu):
    path = CONFIGS / "accelerate" / name
    raw = yaml.safe_load(path.read_text())
    assert raw["compute_environment"] == "LOCAL_MACHINE"
    # must stay strings: an unquoted NO / no would be the boolean false
    assert raw["distributed_type"] == dist and raw["mixed_precision"] == precision
    assert (raw["num_processes"], raw["num_machines"], raw["machine_rank"], raw["use_cpu"]) == (procs, 1, 0, cpu)
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    parsed = config_args.ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader rejects unknown keys
    assert parsed.distributed_type.value == dist and parsed.num_processes == procs
