"""The reference FastViTHD: reparameterization, shapes, dtypes, memory formats, bad input."""
import copy

import pytest
import torch

import fastvlm
from fastvlm.testing import rel_l2
from conftest import make_model


@pytest.mark.parametrize("config_name", ["tiny", "default"])
def test_reparameterize_matches_train_form(config_name):
    cfg = fastvlm.FastViTHDConfig.tiny() if config_name == "tiny" else fastvlm.FastViTHDConfig()
    m = make_model(cfg, inference_mode=False, seed=3)
    assert not m.inference_mode
    x = torch.rand(2, 3, 100, 130, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
        m.reparameterize()
        out = m(x)
    assert m.inference_mode
    assert not any(k for k in m.state_dict() if "rbr_" in k or "lkb_origin" in k or ".pe." in k)
    assert rel_l2(out, ref) <= 1e-9
    # The check is not vacuous: layer scales and BN stats matter, and the output is not tiny.
    assert ref.abs().max() > 1e-2


def test_reparameterize_detects_a_wrong_fold():
    """A fold that forgot any one branch's BN shift would be caught: perturb one BN after the fact."""
    cfg = fastvlm.FastViTHDConfig.tiny()
    m = make_model(cfg, seed=5)
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        folded = copy.deepcopy(m).reparameterize()
        assert rel_l2(folded(x), ref) <= 1e-9
        m.network[0][0].token_mixer.mixer.rbr_skip.running_mean.add_(0.3)
        assert rel_l2(m.reparameterize()(x), ref) > 1e-4


def test_inference_mode_constructor_has_checkpoint_keys():
    m = fastvlm.FastViTHD(inference_mode=True)
    keys = set(m.state_dict())
    for k in ["patch_embed.0.reparam_conv.weight", "network.0.0.token_mixer.reparam_conv.weight",
              "network.1.proj.0.lkb_reparam.weight", "network.6.reparam_conv.weight",
              "network.7.3.token_mixer.qkv.weight", "network.10.1.layer_scale_2",
              "conv_exp.se.reduce.weight", "network.4.23.convffn.conv.bn.running_var"]:
        assert k in keys, k
    n = sum(p.numel() for p in m.parameters())
    assert n == 122_714_208  # 122.71 M without head.proj


@pytest.mark.parametrize("hw,grid", [((1024, 1024), (16, 16)), ((768, 768), (12, 12)), ((1536, 1536), (24, 24)),
                                     ((300, 500), (5, 8)), ((1, 1), (1, 1)), ((65, 65), (2, 2))])
def test_token_counts(hw, grid):
    m = make_model(fastvlm.FastViTHDConfig.tiny(), inference_mode=True, dtype=torch.float32)
    x = torch.rand(1, 3, *hw)
    with torch.no_grad():
        f = m.forward_features(x)
        t = m(x)
    assert f.shape == (1, m.num_features, *grid)
    assert t.shape == (1, grid[0] * grid[1], m.num_features)
    # row-major tokens: token (i, j) is feature column [:, i, j]
    i, j = grid[0] - 1, 0
    assert torch.equal(t[0, i * grid[1] + j], f[0, :, i, j])


def test_default_model_1024_gives_256_tokens_of_3072():
    m = fastvlm.FastViTHD(inference_mode=True).eval()
    with torch.no_grad():
        t = m(torch.rand(1, 3, 1024, 1024))
    assert t.shape == (1, 256, 3072) and torch.isfinite(t).all()


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_batches_are_independent(batch):
    m = make_model(fastvlm.FastViTHDConfig.tiny(), inference_mode=True)
    x = torch.rand(batch, 3, 70, 45, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        assert out.shape == (batch, 2, m.num_features)
        for b in range(batch):
            assert rel_l2(m(x[b:b + 1])[0], out[b]) <= 1e-12


def test_nchw_and_channels_last_inputs_identical():
    m = make_model(fastvlm.FastViTHDConfig.tiny(), inference_mode=True, dtype=torch.float32)
    x = torch.rand(2, 3, 97, 131)
    with torch.no_grad():
        a = m(x)
        b = m(x.to(memory_format=torch.channels_last))
        c = m(x[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3))  # non-contiguous view
    assert torch.equal(a, b) and torch.equal(a, c)
    # and a channels_last *model* agrees within fp32 rounding
    mc = copy.deepcopy(m).to(memory_format=torch.channels_last)
    with torch.no_grad():
        d = mc(x)
    assert rel_l2(d, a) <= 1e-5


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.bfloat16, 0.15), (torch.float16, 0.05)])
def test_low_precision_forward(dtype, bound):
    ref_model = make_model(fastvlm.FastViTHDConfig.tiny(), inference_mode=True)
    x = torch.rand(2, 3, 96, 80, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_model(x)
        out = copy.deepcopy(ref_model).to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    assert rel_l2(out, ref) <= bound


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.rand(3, 64, 64), ValueError, "4-D"),
    (torch.rand(1, 1, 64, 64), ValueError, "3 channels"),
    (torch.rand(1, 4, 64, 64), ValueError, "3 channels"),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError, "floating point"),
    (torch.rand(1, 3, 0, 64), ValueError, "H, W >= 1"),
    (torch.rand(1, 3, 64, 0), ValueError, "H, W >= 1"),
    (torch.rand(1, 3, 64, 64, dtype=torch.float64), TypeError, "does not match"),
    ("not a tensor", TypeError, "torch.Tensor"),
])
def test_bad_input(bad, exc, msg):
    m = fastvlm.FastViTHD(fastvlm.FastViTHDConfig.tiny(), inference_mode=True).eval()
    with pytest.raises(exc, match=msg):
        m(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="head_dim"):
        fastvlm.FastViTHDConfig(embed_dims=(8, 16, 32, 48, 96))
    with pytest.raises(ValueError, match="multiple"):
        fastvlm.FastViTHDConfig(embed_dims=(8, 12, 32, 64, 128))
    with pytest.raises(TypeError):
        fastvlm.FastViTHD(config={"layers": (1,)})


def test_convffn_bn_fold():
    from fastvlm.reparam import fold_convffn_bn
    m = make_model(fastvlm.FastViTHDConfig.tiny(), inference_mode=True)
    ffn = m.network[0][0].convffn
    x = torch.randn(2, ffn.fc1.in_channels, 11, 9, dtype=torch.float64)
    w, b = fold_convffn_bn(ffn)
    y = torch.nn.functional.conv2d(x, w, b, 1, 3, groups=x.shape[1])
    assert rel_l2(y, ffn.conv(x)) <= 1e-12
