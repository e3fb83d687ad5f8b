"""accelerate() on the classes users hold: transformers' FastVlmForConditionalGeneration, FastVlmModel and
TimmWrapperModel, and timm's FastVit (fastvit_mci3). Round trips through transformers' own
save_pretrained / from_pretrained, and our preprocessing and prompts against what transformers
ships for FastVLM.

The real timm and transformers run here; where no real torchvision imports, tests/conftest.py puts
the test-only stand-in (tests/torchvision_standin) in its place. The towers are well conditioned:
a random train form, folded (fastvlm.testing.random_tower), so their features depend on the image
(each test checks that too, so a kernel that ignored its input could not pass).
"""
import copy
import warnings

import numpy as np
import pytest
import torch

import fastvlm
import fastvlm.testing
import fastvlm.vlm
import fastvlm_kernels as fk
from fastvlm.checkpoint import convert_state_dict
from fastvlm.testing import random_tower, rel_l2, tiny_tokenizer
from fastvlm_kernels.modules import FrozenDeviceDtypeError

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FastVlmForConditionalGeneration"):
    pytest.skip("this transformers has no FastVLM (FastVlmForConditionalGeneration)", allow_module_level=True)

BACKENDS = [b for b in fk.available_backends() if b != "triton"]
TINY = fastvlm.FastViTHDConfig.tiny()
H, W = 128, 192  # non-square: a 2 x 3 token grid
QWEN2_TINY = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=512, rms_norm_eps=1e-6,
                  rope_theta=1e6, tie_word_embeddings=False)

# The chat template transformers' conversion script (convert_fastvlm_weights_to_hf.py) gives the
# tokenizers of the HF FastVLM checkpoints: a default system turn, then per message its images
# ("<image>" each) followed by each text part preceded by a newline.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{{ '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _timm_args(cfg):
    return fastvlm.vlm._timm_model_args(cfg)


def _timm_sd(cfg, seed):
    """A well-conditioned random tower in timm's inference-form layout."""
    return convert_state_dict(random_tower(cfg, seed=seed, weight_gain=0.85 if cfg == TINY else 0.5).state_dict(),
                              "apple", "timm", config=cfg)


def _load_tower(timm_model, sd):
    missing, unexpected = timm_model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)


def _pixels(b=1, h=H, w=W, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _image_features(model, x):
    """transformers' FastVLM image features, (B, tokens, C): get_image_features' pooler_output, which
    transformers 5.17 (the GPU machines') returns as a list of per-image tensors, 5.25 as one tensor."""
    f = model.model.get_image_features(pixel_values=x).pooler_output
    return torch.stack(list(f)) if isinstance(f, (list, tuple)) else f


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _hf_config(tok, cfg=TINY, image_tokens=6):
    return transformers.FastVlmConfig(
        text_config=dict(QWEN2_TINY),
        vision_config=dict(model_type="timm_wrapper", architecture="fastvit_mci3", hidden_size=cfg.num_features,
                           do_pooling=True, global_pool="avg", model_args=_timm_args(cfg)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_length=image_tokens)


@pytest.fixture(scope="module")
def hf_model(tok):
    """transformers' FastVlmForConditionalGeneration: a tiny fastvit_mci3 (random, well conditioned) and a
    2-layer Qwen2."""
    torch.manual_seed(0)
    m = transformers.FastVlmForConditionalGeneration(_hf_config(tok)).eval()
    _load_tower(m.model.vision_tower.timm_model, _timm_sd(TINY, seed=7))
    return m


def _ids(tok, n_image=6, text="Describe the image."):
    img = tok.convert_tokens_to_ids("<image>")
    pre = tok(fastvlm.vlm.chat_prompt("<image>\n" + text).split("<image>")[0], add_special_tokens=False)["input_ids"]
    post = tok(fastvlm.vlm.chat_prompt("<image>\n" + text).split("<image>")[1], add_special_tokens=False)["input_ids"]
    return torch.tensor([pre + [img] * n_image + post])


# ---- transformers' FastVLM ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_fastvlm_logits_and_generate_with_accelerate(hf_model, tok, backend):
    ids, x = _ids(tok), _pixels()
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=x).logits
        other = hf_model(input_ids=ids, pixel_values=_pixels(seed=1)).logits
    assert rel_l2(other[0, -1], ref[0, -1]) > 1e-2  # the answer depends on the image
    want = hf_model.generate(input_ids=ids, pixel_values=x, max_new_tokens=6, do_sample=False)
    m = fk.accelerate(copy.deepcopy(hf_model), backend=backend)
    tower = m.model.vision_tower
    assert isinstance(tower.timm_model.stem, fk.modules.FusedStem)
    assert tower.device == torch.device("cpu") and tower.dtype == torch.float32 and m.dtype == torch.float32
    with torch.no_grad():
        out = m(input_ids=ids, pixel_values=x).logits
    assert rel_l2(out, ref) <= 1e-4
    got = m.generate(input_ids=ids, pixel_values=x, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_fastvlm_bf16_no_worse_than_eager_bf16(hf_model, tok, backend):
    """Image features of eager bf16 and accelerated bf16 against the float64 model, summed over 3 images."""
    m64 = copy.deepcopy(hf_model).double()
    eager16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    acc16 = fk.accelerate(copy.deepcopy(hf_model).to(torch.bfloat16), backend=backend)
    assert acc16.model.vision_tower.dtype == torch.bfloat16
    e_err = a_err = 0.0
    with torch.no_grad():
        for s in range(3):
            x = _pixels(seed=s)
            ref = _image_features(m64, x.double())
            e_err += rel_l2(_image_features(eager16, x.bfloat16()), ref)
            a_err += rel_l2(_image_features(acc16, x.bfloat16()), ref)
        logits = acc16(input_ids=_ids(tok), pixel_values=_pixels().bfloat16()).logits
    assert a_err <= e_err, (a_err, e_err)
    assert torch.isfinite(logits).all()
    # a float32 model accelerated in bf16: the tower and the projector run in bf16, the LLM stays float32
    m = fk.accelerate(copy.deepcopy(hf_model), backend=backend, dtype=torch.bfloat16)
    assert m.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = m(input_ids=_ids(tok), pixel_values=_pixels()).logits
    assert out.dtype == torch.float32 and rel_l2(out, hf_model(input_ids=_ids(tok), pixel_values=_pixels()).logits) < 5e-2


def test_hf_state_dict_save_pretrained_and_load(hf_model, tok, tmp_path):
    """An accelerated model's state_dict() is transformers' layout (same keys, same shapes; the ConvFFN
    BatchNorms come back folded, identity statistics); save_pretrained() writes it and transformers'
    from_pretrained() gives the same logits; load_state_dict() takes that layout back."""
    ids, x = _ids(tok), _pixels()
    backend = BACKENDS[-1]
    m = fk.accelerate(copy.deepcopy(hf_model), backend=backend)
    sd0, sd = hf_model.state_dict(), m.state_dict()
    assert list(sd) == list(sd0)
    assert all(sd[k].shape == sd0[k].shape and sd[k].dtype == sd0[k].dtype for k in sd0)
    folded = [k for k in sd0 if ".mlp.conv." in k]
    assert folded and all(torch.equal(sd[k], sd0[k]) for k in sd0 if k not in folded)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, pixel_values=x).logits
        m.save_pretrained(str(tmp_path / "acc"))
        back = transformers.FastVlmForConditionalGeneration.from_pretrained(str(tmp_path / "acc")).eval()
        assert rel_l2(back(input_ids=ids, pixel_values=x).logits, ref) <= 1e-5
        # another tower's weights, in transformers' layout, loaded into the accelerated model: it follows
        other = copy.deepcopy(hf_model)
        _load_tower(other.model.vision_tower.timm_model, _timm_sd(TINY, seed=8))
        m.load_state_dict(other.state_dict())
        assert rel_l2(m(input_ids=ids, pixel_values=x).logits, other(input_ids=ids, pixel_values=x).logits) <= 1e-4
        m.load_state_dict(sd0)
        assert rel_l2(m(input_ids=ids, pixel_values=x).logits, ref) <= 1e-4
    bad = dict(sd0)
    gone = bad.pop(next(k for k in bad if k.endswith("stem.0.reparam_conv.weight")))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*timm_model\.stem\.0\.reparam_conv\.weight"):
        m.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="whole, not in part"):
        m.load_state_dict(bad, strict=False)
    m.load_state_dict({k: v for k, v in sd0.items() if "timm_model" not in k}, strict=False)  # no tower keys: fine
    k = next(k for k in bad if k.endswith("final_conv.reparam_conv.bias"))
    bad[k], bad[k.replace("bias", "weight").replace("final_conv", "stem.0")] = bad[k][:-1], gone
    with pytest.raises(RuntimeError, match=r"size mismatch for .*final_conv\.reparam_conv\.bias"):
        m.load_state_dict(bad)
    with torch.no_grad():  # a refused load leaves the model as it was
        assert rel_l2(m(input_ids=ids, pixel_values=x).logits, ref) <= 1e-4


def test_hf_to_and_device_dtype(hf_model):
    m = fk.accelerate(copy.deepcopy(hf_model), backend=BACKENDS[-1])
    m.to("cpu")
    m.float()  # no change: allowed
    with pytest.raises(FrozenDeviceDtypeError, match="accelerate"):
        m.half()
    with pytest.raises(FrozenDeviceDtypeError):
        m.model.vision_tower.to(torch.float64)
    assert m.model.vision_tower.dtype == torch.float32  # nothing was converted before the refusal


@pytest.mark.parametrize("cls_name", ["FastVlmModel", "TimmWrapperModel"])
def test_hf_submodels(hf_model, tok, cls_name):
    x = _pixels(seed=3)
    if cls_name == "FastVlmModel":
        m = copy.deepcopy(hf_model.model)
        run = lambda mm: mm(input_ids=_ids(tok), pixel_values=x).last_hidden_state  # noqa: E731
    else:
        m = copy.deepcopy(hf_model.model.vision_tower)
        assert type(m).__name__ == "TimmWrapperModel"
        run = lambda mm: torch.cat([mm(pixel_values=x).last_hidden_state.flatten(), mm(x).pooler_output.flatten()])  # noqa: E731,E501
    with torch.no_grad():
        ref = run(m)
        fk.accelerate(m, backend=BACKENDS[-1])
        assert rel_l2(run(m), ref) <= 1e-4


# ---- timm's FastVit --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_mci3():
    """The released architecture, as timm builds it for transformers' FastVLM (inference form), with
    well-conditioned random weights."""
    tm = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, inference_mode=True).eval()
    _load_tower(tm, _timm_sd(fastvlm.FastViTHDConfig(), seed=3))
    return tm


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_fastvit_mci3_forward_features_and_head(timm_mci3, backend):
    x = _pixels(seed=4)
    with torch.no_grad():
        ref_f = timm_mci3.forward_features(x)
        ref_h = timm_mci3.forward_head(ref_f)
        assert rel_l2(timm_mci3.forward_features(_pixels(seed=5)), ref_f) > 1e-2
        tm = fk.accelerate(copy.deepcopy(timm_mci3), backend=backend)
        f = tm.forward_features(x)
        assert f.shape == ref_f.shape == (1, 3072, 2, 3) and rel_l2(f, ref_f) <= 1e-4
        assert rel_l2(tm.forward_head(f), ref_h) <= 1e-4
        assert rel_l2(tm(x), ref_h) <= 1e-4


def test_timm_train_form_model_is_accelerated():
    """timm.create_model's default (train form, every branch): folded on the way in."""
    tm = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, **{
        k: v for k, v in _timm_args(TINY).items() if k != "inference_mode"})
    fastvlm.testing.randomize_(tm, seed=2, weight_gain=0.85)
    tm.eval()
    x = _pixels(2, 70, 90)
    with torch.no_grad():
        ref = tm.forward_features(x)
        fk.accelerate(tm, backend=BACKENDS[-1])
        assert rel_l2(tm.forward_features(x), ref) <= 1e-4


def test_timm_state_dict_is_timm_inference_layout_and_loads(timm_mci3):
    tm = fk.accelerate(copy.deepcopy(timm_mci3), backend=BACKENDS[-1])
    sd = tm.state_dict()
    fresh = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, inference_mode=True).eval()
    want = fresh.state_dict()
    assert list(sd) == list(want) and all(sd[k].shape == want[k].shape for k in want)
    fresh.load_state_dict(sd)
    x = _pixels(seed=6)
    with torch.no_grad():
        assert rel_l2(fresh.forward_features(x), tm.forward_features(x)) <= 1e-5
        assert rel_l2(fresh.forward_features(x), timm_mci3.forward_features(x)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_torch_compile(backend):
    tm = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, **_timm_args(TINY)).eval()
    _load_tower(tm, _timm_sd(TINY, seed=9))
    fk.accelerate(tm, backend=backend)
    x = _pixels(1, 96, 160)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = tm.forward_features(x)
        compiled = torch.compile(tm.forward_features, fullgraph=True)(x)
    assert rel_l2(compiled, eager) <= 1e-5


# ---- round trips through transformers' own code ---------------------------------------------------

def _hf_processor(tok, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    # as transformers' conversion script configures the released models' processor (at 1024)
    ip = CLIPImageProcessorPil(crop_size={"height": size, "width": size}, image_mean=[0.0] * 3, image_std=[1.0] * 3,
                               size={"shortest_edge": size})
    tok = copy.deepcopy(tok)
    tok.chat_template = HF_CHAT_TEMPLATE
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=64,
                                       vision_feature_select_strategy="full", chat_template=HF_CHAT_TEMPLATE), tok


def _random_image(h, w, seed):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_fastvlm_from_pretrained_on_a_transformers_save(hf_model, tok, tmp_path):
    """transformers' save_pretrained -> FastVLM.from_pretrained: the same image features, and the same
    logits for the same conversation run through transformers' processor (image + chat template)."""
    hf = copy.deepcopy(hf_model)
    hf.config.image_seq_length = 4  # 128 x 128 images
    hf.save_pretrained(str(tmp_path / "hf"))
    tok.save_pretrained(str(tmp_path / "hf"))
    vlm = fastvlm.FastVLM.from_pretrained(str(tmp_path / "hf"), progress=False)
    assert vlm.image_size == 128
    vlm.pad_to_square = False  # transformers' processor resizes and centre-crops; predict.py pads
    x = _pixels(1, 128, 128, seed=2)
    with torch.no_grad():
        want = _image_features(hf_model, x)
        assert rel_l2(vlm.encode_images(x), want) <= 1e-5
        proc, _ = _hf_processor(tok, 128)
        image = _random_image(150, 97, seed=1)
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
        prompt = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        inputs = proc(images=image, text=prompt, return_tensors="pt")
        assert int((inputs["input_ids"] == vlm.image_token_id).sum()) == 4
        ref = hf_model(**inputs).logits[0]
        for placeholder in ("hf", "apple"):
            ours = vlm.logits(image, "<image>\nDescribe the image.", placeholder=placeholder)[0]
            assert ours.shape == ref.shape and rel_l2(ours, ref) <= 1e-5


def test_transformers_from_pretrained_on_our_hf_save(tmp_path):
    """Our save_pretrained(layout='hf') -> transformers' from_pretrained: the same logits as ours."""
    vlm = fastvlm.FastVLM.from_config("tiny", seed=3)
    vlm.save_pretrained(str(tmp_path / "ours"), layout="hf")
    hf = transformers.FastVlmForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
    tid = vlm.image_token_id
    assert hf.config.image_token_id == tid
    x = _pixels(1, 128, 128, seed=4)
    text = fastvlm.vlm.chat_prompt("<image>\nWhat is this?")
    pre, post = (vlm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in text.split("<image>"))
    ids = torch.tensor([pre + [tid] * 4 + post])
    with torch.no_grad():
        ref = vlm.logits(x, "<image>\nWhat is this?")[0]
        got = hf(input_ids=ids, pixel_values=x).logits[0]
    assert rel_l2(got, ref) <= 1e-5
    assert rel_l2(vlm.logits(_pixels(1, 128, 128, seed=5), "<image>\nWhat is this?")[0], ref) > 1e-3


# ---- preprocessing and prompts against transformers' ------------------------------------------------

@pytest.mark.parametrize("hw", [(97, 211), (300, 200), (128, 128), (50, 50), (1, 300)])
def test_pixels_equal_transformers_image_processor(tok, hw):
    """Our resize + centre-crop (pad_to_square=False) is bitwise transformers' CLIP processor as the HF
    FastVLM checkpoints configure it (PIL backend). The default, predict.py's square padding, is not
    what that processor does: on a non-square image the two differ (the HF checkpoints crop)."""
    from fastvlm.preprocess import preprocess
    proc, _ = _hf_processor(tok, 128)
    image = _random_image(*hw, seed=sum(hw))
    hf = proc.image_processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(preprocess(image, size=128, pad_to_square=False), hf)
    if hw[0] != hw[1]:
        assert not torch.equal(preprocess(image, size=128), hf)


def test_prompt_ids_equal_transformers_chat_template(tok):
    """chat_prompt('<image>\\n' + q) (predict.py) is the HF checkpoints' chat template for a user turn
    of one image and one text, string and ids. The template puts all of a turn's images first and a
    newline before each text part, so a text-only turn differs from predict.py by that one newline."""
    _, hf_tok = _hf_processor(tok, 128)
    q = "What is in this picture?"
    for content, ours in [([{"type": "image"}, {"type": "text", "text": q}], "<image>\n" + q),
                          ([{"type": "text", "text": q}, {"type": "image"}], "<image>\n" + q),
                          ([{"type": "text", "text": q}], "\n" + q),
                          ([{"type": "image"}, {"type": "image"}, {"type": "text", "text": q}], "<image><image>\n" + q)]:
        conv = [{"role": "user", "content": content}]
        text = hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert text == fastvlm.vlm.chat_prompt(ours)
        ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == tok(fastvlm.vlm.chat_prompt(ours), add_special_tokens=False)["input_ids"]
    assert fastvlm.vlm.chat_prompt(q) != hf_tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": q}]}], add_generation_prompt=True, tokenize=False)


# ---- our own generate on the current cache API --------------------------------------------------------

def test_generate_uses_the_current_cache_api():
    """No deprecation of the KV-cache argument (transformers 5.25 deprecates past_key_values) while
    generating: the next release would break the call."""
    vlm = fastvlm.FastVLM.from_config("tiny", seed=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = vlm.generate(_pixels(1, 128, 128), "<image>\nWhat is this?", max_new_tokens=4, stop=False)
    assert len(out.token_ids[0]) == 4
    noisy = [str(x.message) for x in w if "past_key_values" in str(x.message) or "cache" in str(x.message).lower()]
    assert not noisy, noisy


def test_from_config_answers_depend_on_the_image():
    vlm = fastvlm.FastVLM.from_config("tiny", seed=0)
    a = vlm.logits(_pixels(1, 128, 128, seed=1), "<image>\nWhat is this?")[0, -1]
    b = vlm.logits(_pixels(1, 128, 128, seed=2), "<image>\nWhat is this?")[0, -1]
    assert rel_l2(a, b) > 1e-3
