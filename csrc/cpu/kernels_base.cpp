// The kernels of kernels_impl.h for the baseline instruction set of the compiler's target
// (x86-64: SSE2; aarch64: NEON, where at::vec has its own Vectorized specialisations).
#define CPU_CAPABILITY fastres_base
#define FASTRES_ISA base
#define FASTRES_ISA_NAME "base"
#include "kernels_impl.h"
