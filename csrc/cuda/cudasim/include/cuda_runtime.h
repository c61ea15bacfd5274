// cudasim stand-in for the CUDA toolkit header of this name (the cudasim build puts
// csrc/cuda/cudasim/include first on the include path).
#pragma once
#include "../cudasim.h"
