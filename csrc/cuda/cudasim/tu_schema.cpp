// cudasim: the op schemas of csrc/ops.cpp in the namespace fastres_cudasim
// (torch.ops.fastres_cudasim), so that the CUDA launchers can be registered for CPU tensors next to the CPU backend's kernels.
#define FR_OPS_NAMESPACE fastres_cudasim
#include "../../ops.cpp"
