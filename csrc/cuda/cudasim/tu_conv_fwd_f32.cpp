// cudasim: csrc/cuda/conv_fwd_f32.cu compiled by the host compiler.
#include "../conv_fwd_f32.cu"
