// The fp32 kernels of one ISA (avx512.cpp, avx2.cpp, sse.cpp include this inside their namespace,
// after defining the ISA's vector types vf / vi, FVK_VL and the min / max builtins): the kernel
// bodies, the constants the ops read, and the FVK_API_F32 declarations, which must match them.
// No include guard, on purpose.
#include "kernels/kernels.h"
extern const int64_t dwb_channels = DB;
extern const int chain_flops = CHAIN_FLOPS;
#define FVK_API_F32
#include "kernel_api.h"
