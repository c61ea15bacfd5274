// cudasim: csrc/cuda/bn.cu compiled by the host compiler.
#include "../bn.cu"
