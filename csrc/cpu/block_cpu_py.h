// A fused residual block's eval call on the CPU as one call from Python: the steady state of an
// eval plan with folds (fastres/nn/eval_plan.py, written out by fastres/nn/fast_path.py). It
// checks that the folds are current, proves no NaN can reach a ReLU (absmax against the plan's
// bound) and runs the block's convolutions, the ops and order of EvalPlan.run, from C++. Through
// Python each of those is a torch.ops call (schema parsing and dispatch) and the plan's code
// around them, ~65 µs per Bottleneck call beyond its ops (measured on the 2-CPU AMX Xeon at a
// 4x4 input, where the ops cost ~30 µs). Include in exactly one translation unit (module.cpp).
//
//   spec = cpu_block_spec(n_main, has_ds, convs, folds, m_max, k_out, c_out, channels_last, fp,
//                         sources)
//       convs: ((sh, sw, ph, pw, dh, dw, groups), ...), the main path in order, then the
//       downsample's; folds: (w, b, ...) per convolution (b may be None); m_max: the largest
//       max |x| for which every pre-activation is bounded (EvalPlan.m_max, NaN: never);
//       k_out, c_out: the output's bound k_out * M + c_out for an input bounded by M
//       (EvalPlan.out_bound); fp: the sources' fingerprint, or None to compare each source's
//       identity, version counter and data pointer (a frozen block, fastres.functional.versions)
//   y = cpu_block_eval(spec, x, sources, donate)  # None: a source changed (re-plan)
//       sources: five per convolution in fastres.functional.fold_sources' order (conv weight,
//       BN weight, BN bias, running mean, running var); donate: x may take the residual add.
//   (y, bound) = cpu_block_eval(spec, x, sources, donate, m)  # or None
//       m: a bound of max |x| the caller has proven (the previous block's output bound in
//       fastres.ResNet's body), NaN: none. Where m is within m_max it stands for absmax's read
//       of x; bound: the output's (NaN where the ReLU pass ran: nothing proven).
//
// It bypasses the dispatcher: its caller (the generated steady-state function) uses it only under
// no dispatch mode, no autograd, on plain CPU tensors.
#pragma once

#include <ATen/record_function.h>
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cmath>
#include <memory>
#include <optional>
#include <vector>

#include "../py_call.h"
#include "ops_common.h"

namespace fastres::cpu::py_block {

using namespace fastres::py_call;  // NOLINT: the argument helpers

struct CpuBlockConv {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
};

// One source as fastres.functional.Versions keys it: the Python object (held), its version
// counter and data pointer; an absent one has a null object.
struct SourceKey {
  PyObject* obj = nullptr;
  int64_t version = 0;
  const void* data = nullptr;
};

struct CpuBlockSpec {
  std::vector<CpuBlockConv> convs;
  std::vector<at::Tensor> w;                 // folded weights, one per convolution
  std::vector<std::optional<at::Tensor>> b;  // folded biases
  int64_t n_main = 0;
  bool has_ds = false;
  double m_max = NAN;
  double k_out = NAN, c_out = NAN;  // the output's bound: k_out * M + c_out
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  std::optional<int64_t> fp;     // the sources' fingerprint; absent: compare `keys`
  std::vector<SourceKey> keys;   // frozen: each source's identity, version and data pointer

  ~CpuBlockSpec() {
    for (auto& k : keys) Py_XDECREF(k.obj);  // a capsule is freed with the GIL held
  }
};

inline const char* kCpuSpecName = "fastres.CpuBlockSpec";

inline void free_cpu_spec(PyObject* capsule) {
  delete static_cast<CpuBlockSpec*>(PyCapsule_GetPointer(capsule, kCpuSpecName));
}

// A source's key; false (a Python error set) when it is not a tensor or None, or has no version
// counter (an inference tensor: such a plan checks the fingerprint instead).
inline bool source_key(PyObject* v, SourceKey& k) {
  k = SourceKey{};
  if (v == Py_None) return true;
  if (!THPVariable_Check(v)) {
    PyErr_SetString(PyExc_TypeError, "fastres: a block's sources are tensors or None");
    return false;
  }
  const at::Tensor& t = THPVariable_Unpack(v);
  if (t.is_inference()) {
    PyErr_SetString(PyExc_ValueError, "fastres: an inference tensor has no version counter");
    return false;
  }
  k.obj = v;
  k.version = t._version();
  k.data = t.data_ptr();
  return true;
}

inline PyObject* cpu_block_spec(PyObject*, PyObject* args) {
  long long n_main = 0;
  int has_ds = 0, channels_last = 0;
  double m_max = NAN, k_out = NAN, c_out = NAN;
  PyObject *convs = nullptr, *folds = nullptr, *fp = nullptr, *sources = nullptr;
  if (!PyArg_ParseTuple(args, "LpO!O!dddpOO!", &n_main, &has_ds, &PyTuple_Type, &convs,
                        &PyTuple_Type, &folds, &m_max, &k_out, &c_out, &channels_last, &fp,
                        &PyTuple_Type, &sources))
    return nullptr;
  const Py_ssize_t n = PyTuple_GET_SIZE(convs);
  if (n != n_main + (has_ds ? 1 : 0) || n < 1 || PyTuple_GET_SIZE(folds) != 2 * n ||
      PyTuple_GET_SIZE(sources) != 5 * n) {
    PyErr_SetString(PyExc_ValueError,
                    "fastres: cpu_block_spec takes one geometry, two folds and five sources per "
                    "convolution");
    return nullptr;
  }
  auto spec = std::make_unique<CpuBlockSpec>();
  spec->n_main = n_main;
  spec->has_ds = has_ds != 0;
  spec->m_max = m_max;
  spec->k_out = k_out;
  spec->c_out = c_out;
  spec->fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* c = PyTuple_GET_ITEM(convs, i);
    if (!PyTuple_Check(c) || PyTuple_GET_SIZE(c) != 7) {
      PyErr_SetString(PyExc_TypeError, "fastres: each convolution is (sh, sw, ph, pw, dh, dw, "
                                       "groups)");
      return nullptr;
    }
    int64_t v[7];
    for (Py_ssize_t k = 0; k < 7; ++k)
      if (!read_ints(c, k, &v[k])) return nullptr;
    spec->convs.push_back({{v[0], v[1]}, {v[2], v[3]}, {v[4], v[5]}, v[6]});
  }
  std::vector<std::optional<at::Tensor>> f;
  if (!read_tensors(folds, f)) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!f[2 * i].has_value()) {
      PyErr_SetString(PyExc_ValueError, "fastres: a fold's weight is a tensor");
      return nullptr;
    }
    spec->w.push_back(*f[2 * i]);
    spec->b.push_back(f[2 * i + 1]);
  }
  if (fp != Py_None) {
    const long long v = PyLong_AsLongLong(fp);
    if (v == -1 && PyErr_Occurred()) return nullptr;
    spec->fp = v;
  } else {
    spec->keys.resize(static_cast<size_t>(5 * n));
    for (Py_ssize_t i = 0; i < 5 * n; ++i) {
      if (!source_key(PyTuple_GET_ITEM(sources, i), spec->keys[i])) return nullptr;
      Py_XINCREF(spec->keys[i].obj);
    }
  }
  PyObject* cap = PyCapsule_New(spec.get(), kCpuSpecName, free_cpu_spec);
  if (cap != nullptr) spec.release();
  return cap;
}

// Whether the sources are the objects a frozen plan's folds were made from (with the GIL).
inline bool same_objects(const CpuBlockSpec& spec, PyObject* sources) {
  if (spec.fp.has_value()) return true;
  if (static_cast<size_t>(PyTuple_GET_SIZE(sources)) != spec.keys.size()) return false;
  for (size_t i = 0; i < spec.keys.size(); ++i) {
    const SourceKey& k = spec.keys[i];
    if (PyTuple_GET_ITEM(sources, static_cast<Py_ssize_t>(i)) != (k.obj ? k.obj : Py_None))
      return false;
  }
  return true;
}

// Whether the sources' values are the ones the folds were made from (EvalPlan.run's `_sources`
// check): their fingerprint, or, frozen, each one's version counter and data pointer.
inline bool same_values(const CpuBlockSpec& spec,
                        const std::vector<std::optional<at::Tensor>>& t) {
  if (spec.fp.has_value()) {
    RECORD_FUNCTION("fastres_cpu::fingerprint", std::vector<c10::IValue>());
    c10::List<std::optional<at::Tensor>> list;
    list.reserve(t.size());
    for (const auto& v : t) list.push_back(v);
    return fingerprint_cpu(list) == *spec.fp;
  }
  for (size_t i = 0; i < t.size(); ++i) {
    const SourceKey& k = spec.keys[i];
    if (t[i].has_value() && (t[i]->is_inference() || t[i]->_version() != k.version ||
                             t[i]->data_ptr() != k.data))
      return false;
  }
  return true;
}

// EvalPlan.run's folded branch: relu(conv_n(... relu(conv_1(x)) ...) + shortcut(x)), each
// convolution with its fold; oneDNN's ReLU post-op where max |x| is within the plan's bound
// (finite), else the ReLU pass that keeps NaN.
// Each op under the name a profile gives its torch.ops call (no dispatcher here to record it).
// m_in: a proven bound of max |x| (NaN: none); *m_out: the output's bound (NaN: none).
inline at::Tensor run_block(const CpuBlockSpec& spec, const at::Tensor& x, bool donate,
                            double m_in, double* m_out) {
  double m = m_in;
  if (!(m <= spec.m_max)) {  // NaN or past the bound: read x
    RECORD_FUNCTION("fastres_cpu::absmax", std::vector<c10::IValue>());
    m = absmax_cpu(x);
  }
  const bool finite = m <= spec.m_max;  // NaN: false
  *m_out = finite ? spec.k_out * m + spec.c_out : NAN;
  const auto conv = [&](size_t i, const at::Tensor& in, const std::optional<at::Tensor>& res,
                        bool relu) {
    const CpuBlockConv& c = spec.convs[i];
    if (finite) {
      RECORD_FUNCTION("fastres_cpu::conv_bias_act_finite", std::vector<c10::IValue>());
      return conv_bias_act_finite_cpu(in, spec.w[i], spec.b[i], res, c.stride, c.padding,
                                      c.dilation, c.groups, relu);
    }
    RECORD_FUNCTION("fastres::conv_bias_act", std::vector<c10::IValue>());
    return conv_bias_act_cpu(in, spec.w[i], spec.b[i], res, c.stride, c.padding, c.dilation,
                             c.groups, relu, std::nullopt, std::nullopt, std::nullopt, 0.0);
  };
  const size_t last = static_cast<size_t>(spec.n_main - 1);
  at::Tensor h = x;
  for (size_t i = 0; i < last; ++i) h = conv(i, h, std::nullopt, true);
  at::Tensor identity = spec.has_ds ? conv(last + 1, x, std::nullopt, false) : x;
  identity = identity.contiguous(spec.fmt);
  // The residual buffer is ours (the downsample's output, a copy, or a donated input): the
  // convolution accumulates into it in place.
  const bool owned = spec.has_ds || donate || !identity.is_same(x);
  if (finite && owned) {
    RECORD_FUNCTION("fastres_cpu::conv_bias_act_finite_into", std::vector<c10::IValue>());
    const CpuBlockConv& c = spec.convs[last];
    return conv_bias_act_finite_into_cpu(identity, h, spec.w[last], spec.b[last], c.stride,
                                         c.padding, c.dilation, c.groups, true);
  }
  return conv(last, h, identity, true);
}

inline PyObject* cpu_block_eval(PyObject*, PyObject* args) {
  PyObject *cap = nullptr, *x = nullptr, *sources = nullptr, *bound = nullptr;
  int donate = 0;
  if (!PyArg_ParseTuple(args, "OOO!p|O", &cap, &x, &PyTuple_Type, &sources, &donate, &bound))
    return nullptr;
  double m_in = NAN;
  if (bound != nullptr && bound != Py_None) {
    m_in = PyFloat_AsDouble(bound);
    if (m_in == -1.0 && PyErr_Occurred()) return nullptr;
  }
  CpuBlockSpec* spec = nullptr;
  at::Tensor xt;
  std::vector<std::optional<at::Tensor>> t;
  if (!read_call(cap, kCpuSpecName, x, "cpu_block_eval's x", sources, spec, xt, t))
    return nullptr;
  if (!same_objects(*spec, sources)) Py_RETURN_NONE;
  bool current = false;
  at::Tensor out;
  double m_out = NAN;
  if (!run_released([&] {
        current = same_values(*spec, t);
        if (current) out = run_block(*spec, xt, donate != 0, m_in, &m_out);
      }))
    return nullptr;
  if (!current) Py_RETURN_NONE;
  if (bound == nullptr) return THPVariable_Wrap(std::move(out));
  PyObject* y = THPVariable_Wrap(std::move(out));
  if (y == nullptr) return nullptr;
  return Py_BuildValue("(Nd)", y, m_out);
}

#define FASTRES_CPU_BLOCK_METHODS                                                             \
  {"cpu_block_spec", fastres::cpu::py_block::cpu_block_spec, METH_VARARGS,                    \
   "cpu_block_spec(n_main, has_ds, convs, folds, m_max, k_out, c_out, channels_last, fp, "    \
   "sources) -> spec "                                                                        \
   "for cpu_block_eval (see csrc/cpu/block_cpu_py.h)"},                                       \
  {                                                                                           \
    "cpu_block_eval", fastres::cpu::py_block::cpu_block_eval, METH_VARARGS,                   \
        "cpu_block_eval(spec, x, sources, donate, bound=<absent>) -> the block's eval output "   \
        "(with bound: (output, its bound)), or None when a source changed"                                                                      \
  }

}  // namespace fastres::cpu::py_block
