"""fastvlm.FastVLM end to end on a tiny random VLM: prompt splicing, placeholder forms, batching,
generation with and without accelerate(), both checkpoint layouts, errors, and the CLI.

Weights are randomised (O(1) layer scales, fan-in scaled linears) so the image visibly moves the
logits: every test below first checks that what it compares is not insensitive to the image."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import fastvlm_kernels  # noqa: E402
from fastvlm.fastvithd import FastViTHDConfig  # noqa: E402
from fastvlm.testing import randomize_, random_tower, rel_l2  # noqa: E402
from fastvlm.vlm import (IMAGE_TOKEN_INDEX, FastVLM, MissingTokenizerError, TTFT,  # noqa: E402
                         chat_prompt)
from fastvlm.checkpoint import CheckpointMismatchError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P1 = "<image>\nDescribe the image in detail."


@pytest.fixture(scope="module")
def vlm():
    v = FastVLM.from_config("tiny", seed=0)
    randomize_(v, seed=5, weight_gain=1.0)  # the LLM and projector
    v.vision_tower = random_tower(FastViTHDConfig.tiny(), seed=5, weight_gain=0.85)
    return v.eval()


@pytest.fixture(scope="module")
def images():
    # Three images the tiny model tells apart (noise, dim noise, a ramp): they give different tokens.
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 128)[None, None, :].expand(3, 128, 128).clone()
    return [torch.rand(3, 128, 128, generator=g), 0.3 * torch.rand(3, 128, 128, generator=g), ramp.flip(1) * ramp.mT]


def _fresh(vlm):
    return copy.deepcopy(vlm)


def test_chat_template_is_predict_py():
    assert chat_prompt("<image>\nhi") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                          "<|im_start|>user\n<image>\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_image_embeddings_land_at_the_placeholders(vlm, images):
    tok = vlm.tokenizer
    text = chat_prompt("Compare <image> with <image> please")
    inp = vlm.prepare_inputs([images[0], images[1]], "Compare <image> with <image> please")
    emb = inp["inputs_embeds"][0]
    feats = vlm.encode_images(torch.stack(images[:2]))  # (2, N, H)
    n = feats.shape[1]
    chunks = [tok(c, add_special_tokens=False)["input_ids"] for c in text.split("<image>")]
    assert len(chunks) == 3
    table = vlm.language_model.get_input_embeddings().weight
    pos = 0
    for j, ids in enumerate(chunks):
        assert torch.equal(emb[pos:pos + len(ids)], table[ids]), f"text run {j} is not where it should be"
        pos += len(ids)
        if j < 2:
            assert torch.equal(emb[pos:pos + n], feats[j]), f"image {j} is not at its placeholder"
            pos += n
    assert pos == emb.shape[0]  # N image positions per placeholder: text tokens - 2 + 2N
    assert not torch.equal(feats[0], feats[1])


def test_apple_and_hf_placeholder_forms_give_identical_logits(vlm, images):
    la = vlm.logits(images[0], P1, placeholder="apple")
    lh = vlm.logits(images[0], P1, placeholder="hf")
    assert torch.equal(la, lh)
    other = vlm.logits(images[1], P1, placeholder="apple")
    assert rel_l2(other[0, -1], la[0, -1]) > 1e-3, "the image does not move the logits: the test would be blind"


def test_several_images_in_one_prompt_are_consumed_in_order(vlm, images):
    a = vlm.logits([images[0], images[1]], "<image> then <image>: what changed?")
    b = vlm.logits([images[1], images[0]], "<image> then <image>: what changed?")
    assert rel_l2(a[0, -1], b[0, -1]) > 1e-3


def test_greedy_generation_identical_with_and_without_accelerate(vlm, images):
    eager = _fresh(vlm)
    acc = fastvlm_kernels.accelerate(_fresh(vlm))
    assert acc.vision_tower.accelerated_backend in ("cpu", "reference", "triton")
    for im in images:
        a = eager.generate(im, P1, max_new_tokens=8, stop=False)
        b = acc.generate(im, P1, max_new_tokens=8, stop=False)
        assert a.token_ids == b.token_ids
        assert rel_l2(b.first_logits, a.first_logits) < 1e-4
    outs = {tuple(eager.generate(im, P1, max_new_tokens=8, stop=False).token_ids[0]) for im in images}
    assert len(outs) > 1, "all images gave the same tokens: the comparison would be blind"


def test_accelerate_in_bf16_casts_the_projector_and_runs(vlm, images):
    acc = fastvlm_kernels.accelerate(_fresh(vlm), dtype=torch.bfloat16)
    assert acc.projector.linear_1.weight.dtype == torch.bfloat16
    assert acc.language_model.get_input_embeddings().weight.dtype == torch.float32
    ref = vlm.encode_images(images[0][None])
    out = acc.encode_images(images[0][None])
    assert out.dtype == torch.float32 and rel_l2(out, ref) < 5e-2


def test_batch_of_prompts_of_different_lengths_equals_single_runs(vlm, images):
    prompts = [P1, "Compare <image> and <image>, then say which one is darker and why.", "No image here."]
    imgs = [images[0], [images[1], images[2]], None]
    batch = vlm.generate(imgs, prompts, max_new_tokens=6, stop=False)
    lengths = set()
    for i, (im, p) in enumerate(zip(imgs, prompts)):
        single = vlm.generate(im, p, max_new_tokens=6, stop=False)
        lengths.add(single.ttft.prompt_tokens)
        assert batch.token_ids[i] == single.token_ids[0], f"prompt {i}"
        assert rel_l2(batch.first_logits[i], single.first_logits[0]) < 1e-4
    assert len(lengths) == 3  # really different lengths, so left padding is exercised


def test_generate_streams_and_reports_ttft(vlm, images):
    pieces = []
    out = vlm.generate(images[0], P1, max_new_tokens=10, stop=False, streamer=lambda i, t: pieces.append((i, t)))
    assert "".join(t for _, t in pieces) == out.texts[0]
    assert all(i == 0 for i, _ in pieces) and out.texts[0]
    t = out.ttft
    assert isinstance(t, TTFT) and t.encode > 0 and t.prefill > 0 and t.preprocess >= 0
    assert t.total == pytest.approx(t.preprocess + t.encode + t.project + t.prefill + t.first_token)
    assert t.prompt_tokens == vlm.prepare_inputs(images[0], P1)["inputs_embeds"].shape[1]
    assert out.tokens_per_s > 0 and out.new_tokens == 9


def test_generate_stops_at_end_of_turn(vlm, images):
    out = vlm.generate(images[0], P1, max_new_tokens=12, stop=False)
    first = out.token_ids[0][0]
    v = _fresh(vlm)
    v.language_model.generation_config.eos_token_id = first  # make the first token an end-of-turn token
    assert v.generate(images[0], P1, max_new_tokens=12).token_ids == [[]]


def test_sampling_is_seeded(vlm, images):
    a = vlm.generate(images[0], P1, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, seed=3, stop=False)
    b = vlm.generate(images[0], P1, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, seed=3, stop=False)
    assert a.token_ids == b.token_ids


def test_paths_and_pil_images_go_through_preprocessing(vlm, tmp_path):
    from PIL import Image
    arr = (np.random.default_rng(0).random((90, 140, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    by_path = vlm.logits(str(tmp_path / "a.png"), P1)
    by_array = vlm.logits(arr, P1)
    assert torch.equal(by_path, by_array)


@pytest.mark.parametrize("layout", ["apple", "hf"])
def test_checkpoint_layouts_load_to_identical_logits(vlm, images, tmp_path, layout):
    vlm.save_pretrained(str(tmp_path / layout), layout=layout)
    loaded = FastVLM.from_pretrained(str(tmp_path / layout), progress=False)
    assert loaded.checkpoint_layout == layout and not loaded.lm_head_tied
    assert loaded.image_size == vlm.image_size
    assert torch.equal(loaded.logits(images[0], P1), vlm.logits(images[0], P1))


def test_both_layouts_agree_with_each_other(vlm, images, tmp_path):
    vlm.save_pretrained(str(tmp_path / "a"), layout="apple")
    vlm.save_pretrained(str(tmp_path / "h"), layout="hf")
    a = FastVLM.from_pretrained(str(tmp_path / "a"), progress=False)
    h = FastVLM.from_pretrained(str(tmp_path / "h"), progress=False)
    assert torch.equal(a.logits(images[1], P1, placeholder="apple"), h.logits(images[1], P1, placeholder="hf"))


def test_lm_head_is_tied_to_the_embeddings_when_absent(vlm, images, tmp_path):
    v = _fresh(vlm)
    v.language_model.lm_head.weight = v.language_model.model.embed_tokens.weight
    v.save_pretrained(str(tmp_path / "t"), layout="apple")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = FastVLM.from_pretrained(str(tmp_path / "t"), progress=False)
    assert loaded.lm_head_tied
    assert torch.equal(loaded.logits(images[0], P1), v.logits(images[0], P1))
    assert rel_l2(loaded.logits(images[0], P1), vlm.logits(images[0], P1)) > 1e-3  # lm_head really changed


def test_checkpoint_errors(vlm, tmp_path):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "ck"
    vlm.save_pretrained(str(d), layout="apple")
    for f in os.listdir(d):
        if f.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(d / f)
    with pytest.raises(MissingTokenizerError, match="no tokenizer"):
        FastVLM.from_pretrained(str(d), progress=False)
    loaded = FastVLM.from_pretrained(str(d), tokenizer=vlm.tokenizer, progress=False)  # given explicitly: fine
    assert loaded.tokenizer is vlm.tokenizer
    sd = load_file(str(d / "model.safetensors"))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.norm.weight"] = torch.ones(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"up_proj(.|\n)*model\.norm\.weight"):
        FastVLM.from_pretrained(str(d), tokenizer=vlm.tokenizer, progress=False)
    with pytest.raises(Exception, match="config.json"):
        FastVLM.from_pretrained(str(tmp_path), progress=False)


def test_prompt_and_image_errors(vlm, images, tmp_path):
    with pytest.raises(ValueError, match="0 <image> placeholder.*1 image"):
        vlm.generate(images[0], "Describe.", max_new_tokens=1)
    with pytest.raises(ValueError, match="1 <image> placeholder.*0 image"):
        vlm.generate(None, P1, max_new_tokens=1)
    with pytest.raises(ValueError, match="2 prompts but 3 image entries"):
        vlm.generate([images[0], images[1], images[2]], [P1, P1], max_new_tokens=1)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        vlm.generate(str(bad), P1, max_new_tokens=1)
    with pytest.raises(FileNotFoundError, match="not found"):
        vlm.generate(str(tmp_path / "missing.png"), P1, max_new_tokens=1)
    with pytest.raises(ValueError, match="placeholder must be"):
        vlm.logits(images[0], P1, placeholder="llava")
    with pytest.raises(ValueError, match="max_new_tokens"):
        vlm.generate(images[0], P1, max_new_tokens=0)


def test_apple_sentinel_is_never_embedded(vlm, images, monkeypatch):
    seen = []
    emb = vlm.language_model.get_input_embeddings()
    orig = emb.forward
    monkeypatch.setattr(emb, "forward", lambda ids: (seen.append(ids.clone()), orig(ids))[1])
    vlm.prepare_inputs(images[0], P1, placeholder="apple")
    assert seen and all((ids >= 0).all() for ids in seen) and IMAGE_TOKEN_INDEX < 0


def test_from_config_shapes():
    from fastvlm.vlm import LLM_CONFIGS
    assert LLM_CONFIGS["0.5b"]["hidden_size"] == 896 and LLM_CONFIGS["7b"]["vocab_size"] == 152064
    with pytest.raises(ValueError, match="size must be one of"):
        FastVLM.from_config("3b")


def _cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastvlm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_cli_generate_end_to_end(vlm, tmp_path):
    from PIL import Image
    d = tmp_path / "model"
    vlm.save_pretrained(str(d), layout="hf")
    arr = (np.random.default_rng(1).random((100, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "img.png")
    r = _cli("generate", "--model", str(d), "--image", str(tmp_path / "img.png"), "--prompt", "Describe the image.",
             "--max-new-tokens", "7", "--backend", "cpu" if fastvlm_kernels.extension_available() else "reference")
    assert r.returncode == 0, r.stderr
    want = vlm.generate(arr, "<image>\nDescribe the image.", max_new_tokens=7).texts[0]
    assert r.stdout.rstrip("\n") == want
    assert "TTFT" in r.stderr and "tokens" in r.stderr and "loading HF fast_vlm checkpoint" in r.stderr
    r = _cli("generate", "--model", str(d), "--image", str(tmp_path / "nope.png"), "--prompt", "x")
    assert r.returncode == 2 and "image file not found" in r.stderr
    r = _cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "config.json" in r.stderr
    r = _cli("generate", "--model", str(d), "--prompt", "x", "--dtype", "int8")
    assert r.returncode == 2 and "unknown dtype" in r.stderr
