// The Python side of block_eval (block.h), shared by fastres._C (CUDA tensors) and
// fastres._C_cudasim (CPU tensors, the same launchers): plain Python C API over torch's
// THPVariable, so one call costs ~1 µs of argument handling (a torch.ops call parses its schema's
// arguments in Python: ~6 µs per convolution). Include in exactly one translation unit per module.
//
//   spec = block_spec(n_main, has_ds, ((sh, sw, ph, pw, dh, dw, groups, eps), ...))
//   y = block_eval(spec, x, (w, bn_bias, bn_weight, running_mean, running_var, ...))
//   (h_1, ..., y) = block_eval(spec, x, tensors, True)   # and the outputs a backward needs
//
// block_eval bypasses the dispatcher: its callers (fastres/nn/eval_plan.py, and the autograd
// Function of fastres/_autograd.py that records the block for a backward) use it only under no
// dispatch mode, on plain tensors.
#pragma once

#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <optional>
#include <vector>

#include "../py_call.h"
#include "block.h"
#include "unit.h"

namespace fastres {
namespace cuda {
namespace py_block {

using namespace fastres::py_call;  // NOLINT: the argument helpers

inline const char* kSpecName = "fastres.BlockSpec";

inline void free_spec(PyObject* capsule) {
  delete static_cast<BlockSpec*>(PyCapsule_GetPointer(capsule, kSpecName));
}

inline PyObject* block_spec(PyObject*, PyObject* args) {
  long long n_main = 0;
  int has_ds = 0;
  PyObject* convs = nullptr;
  if (!PyArg_ParseTuple(args, "LpO!", &n_main, &has_ds, &PyTuple_Type, &convs)) return nullptr;
  auto spec = std::make_unique<BlockSpec>();
  spec->n_main = n_main;
  spec->has_ds = has_ds != 0;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(convs); ++i) {
    BlockConv b{};
    if (!read_geometry(PyTuple_GET_ITEM(convs, i), 8, "(sh, sw, ph, pw, dh, dw, groups, eps)",
                       b))
      return nullptr;
    spec->convs.push_back(b);
  }
  PyObject* cap = PyCapsule_New(spec.get(), kSpecName, free_spec);
  if (cap != nullptr) spec.release();
  return cap;
}

inline PyObject* block_eval_py(PyObject*, PyObject* args) {
  PyObject *cap = nullptr, *x = nullptr, *ts = nullptr;
  int keep = 0;
  if (!PyArg_ParseTuple(args, "OOO!|p", &cap, &x, &PyTuple_Type, &ts, &keep)) return nullptr;
  BlockSpec* spec = nullptr;
  at::Tensor xt;
  std::vector<std::optional<at::Tensor>> t;
  if (!read_call(cap, kSpecName, x, "block_eval's x", ts, spec, xt, t)) return nullptr;
  std::vector<at::Tensor> out;
  if (!run_released([&] { out = block_eval(*spec, xt, t, keep != 0); })) return nullptr;
  if (!keep) return THPVariable_Wrap(std::move(out.back()));
  return wrap_tensors(std::move(out));
}

// The entries, for a module's PyMethodDef table.
#define FASTRES_BLOCK_METHODS                                                              \
  {"block_spec", fastres::cuda::py_block::block_spec, METH_VARARGS,                        \
   "block_spec(n_main, has_ds, convs) -> spec for block_eval (see csrc/cuda/block_py.h)"}, \
  {                                                                                        \
    "block_eval", fastres::cuda::py_block::block_eval_py, METH_VARARGS,                    \
        "block_eval(spec, x, tensors, keep=False) -> the block's eval output (no autograd); "  \
        "keep: (h_1, ..., output)"},                                                   \
  {"unit_spec", fastres::py_call::unit_spec, METH_VARARGS,                                 \
   "unit_spec(n, shortcut, relu, stages) -> spec for unit_forward/unit_backward"},         \
  {"unit_forward", fastres::py_call::unit_forward_py<fastres::cuda::unit_forward>,        \
   METH_VARARGS,                                                                           \
   "unit_forward(spec, x, params) -> (out, yd, *ys, *stats, *dstats) (csrc/cuda/unit.h)"}, \
  {                                                                                        \
    "unit_backward", fastres::py_call::unit_backward_py<fastres::cuda::unit_backward>,     \
        METH_VARARGS,                                                                      \
        "unit_backward(spec, grad_out, saved, need_x) -> (dx, per stage dw, dgamma, dbeta)" \
  }

}  // namespace py_block
}  // namespace cuda
}  // namespace fastres
