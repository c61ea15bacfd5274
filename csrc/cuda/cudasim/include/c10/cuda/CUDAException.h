// cudasim stand-in for c10/cuda/CUDAException.h: C10_CUDA_CHECK on the simulated runtime.
#pragma once
#include <c10/util/Exception.h>

#include "../../../cudasim.h"

#define C10_CUDA_CHECK(EXPR)                                                     \
  do {                                                                           \
    const cudaError_t fr_sim_err_ = (EXPR);                                      \
    TORCH_CHECK(fr_sim_err_ == cudaSuccess, "CUDA error (cudasim): ",            \
                cudaGetErrorString(fr_sim_err_));                                \
  } while (0)
