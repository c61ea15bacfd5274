// cudasim: csrc/cuda/conv_wgrad.cu compiled by the host compiler.
#include "../conv_wgrad.cu"
