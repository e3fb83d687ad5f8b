"""Float64 models of exactly the roundings of the bf16-pair kernels (kernels/bf16_pairs.h): what the
AVX512_BF16 and AMX ConvFFN and attention compute, rounding for rounding, against which they are checked."""
import math

import torch
import torch.nn.functional as F


def convffn_bf16_rounded(x, a):
    """The bf16 ConvFFN as the AVX512_BF16 kernel computes it, in float64: the depthwise output and
    the GELU output rounded to bf16 (the operands of the pair products), weights in bf16, the
    result rounded to bf16. The GELU here is exact; the kernel's (gelu.h's piecewise bf16-output form,
    within 2.9e-6) rounds about 1 in 1000 hidden values to the neighbouring bf16."""
    import torch.nn.functional as F
    r = lambda t: t.to(torch.bfloat16).to(torch.float64)  # noqa: E731
    w = [r(t) for t in a]
    h = x.to(torch.float64).permute(0, 3, 1, 2)
    k = w[0].shape[0]
    d = r(F.conv2d(h, w[0].permute(2, 0, 1)[:, None], w[1], padding=k // 2, groups=h.shape[1]))
    hid = r(F.gelu(F.conv2d(d, w[2][:, :, None, None], w[3])))
    f = F.conv2d(hid, w[4][:, :, None, None], w[5])
    return (h + w[6][None, :, None, None] * f).permute(0, 2, 3, 1).to(torch.bfloat16)


def attention_bf16_rounded(x, a, hd, BK=128):
    """The bf16 attention mixer as the AVX512_BF16 kernels compute it, in float64: bf16 weights; the
    LayerNorm output, q (pre-scaled by head_dim^-0.5 log2(e): the kernels' scores are in base 2), k, v,
    the softmax numerators p = 2^(s - max) and the attention output rounded to bf16; per query the
    flash recurrence over key blocks of BK (p rounded against the running max of its block, the running
    sum adding the rounded p); the result rounded to bf16."""
    r = lambda t: t.to(torch.bfloat16).to(torch.float64)  # noqa: E731
    ln_w, ln_b, qkv_w, proj_w, proj_b, gamma = [r(t) for t in a]
    B, H, W, C = x.shape
    N, heads = H * W, C // hd
    t = x.to(torch.float64).reshape(B, N, C)
    u = t.mean(-1, keepdim=True)
    n = r((t - u) / torch.sqrt((t - u).pow(2).mean(-1, keepdim=True) + 1e-5) * ln_w + ln_b)
    qkv = (n @ qkv_w.T).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
    q, k, v = r(qkv[0] * (hd ** -0.5 * math.log2(math.e))), r(qkv[1]), r(qkv[2])
    m = torch.full((B, heads, N, 1), -torch.inf, dtype=torch.float64)
    l, o = torch.zeros_like(m), torch.zeros_like(q)
    for k0 in range(0, N, BK):
        s = q @ k[:, :, k0:k0 + BK].transpose(-2, -1)
        mn = torch.maximum(m, s.amax(-1, keepdim=True))
        alpha, p = torch.exp2(m - mn), r(torch.exp2(s - mn))
        l, o, m = l * alpha + p.sum(-1, keepdim=True), o * alpha + p @ v[:, :, k0:k0 + BK], mn
    o = r((o / l).transpose(1, 2).reshape(B, N, C))
    return (t + gamma * (o @ proj_w.T + proj_b)).reshape(B, H, W, C).to(torch.bfloat16)


def gelu_bf16_pw_table():
    """gelu.h's piecewise bf16-output GELU, read from the header: its constants {name: value} and its
    table {"C0": [32 values], ..., "C3": [...]}."""
    import os
    import re
    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "kernels",
                            "gelu.h")).read()
    ns = src[src.index("namespace gelu_bf16_pw {"):src.index("}}  // namespace fastvlm::gelu_bf16_pw")]
    const = {k: float(v) for k, v in re.findall(r"(kH|kInvH|kHi|kMid|kMagic) = ([\d.e+-]+)f", ns)}
    rows = {k: [float(v.rstrip("f")) for v in body.replace("\n", " ").split(",")]
            for k, body in re.findall(r"constexpr float (C\d)\[32\] = \{([^}]*)\}", ns)}
    return const, rows


def gelu_bf16_pw(x):
    """The AVX-512 bf16-pair kernels' GELU (vec.h's vgelu_bf16 on 16 lanes) on float32 x, operation for
    operation in float32: t = min(x, kHi); i = the low 5 bits of max(fma(t, kInvH, kMid + kMagic),
    kMagic); Phi = Horner's fma chain over the table's cubic of interval i; x * Phi. A fused
    multiply-add is modelled as float64's exact product plus a float64 sum, rounded to float32 (a
    double rounding, which differs from one rounding about once in 2^29)."""
    const, rows = gelu_bf16_pw_table()
    c = torch.tensor([rows[f"C{k}"] for k in range(4)], dtype=torch.float32)
    f32 = lambda t: t.to(torch.float32)  # noqa: E731
    fma = lambda a, b, d: f32(a.double() * b.double() + d.double())  # noqa: E731
    x = f32(x)
    t = torch.minimum(x, torch.tensor(const["kHi"]))  # NaN stays NaN
    v = torch.maximum(fma(t, torch.tensor(const["kInvH"]), torch.tensor(const["kMid"] + const["kMagic"])),
                      torch.tensor(const["kMagic"]))
    i = (v.view(torch.int32) & 31).long()  # a NaN's low bits: 0, as VPERMT2PS reads them
    p = c[3][i]
    for k in (2, 1, 0):
        p = fma(p, t, c[k][i])
    return x * p
