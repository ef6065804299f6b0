"""Loading a released TRELLIS folder layout (pipeline.json + ckpts/<name>.json + .safetensors) via utils/checkpoint.py."""
import json

import pytest
import torch
from safetensors.torch import save_file

import utils.checkpoint as ck
from models.trellis.ss_decoder import SparseStructureDecoder
from models.trellis.ss_flow import SparseStructureFlowModel
from utils.checkpoint import CheckpointError, build_trellis_model, load_trellis_models, read_trellis_release

REGISTRY = {"SparseStructureFlowModel": SparseStructureFlowModel, "SparseStructureDecoder": SparseStructureDecoder}
MODELS = ("sparse_structure_flow_model", "sparse_structure_decoder")
CKPTS = {"sparse_structure_flow_model": ("ckpts/ss_flow_tiny", "SparseStructureFlowModel",
                                         dict(resolution=4, in_channels=4, out_channels=4, model_channels=32,
                                              cond_channels=16, num_blocks=2, num_heads=2, mlp_ratio=2,
                                              qk_rms_norm=True, use_fp16=False)),
         "sparse_structure_decoder": ("ckpts/ss_dec_tiny", "SparseStructureDecoder",
                                      dict(out_channels=1, latent_channels=4, num_res_blocks=1, channels=[8, 4],
                                           num_res_blocks_middle=1, use_fp16=False))}


def _fp16_weights(cls, args, seed):
    """A state dict stored as the release stores it: float16 values (pos_emb kept float32, as in the SS-flow file).
    Random values everywhere, so zero-initialised layers cannot hide a load that did nothing."""
    torch.manual_seed(seed)
    sd = cls(**args).state_dict()
    return {k: (v if k == "pos_emb" else (torch.randn_like(v) * 0.2).half()).contiguous() for k, v in sd.items()}


def _write_release(root, extra_models=True):
    (root / "ckpts").mkdir(parents=True)
    table = {m: path for m, (path, _, _) in CKPTS.items()}
    if extra_models:  # listed in pipeline.json but never written: reading them would fail
        table.update(slat_decoder_mesh="ckpts/slat_dec_mesh_absent", slat_flow_model="ckpts/slat_flow_absent")
    (root / "pipeline.json").write_text(json.dumps({"name": "TrellisImageTo3DPipeline", "args": {"models": table}}))
    weights = {}
    for i, (m, (path, cls_name, args)) in enumerate(CKPTS.items()):
        (root / f"{path}.json").write_text(json.dumps({"name": cls_name, "args": args}))
        weights[m] = _fp16_weights(REGISTRY[cls_name], args, seed=i)
        save_file(weights[m], str(root / f"{path}.safetensors"))
    return weights


@pytest.fixture
def release(tmp_path):
    return tmp_path / "rel", _write_release(tmp_path / "rel")


def _inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 4, 4, 4, 4, generator=g), torch.tensor([100.0, 900.0]), torch.randn(2, 3, 16, generator=g),
            torch.randn(1, 4, 3, 3, 3, generator=g))


def test_loaded_models_hold_the_fp16_values_and_match_directly_built_ones(release):
    root, weights = release
    got = read_trellis_release(root, MODELS, hub=False)
    assert set(got) == set(MODELS)
    models = load_trellis_models(REGISTRY, root, MODELS, hub=False)
    for m in MODELS:
        cls_name, args, sd = got[m]
        assert (cls_name, args) == CKPTS[m][1:]
        assert all(sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in weights[m].items())
        own = models[m].state_dict()
        assert list(own) == list(weights[m])
        for k, v in weights[m].items():  # float16 -> float32 is exact
            assert own[k].dtype == torch.float32 and torch.equal(own[k], v.float()), (m, k)
    x, t, cond, z = _inputs()
    flow = SparseStructureFlowModel(**CKPTS[MODELS[0]][2]).eval()
    flow.load_state_dict({k: v.float() for k, v in weights[MODELS[0]].items()})
    dec = SparseStructureDecoder(**CKPTS[MODELS[1]][2]).eval()
    dec.load_state_dict({k: v.float() for k, v in weights[MODELS[1]].items()})
    with torch.no_grad():
        assert torch.equal(models[MODELS[0]].eval()(x, t, cond), flow(x, t, cond))
        assert torch.equal(models[MODELS[1]].eval()(z), dec(z))
        assert not torch.equal(dec(z), SparseStructureDecoder(**CKPTS[MODELS[1]][2]).eval()(z))  # weights matter


def test_use_fp16_modules_keep_their_own_dtypes(release):
    root, weights = release
    cls_name, args, sd = read_trellis_release(root, MODELS[:1], hub=False)[MODELS[0]]
    model = build_trellis_model(cls_name, {**args, "use_fp16": True}, sd, REGISTRY)
    own = model.state_dict()
    half = [k for k, v in own.items() if v.dtype == torch.float16]
    assert half and all(k.startswith("blocks.") for k in half) and own["input_layer.weight"].dtype == torch.float32
    assert all(torch.equal(own[k].float(), v.float()) for k, v in weights[MODELS[0]].items())


def test_missing_files_are_named(release):
    root, _ = release
    (root / "ckpts/ss_dec_tiny.safetensors").unlink()
    (root / "ckpts/ss_flow_tiny.json").unlink()
    with pytest.raises(CheckpointError) as e:
        read_trellis_release(root, MODELS, hub=False)
    msg = str(e.value)
    assert "ss_dec_tiny.safetensors" in msg and "ss_flow_tiny.json" in msg and f"put them in {root}" in msg
    assert "ss_flow_tiny.safetensors" not in msg
    (root / "pipeline.json").unlink()
    with pytest.raises(CheckpointError, match=r"pipeline\.json \(not found\)"):
        read_trellis_release(root, MODELS)
    with pytest.raises(CheckpointError, match="release folder not found"):
        read_trellis_release(root / "nope", MODELS)


def test_pipeline_without_the_model_or_with_an_escaping_path(release):
    root, _ = release
    with pytest.raises(CheckpointError, match=r"pipeline\.json: args\.models has no \['slat_decoder_gs'\]"):
        read_trellis_release(root, ("slat_decoder_gs",))
    (root / "pipeline.json").write_text(json.dumps({"args": {"models": {"slat_flow_model": "../../etc/x"}}}))
    with pytest.raises(CheckpointError, match="not a relative path inside the release"):
        read_trellis_release(root, ("slat_flow_model",))


def test_wrong_shape_and_unknown_class_name_the_ckpt(release):
    root, weights = release
    sd = dict(weights[MODELS[1]])
    sd["input_layer.weight"] = torch.zeros(3, 4, 3, 3, 3, dtype=torch.float16)
    save_file(sd, str(root / "ckpts/ss_dec_tiny.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_trellis_models(REGISTRY, root, MODELS)
    assert "ss_dec_tiny.safetensors" in str(e.value) and "wrong shape" in str(e.value)
    assert "input_layer.weight" in str(e.value)
    (root / "ckpts/ss_flow_tiny.json").write_text(json.dumps({"name": "NoSuchModel", "args": {}}))
    with pytest.raises(CheckpointError, match=r"ss_flow_tiny\.safetensors.*unknown model class 'NoSuchModel'"):
        load_trellis_models(REGISTRY, root, MODELS[:1])
    with pytest.raises(CheckpointError, match="cannot build SparseStructureDecoder"):
        build_trellis_model("SparseStructureDecoder", {"bogus": 1}, sd, REGISTRY, source="x")


def test_bad_json_and_pickle_weights_are_refused(release):
    root, weights = release
    (root / "ckpts/ss_dec_tiny.json").write_text(json.dumps({"args": {}}))
    with pytest.raises(CheckpointError, match=r"ss_dec_tiny\.json: expected \{\"name\""):
        read_trellis_release(root, MODELS)
    torch.save(weights[MODELS[0]], str(root / "ckpts/ss_flow_tiny.safetensors"))  # a pickle under the right name
    with pytest.raises(CheckpointError, match=r"ss_flow_tiny\.safetensors: not a safetensors file"):
        read_trellis_release(root, MODELS[:1])


def test_hub_repo_downloads_only_the_needed_files(release, monkeypatch, tmp_path):
    root, weights = release
    asked = []

    def fake_hub(repo_id, filename):
        asked.append((repo_id, filename))
        path = root / filename
        if not path.is_file():
            raise FileNotFoundError(f"404 {filename}")
        return str(path)

    monkeypatch.setattr(ck, "hub_file", fake_hub)
    monkeypatch.chdir(tmp_path)  # so "someone/tiny-trellis" is surely not a local folder
    got = read_trellis_release("someone/tiny-trellis", MODELS)
    assert asked == [("someone/tiny-trellis", f) for f in ["pipeline.json", "ckpts/ss_flow_tiny.json",
                     "ckpts/ss_flow_tiny.safetensors", "ckpts/ss_dec_tiny.json", "ckpts/ss_dec_tiny.safetensors"]]
    for m in MODELS:
        assert all(torch.equal(got[m][2][k], v) for k, v in weights[m].items())
    asked.clear()
    with pytest.raises(CheckpointError, match="hub=False"):
        read_trellis_release("someone/tiny-trellis", MODELS, hub=False)
    with pytest.raises(CheckpointError, match=r"someone/tiny-trellis/ckpts/slat_flow_absent\.json \(hub: FileNotFound"):
        read_trellis_release("someone/tiny-trellis", ("slat_flow_model",))
    assert asked[0] == ("someone/tiny-trellis", "pipeline.json") and len(asked) == 3


def test_unreachable_hub_says_what_is_missing_and_how_to_provide_it(monkeypatch, tmp_path):
    def offline(repo_id, filename):
        raise OSError("huggingface.co unreachable (timed out)")

    monkeypatch.setattr(ck, "hub_file", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as e:
        read_trellis_release()  # the default: JeffreyXiang/TRELLIS-image-large, the three models GVFDiffusion uses
    msg = str(e.value)
    assert "JeffreyXiang/TRELLIS-image-large/pipeline.json" in msg and "unreachable" in msg
    for name in ("ss_flow_img_dit_L_16l8_fp16", "ss_dec_conv3d_16l8_fp16", "slat_flow_img_dit_L_64l8p2_fp16"):
        assert f"ckpts/{name}.safetensors" in msg and f"ckpts/{name}.json" in msg
    assert "slat_dec_gs" not in msg and "huggingface-cli download" in msg and "pass that folder" in msg
