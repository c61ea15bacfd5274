// Implicit-GEMM convolution instantiations for bf16 (16-bit tensor cores). The kernel is in
// conv_igemm.cuh; one file per dtype so the instantiations compile in parallel.
#include "conv_igemm.cuh"

namespace fastres {
namespace cuda {

cudaError_t launch_conv_bf16(ConvParams& p, Math math, cudaStream_t stream) {
  if (math != Math::kMma16) return cudaErrorInvalidValue;
  return launch_conv_mma16<__nv_bfloat16>(p, stream);
}

}  // namespace cuda
}  // namespace fastres
