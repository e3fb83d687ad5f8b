// Every fp32 kernel of one ISA, in dependency order. Include it inside a namespace, once per ISA,
// after defining FVK_VL and the vector types vf (VL floats) and vi (VL int32) and, optionally, the
// ISA hooks of vec.h; csrc/isa/*.cpp do (and scripts/avx2_kernels.h, for standalone checks). No
// include guard, on purpose. The bf16-pair kernels (bf16_pairs.h) and AMX (amx.h) come on top, in
// their ISAs' translation units.
//
// FVK_ENTRY marks the entry points that csrc/ops/ calls through csrc/dispatch.h (declared in
// csrc/kernel_api.h): empty, so they have external linkage, unless a translation unit that only
// needs them internally (the bf16-pair ISAs) defines it as `static`.
#ifndef FVK_ENTRY
#define FVK_ENTRY
#endif
#include "vec.h"
#include "gemm_f32.h"
#include "depthwise.h"
#include "convffn.h"
#include "repmixer.h"
#include "stem.h"
#include "patch_embed.h"
#include "conv_exp.h"
#include "peak.h"
#include "attention.h"
