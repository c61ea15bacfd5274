// One C++ call that records a fused call in the autograd graph, its backward a Python function:
//
//   grad_node(backward, ctx, name, outputs, inputs, saved)
//
// makes a node whose next edges are `inputs`' (tensors or None), sets it as the grad_fn of each
// tensor in `outputs` (fresh tensors, made without autograd), keeps `saved` as saved variables
// (version-checked at backward, released after it unless the graph is retained, with
// torch.autograd.graph's saved-tensor hooks) and, at backward, calls
// `backward(ctx, grads, saved, needs)` (grads: one per output, None where none flowed; needs: per
// input, whether its gradient is wanted), which returns one gradient or None per input.
//
// Why: torch.autograd.Function.apply with a residual block's 15-20 tensors cost ~7 µs of host
// time per call, its save_for_backward and the graph's teardown ~4 µs more (measured on the
// 2-CPU AMD EPYC through cudasim, fastres/_autograd_block.py); grad-enabled eval has a budget of
// 25 µs per block in all. No forward-mode AD: an input with a forward gradient is refused.
// Backend-agnostic (any tensors): in fastres._C always and in fastres._C_cudasim. Include in
// exactly one translation unit per module.
#pragma once

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastres {
namespace py_grad {

using torch::autograd::Edge;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
// The handle torch keeps nodes by (a shared_ptr in some torch versions, an intrusive_ptr in
// others): whatever Node::getptr() returns.
using NodePtr = decltype(std::declval<Node&>().getptr());

struct GilGuard {
  PyGILState_STATE state = PyGILState_Ensure();
  ~GilGuard() { PyGILState_Release(state); }
};

struct PyBackwardNode : Node {
  PyObject* fn = nullptr;   // owned
  PyObject* ctx = nullptr;  // owned
  std::string label;
  std::vector<SavedVariable> saved;

  ~PyBackwardNode() override {
    if ((fn != nullptr || ctx != nullptr) && Py_IsInitialized()) {
      GilGuard gil;
      Py_XDECREF(fn);
      Py_XDECREF(ctx);
    }
  }

  std::string name() const override { return label; }

  void release_variables() override {
    // reset, not cleared: a second backward then fails in unpack with autograd's own message
    for (auto& s : saved) s.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    GilGuard gil;
    const size_t n_in = num_outputs();  // the node's outputs are the gradients of our inputs
    PyObject* g = PyTuple_New(static_cast<Py_ssize_t>(grads.size()));
    PyObject* sv = PyTuple_New(static_cast<Py_ssize_t>(saved.size()));
    PyObject* needs = PyTuple_New(static_cast<Py_ssize_t>(n_in));
    if (g == nullptr || sv == nullptr || needs == nullptr) {
      Py_XDECREF(g);
      Py_XDECREF(sv);
      Py_XDECREF(needs);
      throw python_error();
    }
    for (size_t i = 0; i < grads.size(); ++i)
      PyTuple_SET_ITEM(g, static_cast<Py_ssize_t>(i), THPVariable_Wrap(std::move(grads[i])));
    try {
      for (size_t i = 0; i < saved.size(); ++i)
        PyTuple_SET_ITEM(sv, static_cast<Py_ssize_t>(i), THPVariable_Wrap(saved[i].unpack(getptr())));
    } catch (...) {
      Py_DECREF(g);
      Py_DECREF(sv);
      Py_DECREF(needs);
      throw;
    }
    for (size_t i = 0; i < n_in; ++i) {
      PyObject* b = should_compute_output(i) ? Py_True : Py_False;
      Py_INCREF(b);
      PyTuple_SET_ITEM(needs, static_cast<Py_ssize_t>(i), b);
    }
    PyObject* r = PyObject_CallFunctionObjArgs(fn, ctx, g, sv, needs, nullptr);
    Py_DECREF(g);
    Py_DECREF(sv);
    Py_DECREF(needs);
    if (r == nullptr) {
      python_error err;
      err.persist();
      throw std::move(err);
    }
    PyObject* seq = PySequence_Fast(r, "fastres: a backward returns a sequence of gradients");
    Py_DECREF(r);
    if (seq == nullptr) {
      python_error err;
      err.persist();
      throw std::move(err);
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (static_cast<size_t>(n) != n_in) {
      Py_DECREF(seq);
      TORCH_CHECK(false, "fastres: ", label, " returned ", n, " gradients for ", n_in, " inputs");
    }
    variable_list out(n_in);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* v = PySequence_Fast_GET_ITEM(seq, i);
      if (v == Py_None) continue;
      if (!THPVariable_Check(v)) {
        Py_DECREF(seq);
        TORCH_CHECK(false, "fastres: ", label, " returned a non-tensor gradient");
      }
      if (should_compute_output(static_cast<size_t>(i))) out[i] = THPVariable_Unpack(v);
    }
    Py_DECREF(seq);
    return out;
  }
};

// A new node as torch keeps them (N: the node type, a template parameter so that only the branch
// of the torch at hand is compiled).
template <typename P, typename N>
P new_node() {
  if constexpr (std::is_same_v<P, std::shared_ptr<Node>>) {
    return std::make_shared<N>();
  } else {
    return c10::make_intrusive<N>();
  }
}

inline bool read(PyObject* tup, std::vector<at::Tensor>& out, const char* what) {
  out.reserve(PyTuple_GET_SIZE(tup));
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tup); ++i) {
    PyObject* v = PyTuple_GET_ITEM(tup, i);
    if (v == Py_None) {
      out.emplace_back();
    } else if (THPVariable_Check(v)) {
      out.push_back(THPVariable_Unpack(v));
    } else {
      PyErr_Format(PyExc_TypeError, "fastres grad_node: %s holds a non-tensor", what);
      return false;
    }
  }
  return true;
}

inline PyObject* grad_node_py(PyObject*, PyObject* args) {
  PyObject *fn = nullptr, *ctx = nullptr, *outs = nullptr, *ins = nullptr, *sv = nullptr;
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "OOsO!O!O!", &fn, &ctx, &name, &PyTuple_Type, &outs, &PyTuple_Type,
                        &ins, &PyTuple_Type, &sv))
    return nullptr;
  std::vector<at::Tensor> o, in, s;
  if (!read(outs, o, "outputs") || !read(ins, in, "inputs") || !read(sv, s, "saved"))
    return nullptr;
  try {
    if (!torch::autograd::GradMode::is_enabled()) Py_RETURN_NONE;
    torch::autograd::edge_list edges;
    edges.reserve(in.size());
    bool any = false;
    for (const auto& t : in) {
      if (!t.defined()) {
        edges.emplace_back();
        continue;
      }
      TORCH_CHECK(!t._fw_grad(/*level=*/0).defined(), "fastres: ", name,
                  " has no forward-mode AD (an input carries a forward gradient)");
      edges.push_back(torch::autograd::impl::gradient_edge(t));
      any = any || edges.back().is_valid();
    }
    if (!any) Py_RETURN_NONE;  // nothing upstream wants a gradient
    NodePtr node = new_node<NodePtr, PyBackwardNode>();
    auto* raw = static_cast<PyBackwardNode*>(node.get());
    raw->label = name;
    raw->set_next_edges(std::move(edges));
    for (const auto& t : o) {
      TORCH_CHECK(!t.defined() || (!t.requires_grad() && t.is_leaf()), "fastres: ", name,
                  "'s outputs must be fresh tensors made without autograd");
      torch::autograd::set_history(t, node);
    }
    raw->saved.reserve(s.size());
    for (const auto& t : s) {
      bool is_output = false;
      for (const auto& u : o) is_output = is_output || (t.defined() && t.is_same(u));
      raw->saved.emplace_back(t, is_output);
    }
    Py_INCREF(fn);
    Py_INCREF(ctx);
    raw->fn = fn;
    raw->ctx = ctx;
  } catch (const python_error&) {
    return nullptr;
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// grad_node_state(grad_fn) -> (name, ctx, saved) of a node grad_node made in this module, else
// None: what a harness reads from a recorded call (fastres._autograd.inner_relu_decisions).
inline PyObject* grad_node_state_py(PyObject*, PyObject* obj) {
  if (!torch::autograd::THPCppFunction_Check(obj)) Py_RETURN_NONE;
  auto* node = dynamic_cast<PyBackwardNode*>(reinterpret_cast<torch::autograd::THPCppFunction*>(obj)->cdata.get());
  if (node == nullptr || node->ctx == nullptr) Py_RETURN_NONE;
  PyObject* sv = PyTuple_New(static_cast<Py_ssize_t>(node->saved.size()));
  if (sv == nullptr) return nullptr;
  try {
    for (size_t i = 0; i < node->saved.size(); ++i)
      PyTuple_SET_ITEM(sv, static_cast<Py_ssize_t>(i),
                       THPVariable_Wrap(node->saved[i].unpack(node->getptr())));
  } catch (const c10::Error& e) {
    Py_DECREF(sv);
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
  return Py_BuildValue("(sON)", node->label.c_str(), node->ctx, sv);
}

#define FASTRES_GRAD_METHODS                                                              \
  {                                                                                       \
    "grad_node", fastres::py_grad::grad_node_py, METH_VARARGS,                      \
        "grad_node(backward, ctx, name, outputs, inputs, saved): record a fused call in "  \
        "the autograd graph (csrc/grad_node.h)"                                      \
  }                                                                                       \
  , {                                                                                     \
    "grad_node_state", fastres::py_grad::grad_node_state_py, METH_O,                      \
        "grad_node_state(grad_fn) -> (name, ctx, saved) of a grad_node node, else None"   \
  }

}  // namespace py_grad
}  // namespace fastres
