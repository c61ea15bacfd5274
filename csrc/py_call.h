// The Python entry points of the C++ block and unit calls, and the argument handling they share:
// plain Python C API over torch's THPVariable, so one call costs ~1 µs of argument handling (a
// torch.ops call parses its schema's arguments in Python: ~6 µs per convolution). Included by
// csrc/cuda/block_py.h (fastres._C with CUDA, fastres._C_cudasim) and csrc/module.cpp (the CPU
// unit); include it from one translation unit per module.
//
//   spec = unit_spec(n, shortcut, relu, ((sh, sw, ph, pw, dh, dw, groups, eps, momentum), ...))
//   (out, yd, *ys, *stats, *dstats) = unit_forward(spec, x, params)
//   (dx, *per-stage (dw, dgamma, dbeta)) = unit_backward(spec, grad_out, saved, need_x)
#pragma once

#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <optional>
#include <vector>

#include "unit_spec.h"

namespace fastres {
namespace py_call {

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

// ---- the training units (csrc/unit_spec.h; CUDA: csrc/cuda/unit.h, CPU: csrc/cpu/unit_cpu.h) ----
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

using UnitForward = std::vector<at::Tensor> (*)(const UnitSpec&, const at::Tensor&,
                                               const std::vector<std::optional<at::Tensor>>&);
using UnitBackward = std::vector<at::Tensor> (*)(const UnitSpec&, const at::Tensor&,
                                                const std::vector<std::optional<at::Tensor>>&,
                                                bool);

// (out, yd, *ys, *stats, *dstats) = unit_forward(spec, x, params): a backend's unit forward.
template <UnitForward unit_forward>
PyObject* unit_forward_py(PyObject*, PyObject* args) {
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

// (dx, per stage dw, dgamma, dbeta) = unit_backward(spec, grad_out, saved, need_x).
template <UnitBackward unit_backward>
PyObject* unit_backward_py(PyObject*, PyObject* args) {
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

}  // namespace py_call
}  // namespace fastres
