"""The extension as a whole: the package without it, thread counts, every output written, tiling."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastvlm_kernels
from fastvlm.testing import cpu_flags, rel_l2
from cpu_cases import attn_args, attn_c, convffn_c, ffn_args, mix_args, needs_ext, patch_embed_c, repmixer_c, stem_c


def test_package_imports_without_extension(tmp_path):
    """With _C unimportable, fastvlm_kernels imports, warns once, and fastvlm still runs."""
    code = r"""
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastvlm_kernels._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import fastvlm_kernels
    a = fastvlm_kernels.extension_available(); b = fastvlm_kernels.extension_available()
msgs = [str(x.message) for x in w if "C++ extension" in str(x.message)]
import torch, fastvlm
m = fastvlm.FastViTHD(fastvlm.FastViTHDConfig.tiny()).eval()
assert m(torch.rand(1, 3, 64, 64)).shape == (1, 1, 256)
print(a, b, len(msgs))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "1"]


@needs_ext
@pytest.mark.parametrize("op", ["convffn", "repmixer", "dwconv", "attention_mixer", "conv_exp", "stem"])
def test_thread_counts_and_concurrent_callers_agree(op):
    import threading
    if op == "stem":  # several 4 x 32 blocks per image
        g = torch.Generator().manual_seed(4)
        st = [torch.randn(20, 3, 3, 3, generator=g) * 0.5, torch.randn(20, generator=g) * 0.1,
              torch.randn(3, 3, 20, generator=g) * 0.4, torch.randn(20, generator=g) * 0.1,
              torch.randn(20, 20, generator=g) * 0.2, torch.randn(20, generator=g) * 0.1]
        x = torch.rand(2, 45, 141, 3, generator=g)

        def call():
            return stem_c(x, st)
    elif op == "conv_exp":
        g = torch.Generator().manual_seed(2)
        ce = [torch.randn(3, 3, 48, generator=g), torch.randn(48, generator=g), torch.randn(12, 48, generator=g) * 0.2,
              torch.randn(12, generator=g), torch.randn(48, 12, generator=g) * 0.3, torch.randn(48, generator=g)]
        x = torch.randn(3, 13, 11, 24, generator=g)

        def call():
            return torch.ops.fastvlm_C.conv_exp_nhwc(x, *ce)
    elif op == "attention_mixer":
        a = [t.float() for t in attn_args(64, seed=5)]
        x = torch.randn(2, 17, 15, 64)

        def call():
            return attn_c(x, a, 32)
    elif op == "convffn":
        a = [t.float() for t in ffn_args(40, 300, seed=3)]  # two hidden chunks
        x = torch.randn(2, 37, 29, 40)

        def call():
            return convffn_c(x, a)
    elif op == "repmixer":  # 7 x 3 rectangles per image with 1 thread, 8 x 3 with 2 (an even count)
        mix, a = [t.float() for t in mix_args(40, seed=7)], [t.float() for t in ffn_args(40, 300, seed=3)]
        x = torch.randn(1, 37, 70, 40)

        def call():
            return repmixer_c(x, mix, a)
    else:
        x, w, b = torch.randn(2, 29, 31, 40), torch.randn(7, 7, 40), torch.randn(40)

        def call():
            return torch.ops.fastvlm_C.dwconv_nhwc(x, w, b, 1, 3, True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call()
        torch.set_num_threads(2)
        two = call()
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)
    results = [None] * 4

    def worker(i):
        results[i] = call()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, one) for r in results)


_POISON_CHECK = r"""
import torch, fastvlm_kernels
from fastvlm_kernels import reference
from fastvlm.testing import cpu_flags, rel_l2
fastvlm_kernels.load_extension()
probe = torch.empty(4096)
assert (probe == probe.new_full((1,), 3.3961514e38)).all(), "MALLOC_PERTURB_ did not poison torch.empty"
g = torch.Generator().manual_seed(7)
r = lambda *s, sc=1.0: torch.randn(*s, generator=g) * sc
ffn = [r(7, 7, 12, sc=0.2), r(12, sc=0.1), r(48, 12, sc=0.3), r(48, sc=0.1), r(12, 48, sc=0.15), r(12, sc=0.1),
       r(12).abs() + 0.5]
x, px = r(2, 9, 11, 12), torch.rand(1, 21, 19, 3, generator=g)
st = [r(16, 3, 3, 3, sc=0.5), r(16, sc=0.1), r(3, 3, 16, sc=0.4), r(16, sc=0.1), r(16, 16, sc=0.25), r(16, sc=0.1)]
pe = [r(7, 7, 24, sc=0.2), r(24, sc=0.1), r(24, 24, sc=0.2), r(24, sc=0.1)]
pe2, x2 = [r(7, 7, 50, sc=0.2), r(50, sc=0.1), r(50, 50, sc=0.15), r(50, sc=0.1)], r(1, 13, 17, 25)  # AVX-512: pairs, a vector, a tail
at = [r(12).abs() + 0.5, r(12, sc=0.1), r(36, 12, sc=0.3), r(12, 12, sc=0.3), r(12, sc=0.1), r(12).abs() + 0.5]
xa = r(2, 15, 11, 12)  # 165 tokens: two key blocks
ce = [r(3, 3, 24, sc=0.3), r(24, sc=0.1), r(6, 24, sc=0.4), r(6, sc=0.1), r(24, 6, sc=0.4), r(24, sc=0.1)]
d = lambda ts: [t.double() for t in ts]
pk = torch.ops.fastvlm_C.pack_linear
cases = [
    (torch.ops.fastvlm_C.dwconv_nhwc(x, ffn[0], ffn[1], 2, 3, True), reference.dwconv(x.double(), *d(ffn[:2]), 2, 3, True)),
    (torch.ops.fastvlm_C.dwconv_nhwc(x, ffn[0], ffn[1], 1, 3, True), reference.dwconv(x.double(), *d(ffn[:2]), 1, 3, True)),
    (torch.ops.fastvlm_C.convffn_nhwc(x, ffn[0], ffn[1], pk(ffn[2]), ffn[3], pk(ffn[4]), *ffn[5:]), reference.convffn(x.double(), *d(ffn))),
    (torch.ops.fastvlm_C.stem_nhwc(px, *st[:4], pk(st[4]), st[5]), reference.stem(px.double(), *d(st))),
    (torch.ops.fastvlm_C.patch_embed_nhwc(x, pe[0], pe[1], pk(pe[2]), pe[3], 2), reference.patch_embed(x.double(), *d(pe))),
    (torch.ops.fastvlm_C.patch_embed_nhwc(x2, pe2[0], pe2[1], pk(pe2[2]), pe2[3], 2), reference.patch_embed(x2.double(), *d(pe2))),
    (torch.ops.fastvlm_C.attention_mixer_nhwc(xa, *at[:2], pk(at[2]), pk(at[3]), *at[4:], 4), reference.attention_mixer(xa.double(), *d(at), 4)),
    (torch.ops.fastvlm_C.conv_exp_nhwc(x, *ce), reference.conv_exp(x.double(), *d(ce))),
    (torch.ops.fastvlm_C.conv_exp_nhwc(x.bfloat16(), *ce).float(), reference.conv_exp(x.bfloat16().double(), *d(ce))),
]
import fastvlm_kernels.cpu as cpu
if cpu.uses_bf16_pairs(torch.bfloat16):  # the AVX512_BF16 ConvFFN, odd C and Hd
    fb = [t.bfloat16() for t in (r(7, 7, 13, sc=0.2), r(13, sc=0.1), r(51, 13, sc=0.3), r(51, sc=0.1),
                                 r(13, 51, sc=0.15), r(13, sc=0.1), r(13).abs() + 0.5)]
    xb, pb = r(2, 9, 11, 13).bfloat16(), torch.ops.fastvlm_C.pack_linear_bf16
    cases.append((torch.ops.fastvlm_C.convffn_nhwc(xb, fb[0], fb[1], pb(fb[2]), fb[3], pb(fb[4]), *fb[5:]).float(),
                  reference.convffn(xb.double(), *d(fb))))
    ab, xab = [t.bfloat16() for t in at], xa.bfloat16()  # and the attention's qkv / proj
    cases.append((torch.ops.fastvlm_C.attention_mixer_nhwc(xab, *ab[:2], pb(ab[2]), pb(ab[3]), *ab[4:], 4).float(),
                  reference.attention_mixer(xab.double(), *d(ab), 4)))
    peb, xpb = [t.bfloat16() for t in pe], x.bfloat16()  # and patch_embed's 1x1
    cases.append((torch.ops.fastvlm_C.patch_embed_nhwc(xpb, peb[0], peb[1], pb(peb[2]), peb[3], 2).float(),
                  reference.patch_embed(xpb.double(), *d(peb))))
for i, (y, ref) in enumerate(cases):
    assert torch.isfinite(y).all() and rel_l2(y, ref) <= (1e-5 if i < 8 else 1e-2), (i, rel_l2(y, ref))
print("ok", len(cases))
"""


@needs_ext
def test_every_output_element_is_written():
    """The C++ ops allocate their own outputs, so the allocator is poisoned instead: with glibc's
    MALLOC_PERTURB_=128 every new heap block reads 0x7F7F7F7F (3.4e38) per float, and an element a
    kernel forgot to write wrecks the parity check. The kernels' per-thread scratch is a plain heap
    block too, so a kernel that read scratch it had not written fails here as well. The subprocess
    first checks the poisoning works."""
    env = dict(os.environ, MALLOC_PERTURB_="128")
    out = subprocess.run([sys.executable, "-c", _POISON_CHECK], capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    import fastvlm_kernels.cpu as cpu
    assert out.stdout.split() == ["ok", "12" if cpu.uses_bf16_pairs(torch.bfloat16) else "9"]


@needs_ext
@pytest.mark.parametrize("op", ["convffn", "stem", "patch_embed", "attention_mixer"])
def test_tiling_does_not_change_results(monkeypatch, op):
    """The 1x1-GEMM ops cut images into tiles (FASTVLM_FFN_TILE pixels, whole 6-pixel groups spread
    evenly; blocks of RB x SW output pixels for the stem): results must be bitwise the same for any
    tiling, and right."""
    from fastvlm_kernels import reference
    g = torch.Generator().manual_seed(11)

    def r(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc
    if op == "convffn":
        a, x = ffn_args(24, 72, seed=4), r(2, 13, 11, 24)
        ref, fn = reference.convffn(x, *a), lambda: convffn_c(x.float(), [t.float() for t in a])
    elif op == "stem":
        a = [r(20, 3, 3, 3, sc=0.5), r(20, sc=0.1), r(3, 3, 20, sc=0.4), r(20, sc=0.1), r(20, 20, sc=0.2), r(20, sc=0.1)]
        x = torch.rand(2, 37, 29, 3, dtype=torch.float64, generator=g)
        ref, fn = reference.stem(x, *a), lambda: stem_c(x.float(), [t.float() for t in a])
    elif op == "patch_embed":
        a, x = [r(7, 7, 24, sc=0.2), r(24, sc=0.1), r(24, 24, sc=0.2), r(24, sc=0.1)], r(2, 19, 15, 12)
        ref, fn = reference.patch_embed(x, *a), lambda: patch_embed_c(x.float(), [t.float() for t in a])
    else:
        a, x = attn_args(40, seed=6), r(2, 9, 11, 40)
        ref, fn = reference.attention_mixer(x, *a, 8), lambda: attn_c(x.float(), [t.float() for t in a], 8)
    outs = []
    # the stem cuts its output grid into blocks of RB x SW pixels instead (FASTVLM_STEM_BLOCK)
    var, tiles = ("FASTVLM_STEM_BLOCK", ("1x1", "2x5", "3x16", "4x32", "32x32")) if op == "stem" else \
        ("FASTVLM_FFN_TILE", ("6", "12", "30", "96"))
    for tile in tiles:
        monkeypatch.setenv(var, tile)
        outs.append(fn())
    assert rel_l2(outs[-1], ref) <= 1e-5
    for y in outs[:-1]:
        assert torch.equal(y, outs[-1])
