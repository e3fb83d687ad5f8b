// Registration of the CPU kernels with the dispatcher, and the Python module that loads them.
#include <torch/library.h>
#include <Python.h>

#include <string>

#include <ATen/core/Tensor.h>

#include "ops.h"
#include "isa.h"

static std::string cpu_isa() { return fastvlm::isa_name(fastvlm::active_isa()); }

TORCH_LIBRARY(fastvlm_C, m) {
  m.def("dwconv_nhwc(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, bool gelu) -> Tensor");
  m.def("convffn_nhwc(Tensor x, Tensor dw_w, Tensor dw_b, Tensor fc1_wp, Tensor fc1_b, Tensor fc2_wp, Tensor fc2_b, "
        "Tensor gamma) -> Tensor");
  m.def("repmixer_nhwc(Tensor x, Tensor mix_w, Tensor mix_b, Tensor dw_w, Tensor dw_b, Tensor fc1_wp, Tensor fc1_b, "
        "Tensor fc2_wp, Tensor fc2_b, Tensor gamma) -> Tensor");
  m.def("pack_linear(Tensor w) -> Tensor");
  m.def("pack_linear_bf16(Tensor w) -> Tensor");
  m.def("stem_nhwc(Tensor x, Tensor w0, Tensor b0, Tensor w1, Tensor b1, Tensor w2p, Tensor b2) -> Tensor");
  m.def("patch_embed_nhwc(Tensor x, Tensor dw_w, Tensor dw_b, Tensor pw_p, Tensor pw_b, int stride) -> Tensor");
  m.def("attention_mixer_nhwc(Tensor x, Tensor ln_w, Tensor ln_b, Tensor qkv_wp, Tensor proj_wp, Tensor proj_b, "
        "Tensor gamma, int head_dim) -> Tensor");
  m.def("conv_exp_nhwc(Tensor x, Tensor w, Tensor b, Tensor se_r_w, Tensor se_r_b, Tensor se_e_w, Tensor se_e_b) "
        "-> Tensor");
  m.def("peak_gflops(bool bf16_dot=False, float seconds=0.2, int reps=3) -> float");
}

TORCH_LIBRARY_IMPL(fastvlm_C, CPU, m) {
  m.impl("dwconv_nhwc", &fastvlm::dwconv_nhwc);
  m.impl("convffn_nhwc", &fastvlm::convffn_nhwc);
  m.impl("repmixer_nhwc", &fastvlm::repmixer_nhwc);
  m.impl("pack_linear", &fastvlm::pack_linear);
  m.impl("pack_linear_bf16", &fastvlm::pack_linear_bf16);
  m.impl("stem_nhwc", &fastvlm::stem_nhwc);
  m.impl("patch_embed_nhwc", &fastvlm::patch_embed_nhwc);
  m.impl("attention_mixer_nhwc", &fastvlm::attention_mixer_nhwc);
  m.impl("conv_exp_nhwc", &fastvlm::conv_exp_nhwc);
}

// peak_gflops takes no tensor, so the dispatcher cannot pick a backend from its arguments: a
// CompositeExplicitAutograd kernel runs for any call.
TORCH_LIBRARY_IMPL(fastvlm_C, CompositeExplicitAutograd, m) { m.impl("peak_gflops", &fastvlm::peak_gflops); }

// `import fastvlm_kernels._C` loads this library, which runs the registrations above.
static PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cpu_isa().c_str()); }
static PyMethodDef fvk_methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The vector ISA the CPU kernels use now: amx_bf16, avx512_bf16, avx512, avx2 or sse."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef fvk_module = {PyModuleDef_HEAD_INIT, "_C", "fastvlm-kernels CPU kernels", -1, fvk_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fvk_module); }
