// cudasim: the CUDA backend's ATen launchers (csrc/cuda/ops_cuda.cu) registered for CPU tensors
// in torch.ops.fastres_cudasim (see tu_schema.cpp).
#define FR_DEVICE_IS(x) (x).is_cpu()
#define FR_DISPATCH_KEY CPU
#define FR_OPS_NAMESPACE fastres_cudasim
#include "../ops_cuda.cu"
