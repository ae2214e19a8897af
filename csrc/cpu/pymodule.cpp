// The Python module shell of every compiled module (adai_kernels._C and the per-ISA CPU
// variants adai_kernels._cpu_*): importing the module loads the shared library, whose static
// initialisers register the ops (TORCH_LIBRARY / TORCH_LIBRARY_IMPL). The module itself only
// carries a few build facts as constants. setup.py compiles this file into each module with
//   -DADAI_MODULE_NAME=<name>          (e.g. _C, _cpu_avx512)
//   -DADAI_CPU_VARIANT                 (CPU variants: adds `isa` and `vec_size`)
//   -DADAI_WITH_CUDA                   (_C built with CUDA kernels: `cuda` = 1)
#include <Python.h>

#ifndef ADAI_MODULE_NAME
#error "compile with -DADAI_MODULE_NAME=<module name>"
#endif

#define ADAI_CAT_(a, b) a##b
#define ADAI_CAT(a, b) ADAI_CAT_(a, b)
#define ADAI_STR_(a) #a
#define ADAI_STR(a) ADAI_STR_(a)

#ifdef ADAI_CPU_VARIANT
// Defined in adai_cpu.cpp (the same module).
extern "C" int adai_cpu_vec_size();
extern "C" const char* adai_cpu_isa();
#endif

static struct PyModuleDef adai_module_def = {
    PyModuleDef_HEAD_INIT,
    "adai_kernels." ADAI_STR(ADAI_MODULE_NAME),
    "adai_kernels native ops (registered into torch.ops.adai on import).",
    -1,
    nullptr,
};

PyMODINIT_FUNC ADAI_CAT(PyInit_, ADAI_MODULE_NAME)(void) {
  PyObject* m = PyModule_Create(&adai_module_def);
  if (m == nullptr) return nullptr;
#ifdef ADAI_WITH_CUDA
  const long cuda = 1;
#else
  const long cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "cuda", cuda) < 0) goto fail;
#ifdef ADAI_CPU_VARIANT
  if (PyModule_AddStringConstant(m, "isa", adai_cpu_isa()) < 0) goto fail;
  if (PyModule_AddIntConstant(m, "vec_size", adai_cpu_vec_size()) < 0) goto fail;
#endif
  return m;
fail:
  Py_DECREF(m);
  return nullptr;
}
