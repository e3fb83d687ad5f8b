// Registration of the CPU kernels with the dispatcher, and the Python module that loads them.
#include <torch/library.h>
#include <Python.h>

#include <string>

#include <ATen/core/Tensor.h>

namespace fastvlm {
at::Tensor dwconv_nhwc(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t stride, int64_t padding, bool gelu);
at::Tensor convffn_nhwc(const at::Tensor& x, const at::Tensor& dw_w, const at::Tensor& dw_b, const at::Tensor& fc1_w,
                        const at::Tensor& fc1_b, const at::Tensor& fc2_w, const at::Tensor& fc2_b,
                        const at::Tensor& gamma);
}
#include "isa.h"

static std::string cpu_isa() { return fastvlm::isa_name(fastvlm::active_isa()); }

TORCH_LIBRARY(fastvlm_C, m) {
  m.def("dwconv_nhwc(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, bool gelu) -> Tensor");
  m.def("convffn_nhwc(Tensor x, Tensor dw_w, Tensor dw_b, Tensor fc1_w, Tensor fc1_b, Tensor fc2_w, Tensor fc2_b, "
        "Tensor gamma) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvlm_C, CPU, m) {
  m.impl("dwconv_nhwc", &fastvlm::dwconv_nhwc);
  m.impl("convffn_nhwc", &fastvlm::convffn_nhwc);
}

// `import fastvlm_kernels._C` loads this library, which runs the registrations above.
static PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cpu_isa().c_str()); }
static PyMethodDef fvk_methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The vector ISA the CPU kernels use now: avx512, avx2 or sse."},
    {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef fvk_module = {PyModuleDef_HEAD_INIT, "_C", "fastvlm-kernels CPU kernels", -1, fvk_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fvk_module); }
