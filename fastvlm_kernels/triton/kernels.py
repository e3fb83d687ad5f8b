"""Triton kernels of the seven FastViTHD ops (NHWC activations, fp32 accumulation).

Every kernel is a plain ``@triton.jit`` function; the tile configurations it may run with are listed
in :data:`CONFIGS` (name -> list of constexpr/launch dicts). On a GPU the launcher
(``launch.py``) autotunes over them; under ``TRITON_INTERPRET=1`` the first one runs; the AOT test
compiles every (kernel, configuration) for sm_90 and sm_80.

Fusion map (the ops: docs/architecture.md):

- ``dw_kernel``: depthwise / grouped (multiplier M) kxk conv on NHWC rows of pixels, bias, GELU,
  and optionally the per-tile channel sums SE needs. The 49 (or 9) taps of a row of BLOCK_W pixels
  reuse each input row from L1 (Triton has no explicit halo tile in shared memory; the halo is read
  from global memory once and served from L1/L2 for the overlapping taps).
- ``ffn_fused_kernel``: fc1 + bias + GELU + fc2 + bias + layer scale + residual for a tile of BLOCK_M
  pixels. The 4C hidden activation lives only in registers, BLOCK_H columns at a time; the C-wide
  fc2 accumulator is held as up to three register tiles of BLOCK_O columns (C <= 3·BLOCK_O; used
  for C <= FFN_FUSED_MAX_C = 192, stages 0-1: wider accumulators spilled registers, see there). Its input is the dw7x7 output
  ``t`` (C wide), written once by ``dw_kernel``: computing the 7x7 taps inside the GEMM would redo
  them for every hidden chunk.
- Wider FFNs (C = 768/1536, stages 3-4: at most 1024 pixels per image) take one round trip of the
  hidden tensor: ``linear_kernel`` with a GELU epilogue writes it, ``linear_kernel`` with the
  bias + layer scale + residual epilogue reads it. A full fusion would need a (BLOCK_M x C) fp32
  accumulator of 768-1536 columns per program, beyond the register file at any useful BLOCK_M.
- ``linear_kernel``: a tiled GEMM ``y = act(LN(a) @ w.T + b)`` with optional LayerNorm prologue
  (LayerNormChannel fused into the qkv projection: row mean / rstd computed in the kernel), GELU or
  ``res + gamma·(...)`` epilogue.
- ``attention_kernel``: flash attention (online softmax, no N x N matrix) over the qkv rows,
  head_dim 32, one program per (query block, batch x head).
- ``stem_kernel``: conv3x3 s2 (Cin -> C) + GELU -> dw3x3 s2 + GELU -> 1x1 + GELU in one kernel;
  the full-resolution intermediate is recomputed per output tile (2.25x of a 27-MAC conv) instead
  of being stored.
- ``patch_embed_kernel``: dw7x7 s2 (multiplier 2) + GELU computed as the A-operand prologue of
  the 1x1 GEMM (+ bias + GELU); the dw output never reaches global memory (recomputed once per
  BLOCK_N output columns).
- ``se_reduce_kernel`` + ``se_expand_kernel`` + ``scale_gelu_kernel``: conv_exp's SE from the dw
  kernel's per-tile channel sums (spread over channel blocks), then ``GELU(y · s)`` in place: two
  passes over the conv_exp output.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


# ------------------------------------------------------------------------------------------------
# depthwise / grouped conv
# ------------------------------------------------------------------------------------------------
@triton.jit
def dw_kernel(x_ptr, w_ptr, b_ptr, y_ptr, sum_ptr, H, W, Cin, Ho, Wo, Cout, MULT, STRIDE, PAD,
              K: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SUMS: tl.constexpr,
              BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    pc = tl.program_id(1)
    nwb = tl.cdiv(Wo, BLOCK_W)
    wb = pid % nwb
    t = pid // nwb
    ho = t % Ho
    b = (t // Ho).to(tl.int64)
    wo = wb * BLOCK_W + tl.arange(0, BLOCK_W)
    co = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = co < Cout
    ci = co // MULT
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for tap in range(K * K):  # one loop over the taps: unrolled taps made ptxas spill registers
        hi = ho * STRIDE - PAD + tap // K + tl.zeros((BLOCK_W,), dtype=tl.int32)  # a vector: masks stay i1
        wi = wo * STRIDE - PAD + tap % K
        pm = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W) & (wo < Wo)
        xv = tl.load(x_ptr + ((b * H + hi) * W + wi)[:, None] * Cin + ci[None, :],
                     mask=pm[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + tap * Cout + co, mask=cmask, other=0.0).to(tl.float32)
        acc += xv * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    om = (wo < Wo)[:, None] & cmask[None, :]
    tl.store(y_ptr + ((b * Ho + ho) * Wo + wo)[:, None] * Cout + co[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=om)
    if SUMS:  # per-tile channel sums for SE: sum_ptr is (B, Ho * nwb, Cout) fp32, no atomics
        part = tl.sum(tl.where(om, acc, 0.0), axis=0)
        tl.store(sum_ptr + (b * (Ho * nwb) + ho * nwb + wb) * Cout + co, part, mask=cmask)


# ------------------------------------------------------------------------------------------------
# fused FFN: y = res + gamma * (fc2(GELU(fc1(t))) + b2), hidden kept in registers
# ------------------------------------------------------------------------------------------------
@triton.jit
def ffn_fused_kernel(t_ptr, res_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, g_ptr, y_ptr, M, C, HID,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_O: tl.constexpr, NB: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 offsets: the wrapper checks M*C < 2**31
    rmask = rows < M
    dt = t_ptr.dtype.element_ty
    acc0 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    oc = tl.arange(0, BLOCK_O)
    for n0 in range(0, HID, BLOCK_H):
        hn = n0 + tl.arange(0, BLOCK_H)
        hmask = hn < HID
        h = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < C
            a = tl.load(t_ptr + rows[:, None] * C + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w1_ptr + hn[:, None] * C + kk[None, :], mask=hmask[:, None] & kmask[None, :], other=0.0)
            h = tl.dot(a, tl.trans(w), h, input_precision=PREC)  # (HID, C) row-major: K-contiguous tile
        h = _gelu(h + tl.load(b1_ptr + hn, mask=hmask, other=0.0).to(tl.float32)[None, :])
        h = tl.where(hmask[None, :], h, 0.0).to(dt)
        w2 = tl.load(w2_ptr + oc[:, None] * HID + hn[None, :], mask=(oc < C)[:, None] & hmask[None, :], other=0.0)
        acc0 = tl.dot(h, tl.trans(w2), acc0, input_precision=PREC)
        if NB > 1:
            o1 = BLOCK_O + oc
            w2 = tl.load(w2_ptr + o1[:, None] * HID + hn[None, :], mask=(o1 < C)[:, None] & hmask[None, :], other=0.0)
            acc1 = tl.dot(h, tl.trans(w2), acc1, input_precision=PREC)
        if NB > 2:
            o2 = 2 * BLOCK_O + oc
            w2 = tl.load(w2_ptr + o2[:, None] * HID + hn[None, :], mask=(o2 < C)[:, None] & hmask[None, :], other=0.0)
            acc2 = tl.dot(h, tl.trans(w2), acc2, input_precision=PREC)
    _ffn_epilogue(acc0, oc, rows, rmask, res_ptr, b2_ptr, g_ptr, y_ptr, C)
    if NB > 1:
        _ffn_epilogue(acc1, BLOCK_O + oc, rows, rmask, res_ptr, b2_ptr, g_ptr, y_ptr, C)
    if NB > 2:
        _ffn_epilogue(acc2, 2 * BLOCK_O + oc, rows, rmask, res_ptr, b2_ptr, g_ptr, y_ptr, C)


@triton.jit
def _ffn_epilogue(acc, cols, rows, rmask, res_ptr, b2_ptr, g_ptr, y_ptr, C):
    cmask = cols < C
    m = rmask[:, None] & cmask[None, :]
    b2 = tl.load(b2_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    off = rows[:, None] * C + cols[None, :]
    r = tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)
    out = r + g[None, :] * (acc + b2[None, :])
    tl.store(y_ptr + off, out.to(y_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------
# GEMM with LayerNorm prologue and bias / GELU / residual epilogues
# ------------------------------------------------------------------------------------------------
@triton.jit
def linear_kernel(a_ptr, w_ptr, b_ptr, res_ptr, g_ptr, lnw_ptr, lnb_ptr, y_ptr, M, N, K, eps,
                  HAS_BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr, LN: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  PREC: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share each weight column tile while it is in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % group) % gsize
    pn = (pid % group) // gsize
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 offsets: the wrapper checks M*max(N,K) < 2**31
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    dt = a_ptr.dtype.element_ty
    if LN:  # LayerNormChannel statistics of each row (biased variance), fp32
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :],
                        other=0.0).to(tl.float32)
            s1 += tl.sum(a, axis=1)
        mean = s1 / K
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            m = rmask[:, None] & (kk < K)[None, :]
            a = tl.load(a_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, a - mean[:, None], 0.0)
            s2 += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(s2 / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        a = tl.load(a_ptr + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if LN:
            lw = tl.load(lnw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            lb = tl.load(lnb_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            a = ((a.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :])
            a = tl.where(kmask[None, :], a, 0.0).to(dt)
        w = tl.load(w_ptr + cols[:, None] * K + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PREC)  # nn.Linear (N, K): K-contiguous tile
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    m = rmask[:, None] & cmask[None, :]
    off = rows[:, None] * N + cols[None, :]
    if RESIDUAL:
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32) + g[None, :] * acc
    tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------
# flash attention over packed qkv rows (B*N, 3C): q | k | v, heads of HEAD_DIM columns
# ------------------------------------------------------------------------------------------------
@triton.jit
def attention_kernel(qkv_ptr, o_ptr, N, C, HEADS, HEAD_DIM, scale,
                     HDP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """HDP: head_dim padded to a power of two >= 16 (tl.dot's minimum); FastViTHD's 32 needs none."""
    pm = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HEADS).to(tl.int64)
    h = bh % HEADS
    d = tl.arange(0, HDP)
    dmask = d < HEAD_DIM
    qi = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    qmask = qi < N
    stride = 3 * C
    base = qkv_ptr + b * N * stride + h * HEAD_DIM
    q = tl.load(base + qi[:, None] * stride + d[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
    qk_scale = scale * 1.4426950408889634  # softmax in base 2
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HDP), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        kj = n0 + tl.arange(0, BLOCK_N)
        kmask = kj < N
        k = tl.load(base + C + kj[None, :] * stride + d[:, None], mask=kmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PREC) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(base + 2 * C + kj[:, None] * stride + d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + (b * N + qi[:, None]) * C + h * HEAD_DIM + d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=qmask[:, None] & dmask[None, :])


# ------------------------------------------------------------------------------------------------
# stem: conv3x3 s2 + GELU -> dw3x3 s2 + GELU -> 1x1 + GELU, one kernel
# ------------------------------------------------------------------------------------------------
@triton.jit
def stem_kernel(x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, H, W, H1, W1, Ho, Wo, C, M,
                CIN: tl.constexpr, CP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    wo = rows % Wo
    t = rows // Wo
    ho = t % Ho
    b = (t // Ho).to(tl.int64)
    c = tl.arange(0, CP)
    cmask = c < C
    b0 = tl.load(b0_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    d = tl.zeros((BLOCK_M, CP), dtype=tl.float32)
    for tap in range(9):  # the dw3x3 taps: a loop (unrolled 9 x 27 the kernel spilled registers)
        th = tap // 3
        tw = tap % 3
        if True:
            ih = ho * 2 - 1 + th
            iw = wo * 2 - 1 + tw
            valid = rmask & (ih >= 0) & (ih < H1) & (iw >= 0) & (iw < W1)
            u = tl.zeros((BLOCK_M, CP), dtype=tl.float32) + b0[None, :]
            for j in range(CIN * 9):  # the conv3x3 taps x input channels, a loop (kept small for ptxas)
                ci = j // 9
                kh = (j % 9) // 3
                kw = j % 3
                xh = ih * 2 - 1 + kh
                xw = iw * 2 - 1 + kw
                xm = valid & (xh >= 0) & (xh < H) & (xw >= 0) & (xw < W)
                xv = tl.load(x_ptr + ((b * H + xh) * W + xw) * CIN + ci, mask=xm, other=0.0).to(tl.float32)
                wv = tl.load(w0_ptr + c * (CIN * 9) + j, mask=cmask, other=0.0).to(tl.float32)
                u += xv[:, None] * wv[None, :]
            u = tl.where(valid[:, None], _gelu(u), 0.0)  # the dw conv's zero padding of the intermediate
            w1 = tl.load(w1_ptr + (th * 3 + tw) * C + c, mask=cmask, other=0.0).to(tl.float32)
            d += u * w1[None, :]
    d = _gelu(d + tl.load(b1_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :])
    d = tl.where(cmask[None, :], d, 0.0).to(y_ptr.dtype.element_ty)
    for n0 in range(0, CP, BLOCK_N):  # the 1x1 in column chunks: a (BLOCK_N x C) weight tile at a time
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < C
        w2 = tl.load(w2_ptr + nn[:, None] * C + c[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
        out = tl.dot(d, tl.trans(w2), input_precision=PREC)
        out = _gelu(out + tl.load(b2_ptr + nn, mask=nmask, other=0.0).to(tl.float32)[None, :])
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * C + nn[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


# ------------------------------------------------------------------------------------------------
# patch_embed: dw7x7 s2 (x2 channels) + GELU as the A prologue of the 1x1 GEMM, + bias + GELU
# ------------------------------------------------------------------------------------------------
@triton.jit
def patch_embed_kernel(x_ptr, dw_ptr, dwb_ptr, w_ptr, b_ptr, y_ptr, H, W, Cin, Ho, Wo, Cout, M,
                       K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PREC: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    wo = rows % Wo
    t = rows // Wo
    ho = t % Ho
    b = (t // Ho).to(tl.int64)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < Cout
    mult = Cout // Cin
    dt = y_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Cout, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < Cout
        ci = kc // mult
        a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for tap in range(K * K):  # a loop, not unrolled: unrolled taps spilled registers
            hi = ho * 2 - (K // 2) + tap // K
            wi = wo * 2 - (K // 2) + tap % K
            pmask = rmask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            xv = tl.load(x_ptr + ((b * H + hi) * W + wi)[:, None] * Cin + ci[None, :],
                         mask=pmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            wv = tl.load(dw_ptr + tap * Cout + kc, mask=kmask, other=0.0).to(tl.float32)
            a += xv * wv[None, :]
        a = _gelu(a + tl.load(dwb_ptr + kc, mask=kmask, other=0.0).to(tl.float32)[None, :])
        a = tl.where(kmask[None, :], a, 0.0).to(dt)
        w = tl.load(w_ptr + cols[:, None] * Cout + kc[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PREC)
    acc = _gelu(acc + tl.load(b_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :])
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * Cout + cols[None, :], acc.to(dt),
             mask=rmask[:, None] & nmask[None, :])


# ------------------------------------------------------------------------------------------------
# conv_exp's squeeze-excite: s = sigmoid(We relu(Wr mean + br) + be) from the dw kernel's partial sums,
# in two kernels spread over the reduced channels and then the output channels (not one program per
# image: at 1024² the SE is 3072 x 192 x 2 MACs per image, too much for one SM)
# ------------------------------------------------------------------------------------------------
@triton.jit
def se_reduce_kernel(sum_ptr, wr_ptr, br_ptr, red_ptr, P, C, RD, inv_hw,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """red[b, r] = relu(Wr[r] . mean[b] + br[r]) for a block of BLOCK_R reduced channels; each program
    sums the partial rows of every channel itself (P x C fp32 from L2), in a fixed order."""
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < RD
    red = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        tot = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)
            part = tl.load(sum_ptr + (b * P + pp)[:, None] * C + cc[None, :],
                           mask=(pp < P)[:, None] & cmask[None, :], other=0.0)
            tot += tl.sum(part, axis=0)
        mean = tot * inv_hw
        wr = tl.load(wr_ptr + r[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        red += tl.sum(wr.to(tl.float32) * mean[None, :], axis=1)
    red = tl.maximum(red + tl.load(br_ptr + r, mask=rmask, other=0.0).to(tl.float32), 0.0)
    tl.store(red_ptr + b * RD + r, red, mask=rmask)


@triton.jit
def se_expand_kernel(red_ptr, we_ptr, be_ptr, s_ptr, C, RD, RDP: tl.constexpr, BLOCK_C: tl.constexpr):
    """s[b, c] = sigmoid(We[c] . red[b] + be[c]) for a block of BLOCK_C output channels."""
    b = tl.program_id(0).to(tl.int64)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cc < C
    r = tl.arange(0, RDP)
    rmask = r < RD
    red = tl.load(red_ptr + b * RD + r, mask=rmask, other=0.0)
    we = tl.load(we_ptr + cc[:, None] * RD + r[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
    e = tl.sum(we.to(tl.float32) * red[None, :], axis=1) + tl.load(be_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    tl.store(s_ptr + b * C + cc, tl.sigmoid(e), mask=cmask)


@triton.jit
def scale_gelu_kernel(y_ptr, s_ptr, HWC, C, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < HWC
    y = tl.load(y_ptr + b * HWC + off, mask=m, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + b * C + off % C, mask=m, other=0.0)
    tl.store(y_ptr + b * HWC + off, _gelu(y * s).to(y_ptr.dtype.element_ty), mask=m)


def _cfg(num_warps, num_stages=2, **kw):
    return dict(kw, num_warps=num_warps, num_stages=num_stages)


#: The constexprs that set a kernel's order of summation (the K step of its GEMMs, attention's key
#: block, the SE's partial-sum blocks), the same in every configuration of :data:`CONFIGS`: which
#: configuration runs changes the speed, never the bits (tests/test_triton.py checks under the
#: interpreter). dw_kernel's per-tile SE sums depend on BLOCK_W, so conv_exp's launch (SUMS) always
#: takes the first configuration.
REDUCTION = {
    "linear_kernel": dict(BLOCK_K=32),
    "ffn_fused_kernel": dict(BLOCK_K=32, BLOCK_H=32),
    "attention_kernel": dict(BLOCK_N=32),
    "patch_embed_kernel": dict(BLOCK_K=32),
    "se_reduce_kernel": dict(BLOCK_C=64, BLOCK_P=16),
}

#: The tile configurations each kernel may run with, all compiled ahead of time for sm_90 and sm_80
#: (``aot.py``) and all giving the same bits (:data:`REDUCTION`). Which one runs for a shape is
#: ``tuning.py``'s table; the first entry is the default for a shape the table does not list.
CONFIGS = {
    "dw_kernel": [_cfg(4, BLOCK_W=8, BLOCK_C=64), _cfg(4, BLOCK_W=16, BLOCK_C=64), _cfg(8, BLOCK_W=16, BLOCK_C=128),
                  _cfg(4, BLOCK_W=32, BLOCK_C=32)],
    # C = 96 and 192 (BLOCK_O = 32, 64); the only tiles found spill-free at C = 192 on both sm_90 and sm_80
    "ffn_fused_kernel": [_cfg(8, 2, BLOCK_M=64), _cfg(8, 3, BLOCK_M=64), _cfg(4, 2, BLOCK_M=32)],
    "linear_kernel": [_cfg(4, 3, BLOCK_M=64, BLOCK_N=64, GROUP_M=8),
                      _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, GROUP_M=8),
                      _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, GROUP_M=8),
                      _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, GROUP_M=8),
                      _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, GROUP_M=8)],
    # BLOCK_N = 64 spilled in fp32 (IEEE dots) at every 4-warp tile and at (128, 8 warps) on sm_80
    "attention_kernel": [_cfg(4, 2, BLOCK_M=64), _cfg(4, 3, BLOCK_M=64), _cfg(8, 2, BLOCK_M=128)],
    "stem_kernel": [_cfg(8, 1, BLOCK_M=32, BLOCK_N=64), _cfg(8, 1, BLOCK_M=32, BLOCK_N=32),
                    _cfg(4, 1, BLOCK_M=16, BLOCK_N=64)],
    # (64, 128) spilled in fp32 with 4 warps on sm_80 and with 8 on sm_90
    "patch_embed_kernel": [_cfg(4, 2, BLOCK_M=32, BLOCK_N=64), _cfg(4, 2, BLOCK_M=32, BLOCK_N=128),
                           _cfg(8, 2, BLOCK_M=128, BLOCK_N=128), _cfg(8, 2, BLOCK_M=64, BLOCK_N=256)],
    "se_reduce_kernel": [_cfg(4, 1, BLOCK_R=16)],
    "se_expand_kernel": [_cfg(4, 1, BLOCK_C=64)],
    "scale_gelu_kernel": [_cfg(4, 1, BLOCK=1024)],
}
for _name, _fixed in REDUCTION.items():
    for _c in CONFIGS[_name]:
        _c.update(_fixed)

#: The Tritons the AOT check (``aot.py``) is run under: CI's, and 3.6, the Triton of the GPU machines
#: this project is lent. Their ptxas and register allocation differ: a tile can spill under one and
#: not the other.
AOT_TRITONS = ("3.6", "3.9")
_ALL = AOT_TRITONS

#: The tiles that spill registers, from the AOT check: {(table column, arch): {kernel: {index into
#: CONFIGS[kernel]: the Tritons it spilled under}}}. The table's column never runs them, and a shape
#: the table does not list skips them too (``tuning.usable``): a tile that spills under any of
#: AOT_TRITONS runs under none. The AOT test fails if a tile not listed spills, or if a listed one no
#: longer spills under a Triton it names (a stale entry).
SPILLS = {
    # tf32x3: each operand is split into a TF32 high and low part, so a dot's inputs take twice the
    # registers. (The last stem and ffn_fused configurations exist for tf32x3: every other one spills.)
    ("tf32x3", "sm_90"): {"stem_kernel": {0: _ALL, 1: _ALL}, "ffn_fused_kernel": {0: _ALL, 1: _ALL},
                          "patch_embed_kernel": {3: ("3.9",)}},
    ("tf32x3", "sm_80"): {"stem_kernel": {0: _ALL, 1: _ALL}, "ffn_fused_kernel": {0: _ALL},
                          "patch_embed_kernel": {2: _ALL, 3: ("3.9",)}, "linear_kernel": {4: _ALL}},
    # IEEE fp32, Triton 3.6: the (128, 128) tile with the GELU epilogue takes 255 registers and 8 B of stack
    ("fp32", "sm_90"): {"linear_kernel": {4: ("3.6",)}},
    # 4-byte spills at 80 registers (ptxas -v), the 64-row tiles: 2 stages under 3.6, 3 stages under both
    ("fp16", "sm_80"): {"attention_kernel": {0: ("3.6",), 1: _ALL}},
    ("bf16", "sm_80"): {"attention_kernel": {0: ("3.6",), 1: _ALL}},
}


def spilling(kernel: str, arch: str, column: str) -> list:
    """The configurations of ``kernel`` that :data:`SPILLS` lists for that table column and arch."""
    return [CONFIGS[kernel][i] for i in SPILLS.get((column, arch), {}).get(kernel, {})]


KERNELS = {"dw_kernel": dw_kernel, "ffn_fused_kernel": ffn_fused_kernel, "linear_kernel": linear_kernel,
           "attention_kernel": attention_kernel, "stem_kernel": stem_kernel,
           "patch_embed_kernel": patch_embed_kernel, "se_reduce_kernel": se_reduce_kernel,
           "se_expand_kernel": se_expand_kernel, "scale_gelu_kernel": scale_gelu_kernel}
