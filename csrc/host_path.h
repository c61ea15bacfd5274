// Small checks of the eager host path, in C: one call over a tuple of tensors where Python pays
// an attribute read per tensor (a training plan's 18-24 tensors: ~4 µs in Python on the 2-CPU
// AMD EPYC, loaded; ~0.5 µs here).
//
//   tensor_sig(tensors) -> bytes: per entry its dtype and device (type, index), None marked
//   tensor_ptrs(tensors) -> bytes | None: every data pointer, packed; None when one is absent
//   tensor_key(tensor) -> bytes: dtype, device, sizes, strides and the data pointer mod 16
//   tensors_in(pool, specs) -> tuple: tensors in one pool's storage (see there)
//
// tensor_sig: fastres/nn/train_plan.py, a plan holds while its tensors keep the dtypes and devices
// they had (.to() changes a Parameter in place). tensor_ptrs: the Triton launch plans
// (triton_kernels/block.py, unit.py), whose layouts are re-checked only when a pointer moved (a
// block's 15-20 tensors: 1.7 µs through Tensor.data_ptr in Python, ~0.2 µs here). tensor_key: a
// plan's input check in one call (the same five reads from Python: ~1.2 µs;
// fastres/nn/eval_fast.py, triton_kernels/block.py). Include in exactly one translation unit.
#pragma once

#include <Python.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

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

// tensors_in(pool, specs) -> tuple: per (offset, sizes, strides) of specs a tensor of pool's
// dtype in pool's storage from element `offset` on (pool's own offset added); per (offset, sizes,
// strides, dtype) one of that dtype from element `offset` of it counted from pool's data (a
// byte workspace's regions). Several outputs of one allocation (the Triton replays' per-channel
// vectors, triton_kernels/_replay.py; a block plan's kept activations, block.py), each ~0.2 µs
// where torch.as_strided from Python costs ~2 µs. Not views for autograd: plain tensors that
// share the storage.
inline PyObject* tensors_in_py(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* pool = nullptr;
  PyObject* specs = nullptr;
  if (!PyArg_ParseTuple(args, "OO!", &pool, &PyTuple_Type, &specs)) return nullptr;
  if (!THPVariable_Check(pool)) {
    PyErr_SetString(PyExc_TypeError, "fastres tensors_in: pool must be a tensor");
    return nullptr;
  }
  const at::Tensor& buf = THPVariable_Unpack(pool);
  TORCH_CHECK(buf.layout() == c10::kStrided && buf.has_storage() && buf.is_contiguous(),
              "fastres tensors_in: pool must be a contiguous strided tensor");
  const int64_t numel = buf.numel();
  const Py_ssize_t n = PyTuple_GET_SIZE(specs);
  THPObjectPtr out(PyTuple_New(n));  // released on every exit but the last
  if (!out) return nullptr;
  const auto ints = [](PyObject* seq, std::vector<int64_t>& v) {
    if (!PyTuple_Check(seq)) return false;
    v.resize(static_cast<size_t>(PyTuple_GET_SIZE(seq)));
    for (size_t i = 0; i < v.size(); ++i) {
      v[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(seq, static_cast<Py_ssize_t>(i)));
      if (v[i] == -1 && PyErr_Occurred()) return false;
    }
    return true;
  };
  std::vector<int64_t> sizes, strides;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* sp = PyTuple_GET_ITEM(specs, i);
    long long off = -1;
    const Py_ssize_t len = PyTuple_Check(sp) ? PyTuple_GET_SIZE(sp) : 0;
    if ((len != 3 && len != 4) || (off = PyLong_AsLongLong(PyTuple_GET_ITEM(sp, 0))) < 0 ||
        !ints(PyTuple_GET_ITEM(sp, 1), sizes) || !ints(PyTuple_GET_ITEM(sp, 2), strides) ||
        sizes.size() != strides.size() || (len == 4 && !THPDtype_Check(PyTuple_GET_ITEM(sp, 3)))) {
      if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError,
                        "fastres tensors_in: each spec is (offset, sizes, strides[, dtype])");
      return nullptr;
    }
    caffe2::TypeMeta dtype = buf.dtype();
    int64_t first = buf.storage_offset() + off;  // in elements of dtype
    if (len == 4) {
      dtype = caffe2::TypeMeta::fromScalarType(
          reinterpret_cast<THPDtype*>(PyTuple_GET_ITEM(sp, 3))->scalar_type);
      const int64_t base = buf.storage_offset() * static_cast<int64_t>(buf.dtype().itemsize());
      const auto size = static_cast<int64_t>(dtype.itemsize());
      TORCH_CHECK(base % size == 0, "fastres tensors_in: the pool's offset is not a whole number "
                  "of ", dtype.name(), " elements");
      first = base / size + off;
    }
    // the end of the tensor's span in bytes, against the pool's
    int64_t last = first;
    for (size_t d = 0; d < sizes.size(); ++d) {
      TORCH_CHECK(sizes[d] >= 1 && strides[d] >= 0, "fastres tensors_in: bad sizes/strides");
      last += (sizes[d] - 1) * strides[d];
    }
    const int64_t end_bytes = (last + 1) * static_cast<int64_t>(dtype.itemsize());
    const int64_t pool_end =
        (buf.storage_offset() + numel) * static_cast<int64_t>(buf.dtype().itemsize());
    if (end_bytes > pool_end) {
      PyErr_SetString(PyExc_ValueError, "fastres tensors_in: a spec reaches past the pool");
      return nullptr;
    }
    auto impl =
        c10::make_intrusive<c10::TensorImpl>(c10::Storage(buf.storage()), buf.key_set(), dtype);
    impl->set_storage_offset(first);
    impl->set_sizes_and_strides(sizes, strides);
    PyObject* t = THPVariable_Wrap(at::Tensor(std::move(impl)));
    if (t == nullptr) return nullptr;
    PyTuple_SET_ITEM(out.get(), i, t);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

#define FASTRES_HOST_PATH_METHODS                                                              \
  {"tensors_in", fastres::host_path::tensors_in_py, METH_VARARGS,                              \
   "tensors_in(pool, specs) -> tuple: tensors in pool's storage (csrc/host_path.h)"},          \
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
