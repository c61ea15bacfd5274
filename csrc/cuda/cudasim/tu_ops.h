// cudasim: what the CUDA backend's ATen launchers (csrc/cuda/ops_conv.cu, ops_bn.cu, ops_bn_bwd.cu;
// included by tu_ops_conv.cpp, tu_ops_bn.cpp, tu_ops_bn_bwd.cpp) serve here: CPU tensors,
// registered in torch.ops.fastres_cudasim (see tu_schema.cpp). Included before the launcher
// file, whose ops_common.h keeps these.
#pragma once

#define FR_DEVICE_IS(x) (x).is_cpu()
#define FR_DISPATCH_KEY CPU
#define FR_OPS_NAMESPACE fastres_cudasim
