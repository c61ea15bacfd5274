// One eval call of a residual block, its convolutions launched from C++: the eager no-autograd
// path of fastres/nn/eval_plan.py. A block call from Python is then one call into this module
// (~1 µs of argument handling) instead of one torch.ops call per convolution (~6 µs each of
// Python argument parsing and dispatch around ~2 µs of launcher, measured on the CPU proxy).
// Defined in ops_conv.cu (beside the launcher it calls), bound to Python by block_py.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <vector>

namespace fastres {
namespace cuda {

// What a block's plan fixes: per convolution (the main path in order, then the downsample's)
// its stride, padding, dilation, groups and BatchNorm eps.
struct BlockConv {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
  double eps;
};
struct BlockSpec {
  std::vector<BlockConv> convs;
  int64_t n_main = 0;   // convolutions on the main path (the last adds the shortcut)
  bool has_ds = false;  // a conv + BN downsample after them; else the identity shortcut
};

// relu(conv_n(... relu(conv_1(x)) ...) + shortcut(x)), each convolution with its BatchNorm
// (eval: running statistics) in the epilogue. `t`: five tensors per convolution, in spec order:
// conv weight, BN bias, BN weight, running mean, running var (BN weight/bias may be absent).
// keep: also every convolution's output before the last (main path in order, then the
// downsample's), what a backward needs: {h_1, ..., (downsample), out}; else {out}.
std::vector<at::Tensor> block_eval(const BlockSpec& spec, const at::Tensor& x,
                                   const std::vector<std::optional<at::Tensor>>& t,
                                   bool keep = false);

}  // namespace cuda
}  // namespace fastres
