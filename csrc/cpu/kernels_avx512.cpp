// The kernels of kernels_impl.h for AVX-512 F/BW/VL/DQ (512-bit at::vec), chosen at run time when
// ATen itself runs AVX-512 kernels (kernels() in ops_cpu.cpp). GCC only: the ISA is switched on
// for this file with `#pragma GCC target` because setup.py compiles all sources with one set of
// flags.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)

#include "isa_prelude.h"

#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define FASTRES_ISA_TARGET_PUSHED
// The target pragma does not define the ISA macros that -mavx512f would; sleef.h (included by
// at::vec) declares its 512-bit functions only under them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY fastres_avx512
#define CPU_CAPABILITY_AVX512
#define FASTRES_ISA avx512
#define FASTRES_ISA_NAME "avx512"
#include "kernels_impl.h"

#else

#include "kernels.h"
const fastres::cpu::Kernels* fastres::cpu::kernels_avx512() { return nullptr; }

#endif
