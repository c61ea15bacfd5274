// cudasim: csrc/cuda/unit.cu (the training unit from C++) for CPU tensors (tu_ops.h).
#include "tu_ops.h"
// then the unit, which reads its macros
#include "../unit.cu"
