// Small checks of the eager host path, in C: one call over a tuple of tensors where Python pays
// an attribute read per tensor (a training plan's 18-24 tensors: ~4 µs in Python on the 2-CPU
// AMD EPYC, loaded; ~0.5 µs here).
//
//   tensor_sig(tensors) -> bytes: per entry its dtype and device (type, index), None marked
//
// Used by fastres/nn/train_plan.py: a plan holds while its tensors keep the dtypes and devices
// they had (.to() changes a Parameter in place). Include in exactly one translation unit.
#pragma once

#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

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

#define FASTRES_HOST_PATH_METHODS                                                         \
  {                                                                                       \
    "tensor_sig", fastres::host_path::tensor_sig_py, METH_O,                              \
        "tensor_sig(tensors) -> bytes: each tensor's dtype and device (csrc/host_path.h)" \
  }

}  // namespace host_path
}  // namespace fastres
