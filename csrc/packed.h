// The packed-weight format of the cpu backend: its one owner in C++. Torch-free, so the kernels
// (csrc/kernels/, which read the panels) and the ops (csrc/ops/, which pack and check them) share it.
// Its Python mirror is fastvlm_kernels/cpu.py's PackedFormat, checked against this one by the tests.
//
// The 1x1 convs and linears run as GEMMs on weights packed once, at accelerate() time, into panels
// of kPanel output channels:
//  - float32 (pack_linear): an (N, K) weight as (panels(N), K, kPanel); out[p][k][i] = w[kPanel p + i][k];
//  - bf16 pairs (pack_linear_bf16, for the vdpbf16ps / AMX GEMMs): (panels(N), pair_rows(K), 2 kPanel)
//    bfloat16; out[p][j][2i + e] = w[kPanel p + i][2j + e].
// Both are zero where kPanel p + i >= N (and, for pairs, where 2j + e = K for an odd K). The panel
// count is even, so a 32-channel AVX-512 micro-tile never reads past the last panel. The layout is
// the same for every ISA.
#pragma once
#include <cstdint>

namespace fastvlm {
namespace packed {

constexpr int64_t kPanel = 16;  // output channels per panel

// Panels for n output channels, rounded up to an even count.
constexpr int64_t panels(int64_t n) { return (n + 2 * kPanel - 1) / (2 * kPanel) * 2; }

// n rounded up to whole pairs of panels: the padded width of biases, gamma and the GEMMs' output
// rows, enough for the widest micro-tile of every ISA.
constexpr int64_t padded_width(int64_t n) { return panels(n) * kPanel; }

// Rows of a bf16-pair panel: K in pairs.
constexpr int64_t pair_rows(int64_t k) { return (k + 1) / 2; }

}  // namespace packed
}  // namespace fastvlm
