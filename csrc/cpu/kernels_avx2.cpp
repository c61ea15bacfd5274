// The kernels of kernels_impl.h for AVX2 + FMA + F16C (256-bit at::vec), chosen at run time when
// ATen itself runs AVX2 kernels (kernels() in ops_cpu.cpp). GCC only: the ISA is switched on for
// this file with `#pragma GCC target` because setup.py compiles all sources with one set of flags.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)

#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c")
#define FASTRES_ISA_TARGET_PUSHED
// The target pragma does not define the ISA macros that -mavx2 would; sleef.h (included by
// at::vec) declares its 256-bit functions only under them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY fastres_avx2
#define CPU_CAPABILITY_AVX2
#define FASTRES_ISA avx2
#define FASTRES_ISA_NAME "avx2"
#include "kernels_impl.h"

#else

#include "kernels.h"
const fastres::cpu::Kernels* fastres::cpu::kernels_avx2() { return nullptr; }

#endif
