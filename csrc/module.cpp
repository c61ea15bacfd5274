// The Python extension module fastres._C: build information and capability queries.
// The ops themselves are registered with the dispatcher (fastres/_opset.py, csrc/cpu, csrc/cuda);
// importing this module is what loads them.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <string>

#include "cpu/block_cpu_py.h"
#include "cpu/unit_cpu.h"
#include "grad_node.h"
#include "host_path.h"
#include "py_call.h"

#ifdef FASTRES_WITH_CUDA
#include "cuda/block_py.h"
#endif

#ifndef FASTRES_VERSION
#define FASTRES_VERSION "unknown"
#endif
#ifndef FASTRES_CUDA_ARCH_LIST
#define FASTRES_CUDA_ARCH_LIST ""
#endif

namespace py = pybind11;

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTRES_VERSION;
#ifdef FASTRES_WITH_CUDA
  info["cuda"] = true;
  info["cuda_arch_list"] = FASTRES_CUDA_ARCH_LIST;
#else
  info["cuda"] = false;
  info["cuda_arch_list"] = "";
#endif
#ifdef FASTRES_CUDA_VERSION
  info["cuda_version"] = FASTRES_CUDA_VERSION;
#else
  info["cuda_version"] = "";
#endif
  info["compiler"] = compiler();
  info["torch_version"] = FASTRES_TORCH_VERSION;
  return info;
}

// The CPU training unit (csrc/cpu/unit_cpu.h): the CPU backend's eager_unit.
PyMethodDef kGradMethods[] = {
    FASTRES_GRAD_METHODS,
    FASTRES_HOST_PATH_METHODS,
    // A CPU block's folded eval call (csrc/cpu/block_cpu_py.h).
    FASTRES_CPU_BLOCK_METHODS,
    {"cpu_unit_spec", fastres::py_call::unit_spec, METH_VARARGS,
     "cpu_unit_spec(n, shortcut, relu, stages) -> spec for cpu_unit_forward/cpu_unit_backward"},
    {"cpu_unit_forward", fastres::py_call::unit_forward_py<fastres::cpu::unit_forward>,
     METH_VARARGS,
     "cpu_unit_forward(spec, x, params) -> (out, yd, *ys, *stats, *dstats) (csrc/cpu/unit_cpu.h)"},
    {"cpu_unit_backward", fastres::py_call::unit_backward_py<fastres::cpu::unit_backward>,
     METH_VARARGS,
     "cpu_unit_backward(spec, grad_out, saved, need_x) -> (dx, per stage dw, dgamma, dbeta)"},
    {nullptr, nullptr, 0, nullptr}};

#ifdef FASTRES_WITH_CUDA
PyMethodDef kBlockMethods[] = {FASTRES_BLOCK_METHODS, {nullptr, nullptr, 0, nullptr}};
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastres compiled ops (registered in the torch.ops.fastres namespace)";
  m.def("build_info", &build_info,
        "What this extension was built with: version, CUDA or not, arch list, compiler, torch.");
  m.def("has_cuda", []() {
#ifdef FASTRES_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // grad_node (csrc/grad_node.h): a fused call recorded in the autograd graph, any backend;
  // tensor_sig (csrc/host_path.h); the CPU training unit (csrc/cpu/unit_cpu.h).
  if (PyModule_AddFunctions(m.ptr(), kGradMethods) != 0) throw py::error_already_set();
#ifdef FASTRES_WITH_CUDA
  // block_spec / block_eval (csrc/cuda/block_py.h): plain C-API functions, no pybind11 casts.
  if (PyModule_AddFunctions(m.ptr(), kBlockMethods) != 0) throw py::error_already_set();
#endif
}
