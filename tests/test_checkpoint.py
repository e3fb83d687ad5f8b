"""Checkpoint loading: three key layouts x two file formats x sharding, and every kind of broken checkpoint."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import fastvlm
from fastvlm.checkpoint import LAYOUTS, convert_state_dict
from fastvlm.testing import rel_l2
from conftest import make_model

APPLE_PREFIX = "model.vision_tower.vision_tower.model."


@pytest.fixture(scope="module")
def tiny_model():
    return make_model(fastvlm.FastViTHDConfig.tiny(), inference_mode=True, seed=11, dtype=torch.float32)


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 90, 70, generator=torch.Generator().manual_seed(2))


def _export(model, layout, full_vlm=False):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = APPLE_PREFIX if (layout == "apple" and full_vlm) else None
    out = convert_state_dict(sd, "apple", layout, config=model.config, prefix=prefix)
    # what real checkpoints also carry, and the loader must skip on purpose
    head = {"apple": "head.proj", "timm": "head.fc.weight", "hf": "model.vision_tower.timm_model.head.fc.weight"}[layout]
    out[(prefix or "") + head if layout == "apple" else head] = torch.randn(4, 3)
    if full_vlm:
        out["model.embed_tokens.weight"] = torch.randn(10, 4)  # LLM keys outside the tower
        out["model.mm_projector.0.weight"] = torch.randn(8, model.num_features)
    return out


def _write(sd, path, fmt, shards=1):
    os.makedirs(path, exist_ok=True)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    base = "model" if fmt == "safetensors" else "pytorch_model"
    keys = list(sd)
    if shards == 1:
        f = os.path.join(path, f"{base}.{ext}")
        (save_file if fmt == "safetensors" else torch.save)({k: sd[k].contiguous() for k in keys}, f)
        return f
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        name = f"{base}-{i + 1:05d}-of-{shards:05d}.{ext}"
        (save_file if fmt == "safetensors" else torch.save)({k: sd[k].contiguous() for k in part}, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, f"{base}.{ext}.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("shards", [1, 3])
def test_layouts_round_trip(tmp_path, tiny_model, pixels, layout, fmt, shards):
    sd = _export(tiny_model, layout, full_vlm=(layout != "timm"))
    src = _write(sd, str(tmp_path / "ckpt"), fmt, shards)
    loaded = fastvlm.load_vision_tower(src)
    assert loaded.checkpoint_layout == layout
    assert loaded.config == tiny_model.config
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(pixels), tiny_model(pixels))
    # the directory works as well as the file
    if shards == 1:
        loaded2 = fastvlm.load_vision_tower(str(tmp_path / "ckpt"), layout=layout)
        with torch.no_grad():
            assert torch.equal(loaded2(pixels), tiny_model(pixels))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_form_checkpoints_load_and_fold(tiny_model, pixels, layout):
    train = make_model(fastvlm.FastViTHDConfig.tiny(), inference_mode=False, seed=4, dtype=torch.float32)
    sd = convert_state_dict(train.state_dict(), "apple", layout, config=train.config)
    loaded = fastvlm.load_vision_tower(sd)
    assert not loaded.inference_mode
    with torch.no_grad():
        ref = train(pixels)
        assert torch.equal(loaded(pixels), ref)
        assert rel_l2(loaded.reparameterize()(pixels), ref) <= 1e-5


def test_released_architecture_is_inferred_from_keys():
    m = fastvlm.FastViTHD(inference_mode=True)
    for layout in LAYOUTS:
        sd = convert_state_dict(m.state_dict(), "apple", layout)
        loaded = fastvlm.load_vision_tower(sd)
        assert loaded.config == fastvlm.FastViTHDConfig()


def test_dtype_argument(tiny_model):
    loaded = fastvlm.load_vision_tower(tiny_model.state_dict(), dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16


# ---- broken checkpoints --------------------------------------------------------------------------

def test_missing_key_is_named(tiny_model):
    sd = dict(tiny_model.state_dict())
    del sd["network.2.0.convffn.fc1.bias"]
    del sd["conv_exp.se.expand.weight"]
    with pytest.raises(fastvlm.CheckpointMismatchError) as ei:
        fastvlm.load_vision_tower(sd)
    assert set(ei.value.missing) == {"network.2.0.convffn.fc1.bias", "conv_exp.se.expand.weight"}
    assert "network.2.0.convffn.fc1.bias" in str(ei.value) and "conv_exp.se.expand.weight" in str(ei.value)


def test_extra_key_is_named(tiny_model):
    sd = dict(tiny_model.state_dict())
    sd["network.0.0.convffn.fc3.weight"] = torch.zeros(1)
    with pytest.raises(fastvlm.CheckpointMismatchError, match="fc3") as ei:
        fastvlm.load_vision_tower(sd)
    assert ei.value.unexpected == ["network.0.0.convffn.fc3.weight"]


def test_wrong_shape_is_named(tiny_model):
    sd = dict(tiny_model.state_dict())
    sd["network.0.0.convffn.fc2.bias"] = torch.zeros(7)
    with pytest.raises(fastvlm.CheckpointMismatchError, match=r"network\.0\.0\.convffn\.fc2\.bias.*\(7,\)") as ei:
        fastvlm.load_vision_tower(sd)
    assert [k for k, _, _ in ei.value.mismatched] == ["network.0.0.convffn.fc2.bias"]


def test_all_problems_in_one_error(tiny_model):
    sd = convert_state_dict(tiny_model.state_dict(), "apple", "timm", config=tiny_model.config)
    del sd["stages.0.blocks.0.mlp.fc1.weight"]
    sd["stages.1.blocks.0.bogus"] = torch.zeros(1)
    sd["final_conv.se.fc1.bias"] = torch.zeros(3)
    with pytest.raises(fastvlm.CheckpointMismatchError) as ei:
        fastvlm.load_vision_tower(sd)
    e = ei.value
    assert e.missing == ["network.0.0.convffn.fc1.weight"]
    assert len(e.unexpected) == 1 and e.unexpected[0].endswith("bogus")
    assert [k for k, _, _ in e.mismatched] == ["conv_exp.se.reduce.bias"]


def test_unknown_layout():
    with pytest.raises(fastvlm.UnknownLayoutError, match="layout"):
        fastvlm.load_vision_tower({"encoder.layer.0.weight": torch.zeros(1)})


def test_corrupt_files(tmp_path):
    bad_st = tmp_path / "model.safetensors"
    bad_st.write_bytes(b"\x00" * 64 + b"garbage")
    with pytest.raises(fastvlm.CorruptCheckpointError, match="safetensors"):
        fastvlm.load_vision_tower(str(bad_st))
    bad_pt = tmp_path / "w.pt"
    bad_pt.write_bytes(b"not a zip file at all")
    with pytest.raises(fastvlm.CorruptCheckpointError, match="weights_only"):
        fastvlm.load_vision_tower(str(bad_pt))
    idx = tmp_path / "x.safetensors.index.json"
    idx.write_text("{not json")
    with pytest.raises(fastvlm.CorruptCheckpointError, match="index"):
        fastvlm.load_vision_tower(str(idx))


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    p = tmp_path / "evil.pt"
    torch.save({"patch_embed.0.reparam_conv.weight": Evil()}, p)
    with pytest.raises(fastvlm.CorruptCheckpointError):
        fastvlm.load_vision_tower(str(p))


def test_missing_path_and_hub_offline(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        fastvlm.load_vision_tower(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError):
        fastvlm.load_vision_tower(str(tmp_path))  # empty directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fastvlm.CheckpointError, match="hub"):
        fastvlm.load_vision_tower("apple/FastVLM-0.5B-does-not-exist")


# ---- projector -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size,hidden", [("0.5b", 896), ("1.5b", 1536), ("7b", 3584)])
def test_projector_sizes(size, hidden):
    p = fastvlm.Projector.for_model(size)
    assert p.linear_1.weight.shape == (hidden, 3072) and p.linear_2.weight.shape == (hidden, hidden)
    n = sum(t.numel() for t in p.parameters())
    assert n == {"0.5b": 3_557_120, "1.5b": 7_080_960, "7b": 23_862_272}[size]


@pytest.mark.parametrize("layout", ["apple", "hf"])
def test_projector_loads_both_layouts(tmp_path, layout):
    p = fastvlm.Projector(64, 24)
    torch.nn.init.normal_(p.linear_1.bias)
    sd = p.state_dict()
    if layout == "apple":
        ck = {f"model.mm_projector.{'0' if k.startswith('linear_1') else '2'}.{k.split('.')[-1]}": v for k, v in sd.items()}
    else:
        ck = {f"model.multi_modal_projector.{k}": v for k, v in sd.items()}
    ck["model.embed_tokens.weight"] = torch.zeros(3, 24)
    save_file(ck, str(tmp_path / "model.safetensors"))
    q = fastvlm.load_projector(str(tmp_path))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = p.linear_2(torch.nn.functional.gelu(p.linear_1(x)))
        assert torch.equal(q(x), ref)
    with pytest.raises(fastvlm.CheckpointMismatchError):
        bad = dict(ck)
        bad.pop(next(k for k in bad if k.endswith("bias") and "embed" not in k))
        fastvlm.load_projector(bad)
    with pytest.raises(fastvlm.UnknownLayoutError):
        fastvlm.load_projector({"model.embed_tokens.weight": torch.zeros(1)})
