// Implicit-GEMM convolution instantiations for float32: TF32 tensor cores (when
// at::globalContext().allowTF32CuDNN(), as cuDNN would) or exact fp32 FMA on the SIMT cores.
// The kernel is in conv_igemm.cuh.
#include "conv_igemm.cuh"

namespace fastres {
namespace cuda {

cudaError_t launch_conv_f32(ConvParams& p, Math math, cudaStream_t stream) {
  if (math == Math::kTf32) return launch_conv_flags<float, Math::kTf32, CfgTcSmall>(p, stream);
  if (math == Math::kSimt) return launch_conv_flags<float, Math::kSimt, CfgSimt>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastres
