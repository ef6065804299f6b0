"""utils/checkpoint.py and scripts/convert_checkpoint.py.

Expected keys, shapes and dtypes come from the published state-dict manifests (tests/data/reference/statedict_*.json)
and from docs/published_system.md §6.2 and §9, never from the code under test. Manifest tensors larger than 1024 values
are shrunk (every dim capped at 8) to keep the tests fast; keys, ranks, dtypes and all small tensors (omega, gammas,
biases of 512) are exact.
"""
from __future__ import annotations

import builtins
import collections
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from reference import load_manifest
from scripts import convert_checkpoint
from utils import cli
from utils.checkpoint import (CheckpointError, check_state_dict, load_checkpoint, load_published,
                              load_state_dict_strict, save_checkpoint, save_published)
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["dit", "motion_vae", "static_vae"]
# Independently known (published §9): entry counts and the single non-float32 entry.
ENTRIES = {"dit": 446, "motion_vae": 121, "static_vae": 201}
OMEGA = "position_encoding.0.omega"


def manifest_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    m = load_manifest(name)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in m["state_dict"].items():
        dtype = getattr(torch, m["non_float32_entries"].get(key, "torch.float32").removeprefix("torch."))
        if math.prod(shape) > 1024:
            shape = [min(d, 8) for d in shape]
        out[key] = torch.randn(shape, generator=gen, dtype=dtype)
    return out


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (torch.equal alone would accept -0.0 == 0.0 and a dtype change)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)  # same keys, same order
    bad = [k for k in want if not bitwise_equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, first: {bad[:5]}"


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------- manifest round trips

def test_manifest_dtypes_are_as_the_spec_says():
    for kind in KINDS:
        sd = manifest_state_dict(kind)
        assert len(sd) == ENTRIES[kind]
        non_f32 = {k: v.dtype for k, v in sd.items() if v.dtype != torch.float32}
        assert non_f32 == ({OMEGA: torch.float64} if kind == "motion_vae" else {})


@pytest.mark.parametrize("kind", KINDS)
def test_published_layout_round_trip_is_bitwise(kind, tmp_path):
    sd = manifest_state_dict(kind)
    published = collections.OrderedDict(("module." + k, v) for k, v in sd.items())
    torch.save(published, tmp_path / "published.pt")  # exactly how the released files were written (DDP prefix)

    loaded = load_published(tmp_path / "published.pt")
    assert not any(k.startswith("module.") for k in loaded)
    assert_same(loaded, sd)

    config, extra = {"kind_section": kind, "depth": 12, "nested": {"a": [1, 2.5, None]}}, {"step": 200000, "kind": kind}
    save_checkpoint(tmp_path / "ours.safetensors", loaded, config=config, extra=extra)
    back, config2, extra2 = load_checkpoint(tmp_path / "ours.safetensors")
    assert_same(back, sd)
    assert (config2, extra2) == (config, extra)

    save_published(tmp_path / "again.pt", back, module_prefix=True)
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert_same(dict(again), dict(published))
    if kind == "motion_vae":
        assert again["module." + OMEGA].dtype == torch.float64


def test_save_published_is_byte_deterministic(tmp_path):
    # torch.save names the zip's inner folder after the file when given a path, so two paths give different bytes;
    # save_published hands torch.save a file object (folder "archive"), and the zip entries carry no timestamps.
    sd = manifest_state_dict("motion_vae")
    save_published(tmp_path / "a.pt", sd)
    save_published(tmp_path / "b.pt", sd, module_prefix=False)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    save_published(tmp_path / "c.pt", sd, module_prefix=True)
    assert (tmp_path / "c.pt").read_bytes() != (tmp_path / "a.pt").read_bytes()
    assert_same(load_published(tmp_path / "c.pt"), sd)


# ------------------------------------------------------------------------------------------- refusing unsafe pickles

class _MakeDir:
    """Unpickling this calls os.mkdir(marker): a harmless, visible side effect."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class _Exec:
    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return (builtins.exec, (self.code,))


@pytest.mark.parametrize("payload,writer", [(_MakeDir, "torch"), (_Exec, "pickle")])
def test_code_running_pickle_is_refused_and_never_runs(payload, writer, tmp_path):
    marker = tmp_path / "marker"
    obj = {"weight": torch.ones(2), "evil": payload(marker)}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    # The payload is real: plain unpickling does run it (this is the test's own harmless payload).
    pickle.loads(pickle.dumps(payload(marker)))
    assert marker.exists()
    marker.rmdir() if marker.is_dir() else marker.unlink()

    with pytest.raises(CheckpointError) as err:
        load_published(path)
    msg = str(err.value)
    assert str(path) in msg and "refused" in msg and "execute code" in msg
    assert "weights_only=False" not in msg  # torch's advice to retry unsafely is not passed on
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- load_published inputs

def test_load_published_wrappers_and_bad_contents(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    torch.save({"state_dict": sd, "step": 7}, tmp_path / "wrapped.pt")
    assert_same(load_published(tmp_path / "wrapped.pt"), sd)

    torch.save({"model": sd, "ema": sd, "step": 7}, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="ambiguous"):
        load_published(tmp_path / "two.pt")
    assert_same(load_published(tmp_path / "two.pt", key="ema"), sd)

    torch.save({"a.weight": torch.ones(1), "note": "hi"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"'note' is a str, not a tensor"):
        load_published(tmp_path / "mixed.pt")

    torch.save({"module.a": torch.ones(1), "a": torch.ones(1)}, tmp_path / "clash.pt")
    with pytest.raises(CheckpointError, match="collide"):
        load_published(tmp_path / "clash.pt")

    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="found list"):
        load_published(tmp_path / "list.pt")


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty", "junk", "directory"])
def test_load_published_broken_file_names_the_path(damage, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "junk":
        path.write_bytes(b"this is not a checkpoint at all")
    elif damage == "directory":
        path.mkdir()
    with pytest.raises(CheckpointError) as err:
        load_published(path)
    assert str(path) in str(err.value)


def test_load_published_points_safetensors_to_load_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ours.safetensors", {"w": torch.ones(2)}, config={})
    with pytest.raises(CheckpointError, match="load_checkpoint"):
        load_published(tmp_path / "ours.safetensors")


# ------------------------------------------------------------------------------------------- strict loading

class Tiny(nn.Module):
    def __init__(self, omega_dtype=torch.float64):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("omega", torch.zeros(5, dtype=omega_dtype))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)  # not state: never expected


def tiny_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lin.weight": torch.randn(4, 3, generator=g), "lin.bias": torch.randn(4, generator=g),
            "omega": 1.0 / 10000 ** (torch.arange(5, dtype=torch.float64) / 64)}


def test_strict_load_copies_into_the_module_and_keeps_float64():
    model, sd = Tiny(), tiny_state()
    weight = model.lin.weight
    load_state_dict_strict(model, sd, source="x.pt")
    assert model.lin.weight is weight  # values copied into the existing parameter (load_state_dict semantics)
    assert bitwise_equal(model.lin.weight.detach(), sd["lin.weight"]) and bitwise_equal(model.omega, sd["omega"])

    # A module whose buffer became float32 still receives the float64 omega unrounded.
    model32 = Tiny(omega_dtype=torch.float32)
    load_state_dict_strict(model32, sd)
    assert model32.omega.dtype == torch.float64 and bitwise_equal(model32.omega, sd["omega"])
    assert "omega" in dict(model32.named_buffers()) and "omega" in model32.state_dict()

    # Parameters keep the module's dtype: a float64 weight is copied into the float32 parameter.
    load_state_dict_strict(model, {**sd, "lin.weight": sd["lin.weight"].double()})
    assert model.lin.weight.dtype == torch.float32


def test_strict_load_mismatch_report():
    model, sd = Tiny(), tiny_state()
    before = model.lin.weight.detach().clone()
    del sd["lin.bias"]
    sd["extra.weight"] = torch.zeros(2, 2)
    sd["lin.weight"] = torch.zeros(3, 4)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, sd, source="ckpts/ema_deformation.pt")
    msg = str(err.value)
    assert msg.startswith("ckpts/ema_deformation.pt:") and "Tiny" in msg
    assert "missing (1):\n    lin.bias  expected (4,)" in msg
    assert "unexpected (1):\n    extra.weight  (2, 2)" in msg
    assert "wrong shape (1):\n    lin.weight: expected (4, 3) got (3, 4)" in msg
    assert torch.equal(model.lin.weight.detach(), before)  # nothing was half-loaded


def test_mismatch_report_truncates_long_groups():
    expected = {f"k{i:02d}": (1,) for i in range(30)}
    with pytest.raises(CheckpointError) as err:
        check_state_dict(expected, {}, source="big.pt")
    msg = str(err.value)
    assert "missing (30):" in msg and "k19  expected (1,)" in msg and "k20" not in msg and "... and 10 more" in msg


# ------------------------------------------------------------------------------------------- our format

def test_non_finite_state_dict_is_never_saved(tmp_path):
    for bad in (float("nan"), float("inf")):
        sd = {"ok": torch.ones(3), "bad.weight": torch.tensor([1.0, bad, bad]), "later": torch.tensor([float("nan")])}
        for save in (lambda p: save_checkpoint(p, sd, config={}), lambda p: save_published(p, sd)):
            with pytest.raises(CheckpointError) as err:
                save(tmp_path / "x.ckpt")
            assert "'bad.weight' has 2 non-finite" in str(err.value) and str(tmp_path / "x.ckpt") in str(err.value)
            assert files_in(tmp_path) == []


def test_overwrite_is_refused_unless_asked(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, config={"v": 1})
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(path, {"w": torch.ones(2)}, config={"v": 2})
    assert load_checkpoint(path)[1] == {"v": 1}
    save_checkpoint(path, {"w": torch.ones(2)}, config={"v": 2}, overwrite=True)
    sd, config, _ = load_checkpoint(path)
    assert config == {"v": 2} and torch.equal(sd["w"], torch.ones(2))
    assert files_in(tmp_path) == ["m.safetensors"]


def test_write_is_atomic(tmp_path, monkeypatch):
    import utils.checkpoint as ck

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, config={"v": 1})
    old_bytes = path.read_bytes()

    def crash(tensors, filename, metadata=None):  # half a file, then the process "dies"
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.ones(2)}, config={"v": 2}, overwrite=True)
    assert path.read_bytes() == old_bytes and files_in(tmp_path) == ["m.safetensors"]

    with pytest.raises(CheckpointError, match="not plain JSON"):
        save_checkpoint(tmp_path / "n.safetensors", {"w": torch.zeros(2)}, config={"f": object()})
    assert files_in(tmp_path) == ["m.safetensors"]


def test_written_file_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, config={})
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def test_shared_views_and_order_survive(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    lin = nn.Linear(3, 3)
    sd = {"z.tied_a": lin.weight.detach(), "a.tied_b": lin.weight.detach(),  # same storage twice (tied weights)
          "m.view": base[2:5], "b.transposed": base.reshape(3, 4).t(), "i.int": torch.arange(3),
          "h.half": torch.randn(4).half(), "bf": torch.randn(4).bfloat16(), "mask": torch.tensor([True, False])}
    save_checkpoint(tmp_path / "m.safetensors", sd, config={})
    back, _, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert_same(back, {k: v.contiguous() for k, v in sd.items()})


@pytest.mark.parametrize("damage", ["missing", "truncated", "junk", "foreign"])
def test_load_checkpoint_broken_file_names_the_path(damage, tmp_path):
    path = tmp_path / "m.safetensors"
    if damage == "truncated":
        save_checkpoint(tmp_path / "good.safetensors", {"w": torch.randn(256)}, config={"a": 1})
        good = (tmp_path / "good.safetensors").read_bytes()
        path.write_bytes(good[: len(good) - 100])
    elif damage == "junk":
        path.write_bytes(b"\x00" * 50)
    elif damage == "foreign":
        save_file({"w": torch.zeros(2)}, str(path))  # valid safetensors, but no embedded config
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    if damage == "foreign":
        assert "no embedded config" in str(err.value)


# ------------------------------------------------------------------------------------------- converter

def fake_motion_vae() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"proj.weight": torch.randn(16, 768, generator=g), "proj.bias": torch.randn(16, generator=g),
            OMEGA: 1.0 / 10000 ** (torch.arange(128, dtype=torch.float64) / 64)}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, cwd="/", timeout=120)  # cwd: must not matter


def test_converter_cli_end_to_end(tmp_path):
    sd = fake_motion_vae()
    torch.save(collections.OrderedDict(("module." + k, v) for k, v in sd.items()), tmp_path / "ema_deformation.pt")

    res = run_cli(tmp_path / "ema_deformation.pt", tmp_path / "mv.safetensors", "--kind", "motion_vae", "--no-validate")
    assert res.returncode == 0, res.stderr
    assert "3 keys" in res.stdout and "float32 x2, float64 x1" in res.stdout and f"{16 * 768 + 16 + 128:,} values" in res.stdout
    got, config, extra = load_checkpoint(tmp_path / "mv.safetensors")
    assert_same(got, sd)
    assert config == load_config(ROOT / "configs" / "diffusion.yml")["motion_vae"].to_dict()
    assert (config["dim"], config["latent_dim"], config["num_latents"]) == (768, 16, 512)  # published §2
    assert extra["kind"] == "motion_vae" and extra["source"] == "ema_deformation.pt"

    res = run_cli(tmp_path / "mv.safetensors", tmp_path / "mv.pt", "--reverse", "--module-prefix", "--no-validate")
    assert res.returncode == 0, res.stderr
    back = torch.load(tmp_path / "mv.pt", weights_only=True)
    assert_same(dict(back), {"module." + k: v for k, v in sd.items()})



def test_converter_bad_input_exits_non_zero(tmp_path, capsys):
    # In-process (a subprocess costs ~2 s of torch import each); the CLI wiring is covered above.
    main = lambda argv: cli.run(convert_checkpoint.main, argv)  # as the command line runs it
    torch.save({"w": torch.ones(2)}, tmp_path / "in.pt")
    assert main([str(tmp_path / "in.pt"), str(tmp_path / "out.safetensors"), "--kind", "dit", "--no-validate"]) == 0
    assert main([str(tmp_path / "in.pt"), str(tmp_path / "out.safetensors"), "--kind", "dit", "--no-validate"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([str(tmp_path / "in.pt"), str(tmp_path / "out.safetensors"), "--kind", "dit", "--no-validate",
                 "--overwrite"]) == 0

    assert main([str(tmp_path / "nope.pt"), str(tmp_path / "x.safetensors"), "--kind", "dit"]) == 2
    assert str(tmp_path / "nope.pt") in capsys.readouterr().err

    torch.save({"w": torch.ones(2), "evil": _MakeDir(tmp_path / "marker")}, tmp_path / "evil.pt")
    assert main([str(tmp_path / "evil.pt"), str(tmp_path / "x.safetensors"), "--kind", "dit"]) == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "marker").exists()

    assert main([str(tmp_path / "out.safetensors"), str(tmp_path / "x.pt"), "--reverse", "--kind", "motion_vae"]) == 2
    assert "holds kind 'dit'" in capsys.readouterr().err

    assert main([str(tmp_path / "in.pt"), str(tmp_path / "x.safetensors")]) == 2  # argparse usage error: no --kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "in.pt", "out.safetensors"]


def test_converter_sections_per_kind(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "in.pt")
    for kind, file, section, probe in [("dit", "diffusion.yml", "model", ("model_channels", 512)),
                                       ("static_vae", "vae.yml", "static_vae", None)]:
        out = tmp_path / f"{kind}.safetensors"
        assert convert_checkpoint.main([str(tmp_path / "in.pt"), str(out), "--kind", kind, "--no-validate"]) == 0
        _, config, extra = load_checkpoint(out)
        assert config == load_config(ROOT / "configs" / file)[section].to_dict()
        assert extra["config_section"] == section
        if probe:
            assert config[probe[0]] == probe[1]
        else:  # published §3.2: 8 Gaussians x 14 channels
            assert config["backbones"]["vae"]["args"]["out_channels"] == 112


def test_converter_validates_against_the_built_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert_checkpoint, "build_reference_module", lambda kind, section: (Tiny(), "Tiny"))
    torch.save({"module." + k: v for k, v in tiny_state().items()}, tmp_path / "good.pt")
    assert convert_checkpoint.main([str(tmp_path / "good.pt"), str(tmp_path / "good.safetensors"), "--kind", "dit"]) == 0
    assert "checked against Tiny" in capsys.readouterr().out

    bad = {**tiny_state(), "lin.weight": torch.zeros(4, 4)}
    torch.save(bad, tmp_path / "bad.pt")
    assert cli.run(convert_checkpoint.main, [str(tmp_path / "bad.pt"), str(tmp_path / "bad.safetensors"), "--kind", "dit"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "bad.pt") in err and "lin.weight: expected (4, 3) got (4, 4)" in err
    assert not (tmp_path / "bad.safetensors").exists()

    # No model available: converted with a warning, not refused.
    monkeypatch.setattr(convert_checkpoint, "build_reference_module", lambda kind, section: (None, "models.dit.DiT is not available"))
    assert convert_checkpoint.main([str(tmp_path / "bad.pt"), str(tmp_path / "bad.safetensors"), "--kind", "dit"]) == 0
    out = capsys.readouterr()
    assert "warning: models.dit.DiT is not available" in out.err and "not checked" in out.out


@pytest.mark.parametrize("kind", KINDS)
def test_our_models_match_the_published_manifest(kind):
    """When a model class exists, the converter's builder (default config section) reproduces the published keys/shapes."""
    file, section = convert_checkpoint.KINDS[kind][:2]
    module, what = convert_checkpoint.build_reference_module(kind, load_config(ROOT / file)[section].to_dict())
    if module is None:
        pytest.skip(what)
    check_state_dict(load_manifest(kind)["state_dict"], module.state_dict(), source=f"{what} state dict",
                     target=f"statedict_{kind}.json")
