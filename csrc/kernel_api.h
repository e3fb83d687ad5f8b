// The entry points of the kernels of one ISA, as csrc/ops/ calls them: declarations, included inside
// a namespace once per ISA by csrc/dispatch.h (and by csrc/isa/*.cpp after their definitions, so that
// a mismatch fails to compile or link). No include guard, on purpose. Each *_tiles / *_rows function
// computes the work items [begin, end) of its op with `scratch` floats of per-thread scratch; the
// ops split the items over threads (dispatch.h's parallel_tiles). The definitions are in
// csrc/kernels/ (named there), compiled in csrc/isa/<isa>.cpp.
//
// FVK_API_F32: every fp32-kernel ISA (avx512, avx2, sse); FVK_API_BF16_PAIRS: the bf16-pair ISAs
// (avx512_bf16, amx); FVK_API_AMX: amx only.

#ifdef FVK_API_F32
// convffn.h
int64_t ffn_scratch(int64_t T, int64_t C, int64_t Hd);
void ffn_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
               const float* dw_w, const float* dw_b, const float* w1p, const float* b1, const float* w2p,
               const float* b2, const float* gamma, int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end,
               float* scratch);
// repmixer.h
int64_t mix_scratch(int64_t th, int64_t tw, int64_t C, int64_t Hd, int64_t Kk);
void mix_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Km,
               const float* mix_w, const float* mix_b, int64_t Kk, const float* dw_w, const float* dw_b,
               const float* w1p, const float* b1, const float* w2p, const float* b2, const float* gamma, int64_t gh,
               int64_t gw, int64_t th, int64_t tw, int64_t t_begin, int64_t t_end, float* scratch);
// depthwise.h
int64_t dwb_band(int64_t H);
int64_t dwb_scratch(int64_t H, int64_t Wd);
extern const int64_t dwb_channels;  // channels per packed block
void dwb_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, const float* w, const float* b,
               bool gelu, int64_t t_begin, int64_t t_end, float* scratch);
void dw_same_rows(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t C, int64_t Kk, const float* w,
                  const float* b, bool gelu, int64_t r_begin, int64_t r_end, float* scratch);
void dw_general_rows(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t K,
                     int64_t stride, int64_t pad, int64_t Ho, int64_t Wo, const float* w, const float* b, bool gelu,
                     int64_t r_begin, int64_t r_end, float* acc);
// conv_exp.h
void convexp_rows(const void* x, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk, const float* w,
                  const float* b, float* z, float* rowsums, int64_t r_begin, int64_t r_end, float* scratch);
void gemv_rows(const float* W, const float* v, const float* bias, int64_t n, int act, float* y, int64_t i_begin,
               int64_t i_end, float* scratch);
void scale_gelu_rows(const float* z, const float* sc, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Co,
                     int64_t r_begin, int64_t r_end, float* scratch);
// stem.h
int64_t stem_scratch(int64_t SW, int64_t Cin, int64_t Cp);
void stem_tiles(const void* x, const int64_t* xs, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t C,
                int64_t Cp, const float* w0p, const float* b0, const float* w1, const float* b1, const float* w2p,
                const float* b2, int64_t RB, int64_t SW, int64_t t_begin, int64_t t_end, float* scratch);
// patch_embed.h
bool dwm_slides(int64_t Kk, int64_t s, int64_t Cin, int64_t Co);
void dwpw_tiles(const void* x, void* y, bool bf16, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk,
                int64_t s, const float* dw_w, const float* dw_b, const float* w2, const float* b2, const float* pw_p,
                const float* pw_b, int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end, float* scratch);
// attention.h
void qkv_tiles(const void* x, bool bf16, int64_t N, int64_t C, int64_t hd, const float* ln_w, const float* ln_b,
               const float* wqkv_p, const float* zeros, float scale, float* Qt, float* Kb, float* Vt, int64_t Np,
               int64_t ldq, int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end, float* scratch);
void attn_tiles(int64_t N, int64_t C, int64_t hd, const float* Qt, const float* Kb, const float* Vt, int64_t Np,
                const float* zeros, int64_t Tq, int64_t BK, float* O, int64_t t_begin, int64_t t_end, float* scratch);
void proj_tiles(const void* x, void* y, bool bf16, int64_t N, int64_t C, const float* O, const float* wp_p,
                const float* bp, const float* gamma, int64_t Cp, int64_t per_image, int64_t T, int64_t t_begin,
                int64_t t_end, float* scratch);
// peak.h: `iters` rounds of independent FMA chains; chain_flops flops per round
float fma_chains(int64_t iters, float seed);
extern const int chain_flops;
#endif  // FVK_API_F32

#ifdef FVK_API_BF16_PAIRS
// bf16_pairs.h: the bf16 ops whose GEMMs multiply bf16 pairs (weights from pack_linear_bf16)
int64_t ffn_dp_scratch(int64_t T, int64_t C, int64_t Hd);
void ffn_dp_tiles(const uint16_t* x, uint16_t* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Kk,
                  const float* dw_w, const float* dw_b, const uint16_t* w1p, const float* b1, const uint16_t* w2p,
                  const float* b2, const float* gamma, int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end,
                  float* scratch);
int64_t mix_dp_scratch(int64_t th, int64_t tw, int64_t C, int64_t Hd, int64_t Kk);
void mix_dp_tiles(const uint16_t* x, uint16_t* y, int64_t H, int64_t Wd, int64_t C, int64_t Hd, int64_t Km,
                  const float* mix_w, const float* mix_b, int64_t Kk, const float* dw_w, const float* dw_b,
                  const uint16_t* w1p, const float* b1, const uint16_t* w2p, const float* b2, const float* gamma,
                  int64_t gh, int64_t gw, int64_t th, int64_t tw, int64_t t_begin, int64_t t_end, float* scratch);
int64_t dwpw_dp_scratch(int64_t T, int64_t Co, int64_t Cop);
void dwpw_dp_tiles(const uint16_t* x, uint16_t* y, int64_t H, int64_t Wd, int64_t Cin, int64_t Co, int64_t Kk,
                   int64_t s, const float* dw_w, const float* dw_b, const float* w2, const float* b2,
                   const uint16_t* pw_p, const float* pw_b, int64_t per_image, int64_t T, int64_t t_begin,
                   int64_t t_end, float* scratch);
int64_t attn_hp(int64_t hd);
int64_t qkv_dp_scratch(int64_t T, int64_t C, int64_t ldq);
void qkv_dp_tiles(const uint16_t* x, int64_t N, int64_t C, int64_t hd, const float* ln_w, const float* ln_b,
                  const uint16_t* wq, const float* zeros, float scale, uint16_t* Qp, uint16_t* Kh, uint16_t* Vh,
                  int64_t Np, int64_t ldq, int64_t per_image, int64_t T, int64_t t_begin, int64_t t_end,
                  float* scratch);
int64_t attn_dp_scratch(int64_t Tq, int64_t BK, int64_t hd);
void attn_dp_tiles(int64_t N, int64_t C, int64_t hd, const uint16_t* Qp, const uint16_t* Kh, const uint16_t* Vh,
                   int64_t Np, const float* zeros, int64_t Tq, int64_t BK, float* O, int64_t t_begin, int64_t t_end,
                   float* scratch);
int64_t proj_dp_scratch(int64_t T, int64_t C, int64_t Cp);
void proj_dp_tiles(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, const float* O, const uint16_t* wp,
                   const float* bp, const float* gamma, int64_t Cp, int64_t per_image, int64_t T, int64_t t_begin,
                   int64_t t_end, float* scratch);
// vdpbf16ps chains (peak_gflops with bf16_dot)
float dp_chains(int64_t iters, float seed);
extern const int dp_chain_flops;
#endif  // FVK_API_BF16_PAIRS

#ifdef FVK_API_AMX
// amx.h: TDPBF16PS tile chains (peak_gflops with bf16_dot on amx_bf16)
float amx_chains(int64_t iters, float seed);
extern const int amx_chain_flops;
#endif  // FVK_API_AMX
