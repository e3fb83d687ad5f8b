// What every ISA translation unit includes before it opens its namespace and target region: the
// standard headers the kernels use, the GELU coefficients (kernels/gelu.h, outside any namespace)
// and the packed-weight format (packed.h).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>  // std::true_type / false_type in the kernels

#include "kernels/gelu.h"
#include "packed.h"
