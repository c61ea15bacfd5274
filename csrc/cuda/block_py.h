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

inline PyObject* block_spec(PyObject*, PyObject* args) {
  long long n_main = 0;
  int has_ds = 0;
  PyObject* convs = nullptr;
  if (!PyArg_ParseTuple(args, "LpO!", &n_main, &has_ds, &PyTuple_Type, &convs)) return nullptr;
  auto spec = std::make_unique<BlockSpec>();
  spec->n_main = n_main;
  spec->has_ds = has_ds != 0;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(convs); ++i) {
    PyObject* c = PyTuple_GET_ITEM(convs, i);
    if (!PyTuple_Check(c) || PyTuple_GET_SIZE(c) != 8) {
      PyErr_SetString(PyExc_TypeError,
                      "block_spec: each convolution is (sh, sw, ph, pw, dh, dw, groups, eps)");
      return nullptr;
    }
    BlockConv b{};
    int64_t v[7];
    for (Py_ssize_t k = 0; k < 7; ++k)
      if (!read_ints(c, k, &v[k])) return nullptr;
    b.stride = {v[0], v[1]};
    b.padding = {v[2], v[3]};
    b.dilation = {v[4], v[5]};
    b.groups = v[6];
    b.eps = PyFloat_AsDouble(PyTuple_GET_ITEM(c, 7));
    if (b.eps == -1.0 && PyErr_Occurred()) return nullptr;
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
  auto* spec = static_cast<BlockSpec*>(PyCapsule_GetPointer(cap, kSpecName));
  if (spec == nullptr) return nullptr;
  if (!THPVariable_Check(x)) {
    PyErr_SetString(PyExc_TypeError, "block_eval: x must be a tensor");
    return nullptr;
  }
  std::vector<std::optional<at::Tensor>> t;
  t.reserve(PyTuple_GET_SIZE(ts));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ts); ++i) {
    PyObject* v = PyTuple_GET_ITEM(ts, i);
    if (v == Py_None) {
      t.emplace_back(std::nullopt);
    } else if (THPVariable_Check(v)) {
      t.emplace_back(THPVariable_Unpack(v));
    } else {
      PyErr_SetString(PyExc_TypeError, "block_eval: the block's tensors must be tensors or None");
      return nullptr;
    }
  }
  try {
    std::vector<at::Tensor> out;
    {
      // The launchers run without the GIL: another Python thread may go on meanwhile.
      PyThreadState* save = PyEval_SaveThread();
      try {
        out = block_eval(*spec, THPVariable_Unpack(x), t, keep != 0);
      } catch (...) {
        PyEval_RestoreThread(save);
        throw;
      }
      PyEval_RestoreThread(save);
    }
    if (!keep) return THPVariable_Wrap(std::move(out.back()));
    PyObject* tup = PyTuple_New(static_cast<Py_ssize_t>(out.size()));
    if (tup == nullptr) return nullptr;
    for (size_t i = 0; i < out.size(); ++i)
      PyTuple_SET_ITEM(tup, static_cast<Py_ssize_t>(i), THPVariable_Wrap(std::move(out[i])));
    return tup;
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// The two entries, for a module's PyMethodDef table.
#define FASTRES_BLOCK_METHODS                                                              \
  {"block_spec", fastres::cuda::py_block::block_spec, METH_VARARGS,                        \
   "block_spec(n_main, has_ds, convs) -> spec for block_eval (see csrc/cuda/block_py.h)"}, \
  {                                                                                        \
    "block_eval", fastres::cuda::py_block::block_eval_py, METH_VARARGS,                    \
        "block_eval(spec, x, tensors, keep=False) -> the block's eval output (no autograd); "  \
        "keep: (h_1, ..., output)"            \
  }

}  // namespace py_block
}  // namespace cuda
}  // namespace fastres
