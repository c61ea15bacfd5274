// cudasim: csrc/cuda/bn_bwd.cu compiled by the host compiler.
#include "../bn_bwd.cu"
