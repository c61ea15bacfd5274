// cudasim: csrc/cuda/ops_conv.cu (the convolution ops' launchers) for CPU tensors (tu_ops.h).
#include "tu_ops.h"
// then the launchers, which read its macros
#include "../ops_conv.cu"
