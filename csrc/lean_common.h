// What the lean paths' two files share (csrc/lean.cpp: the SDPA surface's lean path, lean_init and the module's
// entries; csrc/lean_cache.cpp: flash_attn_with_kvcache's): lean_init's references, the tensor tests, the requested
// backend, the refusals and the route lookup. Every function here runs with the GIL held.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <exception>
#include <tuple>

namespace fastattn::lean {

extern PyObject* g_tag;       // dispatch.LEAN (first field of every lean key)
extern PyObject* g_cache;     // lean._CACHE (second field of flash_attn_with_kvcache's keys)
extern PyObject* g_dispatch;  // the dispatch module (its _CHOICES read per call)
extern PyObject* g_choices;   // "_CHOICES"

bool float_dtype(at::ScalarType t);
// A plain dense CPU tensor (not a subclass: FakeTensor, Parameter and others take the full path).
bool plain_type(PyObject* o);
const at::Tensor* plain_cpu(PyObject* o);
// backend or _ctx_backend.get() or _env_backend() or "auto" (dispatch._ambient's order), a new reference.
PyObject* requested(PyObject* backend);
bool refused();
PyObject* lookup(PyObject* choices, PyObject* k, PyObject** instead);

// Whether the key entry fn (lean_key, cache_key) may run on n arguments: n in [lo, hi] (else a TypeError with usage)
// and lean_init called (else a RuntimeError).
inline bool key_entry_ready(const char* fn, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t hi, const char* usage) {
  if (n < lo || n > hi) {
    PyErr_SetString(PyExc_TypeError, usage);
    return false;
  }
  if (g_tag == nullptr) {
    PyErr_Format(PyExc_RuntimeError, "fastattn._C.%s: lean_init was not called", fn);
    return false;
  }
  return true;
}

// The learnt route for the call a[0, n) whose key Key makes, after the refusals (lookup's answers; also None where
// the call is refused or has no key).
template <PyObject* (*Key)(PyObject* const*, Py_ssize_t)>
PyObject* learnt_route(PyObject* const* a, Py_ssize_t n, PyObject** instead) {
  *instead = nullptr;
  if (g_tag == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "fastattn._C: lean_init was not called");
    return nullptr;
  }
  if (refused()) {
    *instead = Py_NewRef(Py_None);
    return nullptr;
  }
  PyObject* k = nullptr;
  try {
    k = Key(a, n);
  } catch (const std::exception&) {  // metadata a tensor lacks (as guarded): no key
    *instead = Py_NewRef(Py_None);
    return nullptr;
  }
  if (k == nullptr || k == Py_None) {
    *instead = k;
    return nullptr;
  }
  PyObject* choices = PyObject_GetAttr(g_dispatch, g_choices);
  if (choices == nullptr) {
    Py_DECREF(k);
    return nullptr;
  }
  PyObject* route = lookup(choices, k, instead);
  Py_DECREF(choices);
  return route;
}

// The route both lean paths look up in their memo first (lean.cpp's sdpa_route, lean_cache.cpp's cache_route),
// with learnt_route's answers: after the refusals, read(f) fills the call's facts (1; 0: no key, the full path; -1: a
// Python error; a C++ exception, metadata a tensor lacks: no key); find(choices, f) is the memo's route (borrowed) or
// nullptr; else learn(choices, f, instead) makes the key, looks it up and remembers the route it finds.
template <typename Facts, typename Read, typename Find, typename Learn>
PyObject* memo_first(PyObject** instead, Read read, Find find, Learn learn) {
  *instead = nullptr;
  if (refused()) {
    *instead = Py_NewRef(Py_None);
    return nullptr;
  }
  Facts f;
  int got = 0;
  try {
    got = read(f);
  } catch (const std::exception&) {
  }
  if (got <= 0) {
    if (got == 0) *instead = Py_NewRef(Py_None);
    return nullptr;
  }
  PyObject* choices = PyObject_GetAttr(g_dispatch, g_choices);
  if (choices == nullptr) return nullptr;
  PyObject* route = find(choices, f);
  route = route != nullptr ? Py_NewRef(route) : learn(choices, f, instead);
  Py_DECREF(choices);
  return route;
}

// flash_attn_with_kvcache's lean path (csrc/lean_cache.cpp).
PyObject* cache_key(PyObject* const* a, Py_ssize_t n);
PyObject* cache_call(PyObject* const* a, Py_ssize_t n);
// An int32 (B,) tensor of lengths, each `value`, on `on`'s device (on the CPU filled in place: at::full cost ~0.3 us
// more a call).
at::Tensor lengths(int64_t B, int64_t value, const at::TensorOptions& on);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                            const at::Tensor& k, const at::Tensor& v, int64_t lo);

}  // namespace fastattn::lean
