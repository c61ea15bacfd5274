// Included first by the AVX2 / AVX-512 translation units, before their `#pragma GCC target`:
// every header at::vec pulls in that is not itself ISA-specific. Their inline functions are thus
// compiled for the baseline ISA here as everywhere else, and an out-of-line copy the linker may
// pick for the whole library never carries AVX-512 instructions. Only at::vec itself (namespaced
// per ISA through CPU_CAPABILITY) and kernels_impl.h with its parts (internal linkage) see the
// wider target.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/bit_cast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>
#include <torch/headeronly/cpu/vec/intrinsics.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <ostream>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"
