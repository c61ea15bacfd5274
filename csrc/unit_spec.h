// A residual unit's training-step description, shared by the C++ units of the CUDA backend
// (csrc/cuda/unit.h) and the CPU backend (csrc/cpu/unit_cpu.h), and made from Python by
// unit_spec (csrc/py_call.h).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

namespace fastres {

struct UnitStage {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
  double eps;
  std::optional<double> momentum;  // None: cumulative average
};
struct UnitSpec {
  std::vector<UnitStage> stages;  // the main convolutions, then the downsample's
  int64_t n = 0;                  // main convolutions
  int shortcut = 0;               // 0 none, 1 identity, 2 a conv + BN downsample
  bool relu = true;               // the ReLU after the add
  // CUDA: the largest scratch (bytes) an earlier forward and backward used, the next call's
  // first allocation (api::Scratch::hint).
  mutable std::atomic<int64_t> fwd_scratch{0}, bwd_scratch{0};
};

}  // namespace fastres
