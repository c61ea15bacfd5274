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

#include "block.h"
#include "unit.h"

namespace fastres {
namespace cuda {
namespace py_block {

inline const char* kSpecName = "fastres.BlockSpec";

inline void free_spec(PyObject* capsule) {
  delete static_cast<BlockSpec*>(PyCapsule_GetPointer(capsule, kSpecName));
}

inline bool read_ints(PyObject* tup, Py_ssize_t i, int64_t* out) {
  PyObject* v = PyTuple_GET_ITEM(tup, i);
  *out = PyLong_AsLongLong(v);
  return !(*out == -1 && PyErr_Occurred());
}

// One convolution's (sh, sw, ph, pw, dh, dw, groups, eps, ...) tuple of `size` entries into a
// BlockConv or UnitStage (the same geometry fields); false (a Python error set) otherwise.
template <typename Conv>
inline bool read_geometry(PyObject* c, Py_ssize_t size, const char* layout, Conv& out) {
  if (!PyTuple_Check(c) || PyTuple_GET_SIZE(c) != size) {
    PyErr_Format(PyExc_TypeError, "fastres: each convolution is %s", layout);
    return false;
  }
  int64_t v[7];
  for (Py_ssize_t k = 0; k < 7; ++k)
    if (!read_ints(c, k, &v[k])) return false;
  out.stride = {v[0], v[1]};
  out.padding = {v[2], v[3]};
  out.dilation = {v[4], v[5]};
  out.groups = v[6];
  out.eps = PyFloat_AsDouble(PyTuple_GET_ITEM(c, 7));
  return !(out.eps == -1.0 && PyErr_Occurred());
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

// A tuple of tensors and Nones as the launchers take it; false (a Python error set) otherwise.
inline bool read_tensors(PyObject* ts, std::vector<std::optional<at::Tensor>>& t) {
  t.reserve(PyTuple_GET_SIZE(ts));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ts); ++i) {
    PyObject* v = PyTuple_GET_ITEM(ts, i);
    if (v == Py_None) {
      t.emplace_back(std::nullopt);
    } else if (THPVariable_Check(v)) {
      t.emplace_back(THPVariable_Unpack(v));
    } else {
      PyErr_SetString(PyExc_TypeError, "fastres: expected a tuple of tensors or None");
      return false;
    }
  }
  return true;
}

// A tuple of the results (an undefined tensor is None).
inline PyObject* wrap_tensors(std::vector<at::Tensor>&& out) {
  PyObject* tup = PyTuple_New(static_cast<Py_ssize_t>(out.size()));
  if (tup == nullptr) return nullptr;
  for (size_t i = 0; i < out.size(); ++i)
    PyTuple_SET_ITEM(tup, static_cast<Py_ssize_t>(i), THPVariable_Wrap(std::move(out[i])));
  return tup;
}

// fn() without the GIL (the launchers do not touch Python) and without autograd recording
// (what a backward needs is recorded by grad_node, csrc/grad_node.h; the unit's gradients are
// not differentiable), its C++ errors as Python's.
template <typename Fn>
inline bool run_released(Fn&& fn) {
  try {
    PyThreadState* save = PyEval_SaveThread();
    try {
      c10::AutoGradMode no_grad(false);
      fn();
    } catch (...) {
      PyEval_RestoreThread(save);
      throw;
    }
    PyEval_RestoreThread(save);
    return true;
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return false;
}

// The operands every entry takes: a spec capsule of `spec_name`, one tensor (`what`) and a tuple
// of tensors or Nones; false (a Python error set) when one is not what it should be.
template <typename Spec>
inline bool read_call(PyObject* cap, const char* spec_name, PyObject* tensor, const char* what,
                      PyObject* tup, Spec*& spec, at::Tensor& t,
                      std::vector<std::optional<at::Tensor>>& ts) {
  spec = static_cast<Spec*>(PyCapsule_GetPointer(cap, spec_name));
  if (spec == nullptr) return false;
  if (!THPVariable_Check(tensor)) {
    PyErr_Format(PyExc_TypeError, "fastres: %s must be a tensor", what);
    return false;
  }
  t = THPVariable_Unpack(tensor);
  return read_tensors(tup, ts);
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

// ---- the training unit (unit.h) ----
inline const char* kUnitSpecName = "fastres.UnitSpec";

inline void free_unit_spec(PyObject* capsule) {
  delete static_cast<UnitSpec*>(PyCapsule_GetPointer(capsule, kUnitSpecName));
}

//   spec = unit_spec(n, shortcut, relu, ((sh, sw, ph, pw, dh, dw, groups, eps, momentum), ...))
// shortcut: 0 none, 1 identity, 2 downsample (its stage last); momentum None: cumulative.
inline PyObject* unit_spec(PyObject*, PyObject* args) {
  long long n = 0;
  int shortcut = 0, relu = 1;
  PyObject* stages = nullptr;
  if (!PyArg_ParseTuple(args, "LipO!", &n, &shortcut, &relu, &PyTuple_Type, &stages))
    return nullptr;
  auto spec = std::make_unique<UnitSpec>();
  spec->n = n;
  spec->shortcut = shortcut;
  spec->relu = relu != 0;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(stages); ++i) {
    PyObject* c = PyTuple_GET_ITEM(stages, i);
    UnitStage st{};
    if (!read_geometry(c, 9, "(sh, sw, ph, pw, dh, dw, groups, eps, momentum)", st))
      return nullptr;
    PyObject* m = PyTuple_GET_ITEM(c, 8);
    if (m != Py_None) {
      const double mom = PyFloat_AsDouble(m);
      if (mom == -1.0 && PyErr_Occurred()) return nullptr;
      st.momentum = mom;
    }
    spec->stages.push_back(st);
  }
  PyObject* cap = PyCapsule_New(spec.get(), kUnitSpecName, free_unit_spec);
  if (cap != nullptr) spec.release();
  return cap;
}

inline PyObject* unit_forward_py(PyObject*, PyObject* args) {
  PyObject *cap = nullptr, *x = nullptr, *ps = nullptr;
  if (!PyArg_ParseTuple(args, "OOO!", &cap, &x, &PyTuple_Type, &ps)) return nullptr;
  UnitSpec* spec = nullptr;
  at::Tensor xt;
  std::vector<std::optional<at::Tensor>> p;
  if (!read_call(cap, kUnitSpecName, x, "unit_forward's x", ps, spec, xt, p)) return nullptr;
  std::vector<at::Tensor> out;
  if (!run_released([&] { out = unit_forward(*spec, xt, p); })) return nullptr;
  return wrap_tensors(std::move(out));
}

inline PyObject* unit_backward_py(PyObject*, PyObject* args) {
  PyObject *cap = nullptr, *g = nullptr, *ss = nullptr;
  int need_x = 0;
  if (!PyArg_ParseTuple(args, "OOO!p", &cap, &g, &PyTuple_Type, &ss, &need_x)) return nullptr;
  UnitSpec* spec = nullptr;
  at::Tensor gt;
  std::vector<std::optional<at::Tensor>> saved;
  if (!read_call(cap, kUnitSpecName, g, "unit_backward's grad_out", ss, spec, gt, saved))
    return nullptr;
  std::vector<at::Tensor> out;
  if (!run_released([&] { out = unit_backward(*spec, gt, saved, need_x != 0); })) return nullptr;
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
  {"unit_spec", fastres::cuda::py_block::unit_spec, METH_VARARGS,                          \
   "unit_spec(n, shortcut, relu, stages) -> spec for unit_forward/unit_backward"},         \
  {"unit_forward", fastres::cuda::py_block::unit_forward_py, METH_VARARGS,                 \
   "unit_forward(spec, x, params) -> (out, yd, *ys, *stats, *dstats) (csrc/cuda/unit.h)"}, \
  {                                                                                        \
    "unit_backward", fastres::cuda::py_block::unit_backward_py, METH_VARARGS,              \
        "unit_backward(spec, grad_out, saved, need_x) -> (dx, per stage dw, dgamma, dbeta)" \
  }

}  // namespace py_block
}  // namespace cuda
}  // namespace fastres
