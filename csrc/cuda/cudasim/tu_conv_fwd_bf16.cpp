// cudasim: csrc/cuda/conv_fwd_bf16.cu compiled by the host compiler.
#include "../conv_fwd_bf16.cu"
