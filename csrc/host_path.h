// Small checks of the eager host path, in C: one call over a tuple of tensors where Python pays
// an attribute read per tensor (a training plan's 18-24 tensors: ~4 µs in Python on the 2-CPU
// AMD EPYC, loaded; ~0.5 µs here).
//
//   tensor_sig(tensors) -> bytes: per entry its dtype and device (type, index), None marked
//   tensor_ptrs(tensors) -> bytes | None: every data pointer, packed; None when one is absent
//   tensor_key(tensor) -> bytes: dtype, device, sizes, strides and the data pointer mod 16
//
// tensor_sig: fastres/nn/train_plan.py, a plan holds while its tensors keep the dtypes and devices
// they had (.to() changes a Parameter in place). tensor_ptrs: the Triton launch plans
// (triton_kernels/block.py, unit.py), whose layouts are re-checked only when a pointer moved (a
// block's 15-20 tensors: 1.7 µs through Tensor.data_ptr in Python, ~0.2 µs here). tensor_key: a
// plan's input check in one call (the same five reads from Python: ~1.2 µs;
// fastres/nn/eval_fast.py, triton_kernels/block.py). Include in exactly one translation unit.
#pragma once

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace fastres {
namespace host_path {

inline PyObject* tensor_sig_py(PyObject*, PyObject* tup) {
  if (!PyTuple_Check(tup)) {
    PyErr_SetString(PyExc_TypeError, "fastres tensor_sig: expected a tuple of tensors or None");
    return nullptr;
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(tup);
  std::string sig;
  sig.reserve(static_cast<size_t>(3 * n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PyTuple_GET_ITEM(tup, i);
    if (v == Py_None) {
      sig.append(3, '\xff');
    } else if (THPVariable_Check(v)) {
      const at::Tensor& t = THPVariable_Unpack(v);
      const c10::Device d = t.device();
      sig.push_back(static_cast<char>(t.scalar_type()));
      sig.push_back(static_cast<char>(d.type()));
      sig.push_back(static_cast<char>(d.index()));
    } else {
      PyErr_SetString(PyExc_TypeError, "fastres tensor_sig: expected a tuple of tensors or None");
      return nullptr;
    }
  }
  return PyBytes_FromStringAndSize(sig.data(), static_cast<Py_ssize_t>(sig.size()));
}

inline PyObject* tensor_ptrs_py(PyObject*, PyObject* seq) {
  HANDLE_TH_ERRORS
  PyObject* fast = PySequence_Fast(seq, "fastres tensor_ptrs: expected a sequence of tensors");
  if (fast == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  std::string out(static_cast<size_t>(n) * sizeof(std::uintptr_t), '\0');
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PySequence_Fast_GET_ITEM(fast, i);
    if (!THPVariable_Check(v)) {
      Py_DECREF(fast);
      if (v == Py_None) Py_RETURN_NONE;
      PyErr_SetString(PyExc_TypeError, "fastres tensor_ptrs: expected a sequence of tensors");
      return nullptr;
    }
    std::uintptr_t p = 0;
    try {  // a tensor without storage (a subclass) raises as Tensor.data_ptr does
      p = reinterpret_cast<std::uintptr_t>(THPVariable_Unpack(v).data_ptr());
    } catch (...) {
      Py_DECREF(fast);
      throw;
    }
    std::memcpy(&out[static_cast<size_t>(i) * sizeof p], &p, sizeof p);
  }
  Py_DECREF(fast);
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
  END_HANDLE_TH_ERRORS
}

inline PyObject* tensor_key_py(PyObject*, PyObject* v) {
  HANDLE_TH_ERRORS
  if (!THPVariable_Check(v)) {
    PyErr_SetString(PyExc_TypeError, "fastres tensor_key: expected a tensor");
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(v);
  // Not a plain strided tensor with storage (sparse, mkldnn, a wrapper without storage): a key
  // no strided tensor has, so that a plan made for one never matches it.
  if (t.layout() != c10::kStrided || !t.has_storage()) return PyBytes_FromString("");
  const c10::Device d = t.device();
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  std::string key;
  key.reserve(4 + 16 * sizes.size() + 8);
  key.push_back(static_cast<char>(t.scalar_type()));
  key.push_back(static_cast<char>(d.type()));
  key.push_back(static_cast<char>(d.index()));
  key.push_back(static_cast<char>(sizes.size()));
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t pair[2] = {sizes[i], strides[i]};
    key.append(reinterpret_cast<const char*>(pair), sizeof pair);
  }
  key.push_back(static_cast<char>(reinterpret_cast<std::uintptr_t>(t.data_ptr()) & 15));
  return PyBytes_FromStringAndSize(key.data(), static_cast<Py_ssize_t>(key.size()));
  END_HANDLE_TH_ERRORS
}

#define FASTRES_HOST_PATH_METHODS                                                              \
  {"tensor_sig", fastres::host_path::tensor_sig_py, METH_O,                                    \
   "tensor_sig(tensors) -> bytes: each tensor's dtype and device (csrc/host_path.h)"},         \
  {"tensor_ptrs", fastres::host_path::tensor_ptrs_py, METH_O,                                  \
   "tensor_ptrs(tensors) -> bytes | None: the data pointers, packed (csrc/host_path.h)"},      \
  {                                                                                            \
    "tensor_key", fastres::host_path::tensor_key_py, METH_O,                                   \
        "tensor_key(tensor) -> bytes: dtype, device, sizes, strides, pointer mod 16"           \
  }

}  // namespace host_path
}  // namespace fastres
