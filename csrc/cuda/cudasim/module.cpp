// The Python module fastres._C_cudasim: importing it registers torch.ops.fastres_cudasim.* (the
// CUDA backend's launchers and kernels on CPU tensors, csrc/cuda/cudasim). Plain Python C API
// (block_py.h adds torch's THPVariable helpers and grad_node.h the autograd node).
#include <Python.h>

#include "../../grad_node.h"
#include "../block_py.h"
#include "cudasim.h"

namespace {
PyObject* func_set_attribute_calls(PyObject*, PyObject*) {
  return PyLong_FromLong(cudasim::func_set_attribute_calls());
}
PyObject* launch_count(PyObject*, PyObject*) { return PyLong_FromLong(cudasim::launch_count()); }
PyObject* launch_sites(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  for (const auto& [site, n] : cudasim::launch_sites()) {
    PyObject* v = PyLong_FromLong(n);
    if (!v || PyDict_SetItemString(d, site.c_str(), v) < 0) {
      Py_XDECREF(v);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return d;
}
PyObject* set_dry_run(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  return PyBool_FromLong(cudasim::set_dry_run(on != 0));
}
PyMethodDef kMethods[] = {
    {"func_set_attribute_calls", func_set_attribute_calls, METH_NOARGS,
     "cudaFuncSetAttribute calls so far (the launchers should cache them per kernel)."},
    {"launch_count", launch_count, METH_NOARGS, "Kernel launches so far."},
    {"launch_sites", launch_sites, METH_NOARGS,
     "Kernel launches so far per call site, {'file:line': count}."},
    {"set_dry_run", set_dry_run, METH_O,
     "set_dry_run(on) -> previous: launches are checked and counted but kernels do not run "
     "(the host path's cost with the kernels made free)."},
    FASTRES_BLOCK_METHODS,
    FASTRES_GRAD_METHODS,
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C_cudasim",
                       "fastres CUDA kernels on the CPU (cudasim): torch.ops.fastres_cudasim", -1,
                       kMethods};
}  // namespace

PyMODINIT_FUNC PyInit__C_cudasim(void) { return PyModule_Create(&kModule); }
