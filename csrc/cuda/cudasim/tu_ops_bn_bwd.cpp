// cudasim: csrc/cuda/ops_bn_bwd.cu (the BatchNorm backward ops' launchers) for CPU tensors
// (tu_ops.h).
#include "tu_ops.h"
// then the launchers, which read its macros
#include "../ops_bn_bwd.cu"
