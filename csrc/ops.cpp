// Registration of the CPU kernels with the dispatcher, and the Python module that loads them.
#include <torch/library.h>
#include <Python.h>

#include <ATen/core/Tensor.h>

namespace fastvlm {
at::Tensor dwconv_nhwc(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t stride, int64_t padding, bool gelu);
}

TORCH_LIBRARY(fastvlm_C, m) {
  m.def("dwconv_nhwc(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, bool gelu) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvlm_C, CPU, m) { m.impl("dwconv_nhwc", &fastvlm::dwconv_nhwc); }

// `import fastvlm_kernels._C` loads this library, which runs the registrations above.
static struct PyModuleDef fvk_module = {PyModuleDef_HEAD_INIT, "_C", "fastvlm-kernels CPU kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fvk_module); }
