// The kernels' own AVX2 translation unit (csrc/isa/avx2.cpp: namespace fastvlm::isa_avx2, with its
// target pragma and ISA hooks), compiled into the standalone check programs of scripts/ (built with
// -Icsrc) and named `avx2` here. No torch: the kernels are torch-free.
#pragma once
#include "isa/avx2.cpp"

namespace avx2 = fastvlm::isa_avx2;
