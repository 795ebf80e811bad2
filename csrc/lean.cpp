// The SDPA surface's lean path in C++ (fastattn/lean.py): lean_key, its key (lean.key_py, the reference); lean_call,
// the whole path (lean.call_py), with its memo (lean_memo.h); lean_init, which binds both lean paths to the Python
// state they read; the module's entries for both (flash_attn_with_kvcache's: lean_cache.cpp).
//
// Why: the key runs between two kernels that stream a KV cache through the L2, so its Python ran cold there:
// 2.4 us warm and 4-7 us cold a call (one thread, Intel Xeon; 12-head decode steps of 9-130 us), most of auto's
// hand-over cost over PyTorch's own call. Here it reads the tensors' metadata directly, with no Python frame.
//
// Same key, same refusals (None: the call takes the full path) as key_py, which tests/test_lean_key.py checks
// field by field on a matrix of calls; the caller has checked dropout_p == 0 and that dynamo is not tracing (it
// cannot trace into this function). Fields: (LEAN, requested backend, dtype, q's shape, k's heads, v's head dim,
// the key length's class among dispatch.length_breaks(Sq) (with a gradient to record, -1 - the key length), is_causal,
// scale, the mask's dims but its last or None, whether calls run on one thread).
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/extension.h>

#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include "lean_common.h"
#include "lean_memo.h"

namespace fastattn::lean {

// Set once by lean_init (strong references kept for the process's life); lean_common.h shares the first four.
PyObject* g_tag = nullptr;        // dispatch.LEAN
PyObject* g_cache = nullptr;      // lean._CACHE (second field of flash_attn_with_kvcache's keys)
PyObject* g_dispatch = nullptr;   // the dispatch module: _CHOICES and length_breaks are read from it per call
PyObject* g_choices = nullptr;    // "_CHOICES"
namespace {
PyObject* g_ctx = nullptr;        // dispatch._ctx_backend (a ContextVar)
PyObject* g_env = nullptr;        // dispatch._env_backend () -> str | None
PyObject* g_os = nullptr;         // the os module: os.environ replaced wholesale sends requested() to g_env
PyObject* g_environ = nullptr;    // os.environ as lean_init saw it
PyObject* g_env_data = nullptr;   // its encoded mapping (os.environ._data), or nullptr: always ask g_env
PyObject* g_env_key = nullptr;    // b"FASTATTN_BACKEND", encoded as os.environ encodes keys
PyObject* g_environ_name = nullptr;  // "environ"
PyObject* g_auto = nullptr;       // "auto"
PyObject* g_breaks = nullptr;     // "length_breaks"
}  // namespace

bool float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// A plain dense CPU tensor (not a subclass: FakeTensor, Parameter and others take the full path; torch's
// THPVariable_CheckExact would let a Parameter through).
bool plain_type(PyObject* o) {
  return THPVariableClass != nullptr && Py_TYPE(o) == reinterpret_cast<PyTypeObject*>(THPVariableClass);
}

const at::Tensor* plain_cpu(PyObject* o) {
  if (!plain_type(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  return t.defined() && t.is_cpu() && t.layout() == at::kStrided && !t.is_nested() ? &t : nullptr;
}

namespace {

// dispatch._env_backend() (FASTATTN_BACKEND or None), a new reference; nullptr with a Python error set. Read from
// os.environ's encoded mapping here while os.environ is the object lean_init saw (that function's Python frame ran
// cold, ~0.5-1 us a call), else by calling it.
PyObject* env_backend() {
  if (g_env_data != nullptr) {
    PyObject* environ = PyObject_GetAttr(g_os, g_environ_name);
    if (environ == nullptr) return nullptr;
    Py_DECREF(environ);  // (compared by identity only)
    if (environ == g_environ) {
      PyObject* raw = PyDict_GetItemWithError(g_env_data, g_env_key);  // borrowed
      if (raw == nullptr) return PyErr_Occurred() ? nullptr : Py_NewRef(Py_None);
      if (PyBytes_Check(raw)) return PyUnicode_DecodeFSDefaultAndSize(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw));
    }
  }
  return PyObject_CallNoArgs(g_env);
}

}  // namespace

// backend or _ctx_backend.get() or _env_backend() or "auto" (dispatch._ambient's order), a new reference.
PyObject* requested(PyObject* backend) {
  PyObject* v = Py_NewRef(backend);
  for (int step = 0; step < 3; ++step) {
    const int truth = PyObject_IsTrue(v);
    if (truth != 0) {
      if (truth < 0) Py_CLEAR(v);
      return v;
    }
    Py_DECREF(v);
    if (step == 0) {
      if (PyContextVar_Get(g_ctx, Py_None, &v) < 0) return nullptr;
    } else if (step == 1) {
      if ((v = env_backend()) == nullptr) return nullptr;
    }
  }
  return Py_NewRef(g_auto);
}

// Whether lean_call must leave the call to the Python surface (lean._refused, the reference): jit tracing, autocast
// on any device, a torch-function mode, a functorch transform's level, or an open forward-AD level. Read from torch's
// thread-local state, as the Python callables behind lean._GUARDS read it (each of those calls ran cold, ~0.3-0.5 us).
bool refused() {
  // (functorch includes its front-mode key while any transform's level is on its stack)
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  return torch::jit::tracer::isTracing() || !tls.excluded_.isSupersetOf(c10::autocast_dispatch_keyset) ||
         at::impl::torch_function_mode_enabled() ||
         tls.included_.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         torch::autograd::ForwardADLevel::try_get_by_idx(0) != nullptr;
}

// The route learnt for key k (a new reference to its Lean (name, run, records_grad)) in choices (dispatch._CHOICES);
// nullptr where there is none, with *instead what lean_call / cache_call return then: k (none learnt yet), None (the
// key takes the full path: False), or nullptr with a Python error set. Steals k.
PyObject* lookup(PyObject* choices, PyObject* k, PyObject** instead) {
  PyObject* route = PyDict_Check(choices) ? PyDict_GetItemWithError(choices, k) : nullptr;  // borrowed
  if (route == nullptr) {
    if (PyErr_Occurred()) Py_DECREF(k);
    else *instead = k;  // to learn
    return nullptr;
  }
  Py_DECREF(k);
  if (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) < 2) {  // False: the key takes the full path
    *instead = Py_NewRef(Py_None);
    return nullptr;
  }
  return Py_NewRef(route);
}

namespace {

// bisect_left(dispatch.length_breaks(Sq), Sk) with length_breaks' memo (_CHOICES[(LEAN, Sq)]) read here (the breaks
// into *out where given); -1 on error.
int64_t length_class(int64_t Sq, int64_t Sk, std::vector<int64_t>* out = nullptr) {
  PyObject* choices = PyObject_GetAttr(g_dispatch, g_choices);
  if (choices == nullptr) return -1;
  PyObject* memo = Py_BuildValue("(OL)", g_tag, static_cast<long long>(Sq));
  PyObject* breaks = memo && PyDict_Check(choices) ? PyDict_GetItemWithError(choices, memo) : nullptr;  // borrowed
  Py_XINCREF(breaks);
  Py_XDECREF(memo);
  Py_DECREF(choices);
  if (breaks == nullptr) {
    if (PyErr_Occurred()) return -1;
    PyObject* fn = PyObject_GetAttr(g_dispatch, g_breaks);
    breaks = fn ? PyObject_CallFunction(fn, "L", static_cast<long long>(Sq)) : nullptr;
    Py_XDECREF(fn);
    if (breaks == nullptr) return -1;
  }
  int64_t cls = -1;
  if (PyTuple_Check(breaks)) {  // sorted: bisect_left is the count of breaks below Sk
    cls = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(breaks); ++i) {
      const long long b = PyLong_AsLongLong(PyTuple_GET_ITEM(breaks, i));
      if (b == -1 && PyErr_Occurred()) {
        cls = -1;
        break;
      }
      cls += b < Sk;
      if (out) out->push_back(b);
    }
  } else {
    PyErr_SetString(PyExc_TypeError, "fastattn.lean: dispatch.length_breaks must return a tuple");
  }
  Py_DECREF(breaks);
  return cls;
}

// The facts of lean_key's call a[0, n) (query, key, value, is_causal, scale, enable_gqa, backend[, attn_mask]) into
// f: 1; 0 where the call has no key (it takes the full path); -1 with a Python error set. Throws where a tensor lacks
// the metadata (strides).
int read_facts(PyObject* const* a, Py_ssize_t n, Facts& f) {
  PyObject *causal = a[3], *scale = a[4], *gqa = a[5], *mask = n == 8 ? a[7] : Py_None;
  if (!PyBool_Check(causal) || !PyBool_Check(gqa) || !(scale == Py_None || PyFloat_CheckExact(scale))) return 0;
  const at::Tensor *q = plain_cpu(a[0]), *k = plain_cpu(a[1]), *v = plain_cpu(a[2]);
  if (!q || !k || !v) return 0;
  // check_tensors' common case (a call that fails it takes the full path, for its message)
  const at::ScalarType dt = q->scalar_type();
  const bool grad = at::GradMode::is_enabled();
  if (!float_dtype(dt) || k->scalar_type() != dt || v->scalar_type() != dt) return 0;
  const auto qs = q->sizes(), ks = k->sizes(), vs = v->sizes();
  if (qs.size() != 4 || ks.size() != 4 || vs.size() != 4) return 0;
  const bool heads_ok = qs[1] == ks[1] || (gqa == Py_True && ks[1] > 0 && qs[1] % ks[1] == 0);
  // (head dim 0: the full path pads it to 1, functional._sdpa_call, so the route it learns cannot replay the call)
  if (!(qs[0] == ks[0] && ks[0] == vs[0] && ks[1] == vs[1] && heads_ok && qs[3] == ks[3] && qs[3] > 0 &&
        ks[2] == vs[2] && q->stride(3) == 1 && k->stride(3) == 1 && v->stride(3) == 1)) {
    return 0;
  }
  f.masked = mask != Py_None;
  if (f.masked) {  // a plain 4-D mask, bool or in q's dtype, last dim Sk or 1 (checked per call)
    const at::Tensor* m = plain_cpu(mask);
    if (m == nullptr || m->dim() != 4) return 0;
    const at::ScalarType mdt = m->scalar_type();
    if (!(mdt == at::kBool || (mdt == dt && !(grad && m->requires_grad()))) ||
        !(m->size(3) == ks[2] || m->size(3) == 1)) {
      return 0;
    }
    for (int i = 0; i < 3; ++i) f.mdims[i] = m->size(i);  // checked against q's dims by the call that learnt the route
  }
  // a gradient to record: lean.learn keeps only a route that records it for such calls (Lean.records_grad)
  f.records = grad && (q->requires_grad() || k->requires_grad() || v->requires_grad());
  f.dt = dt;
  std::copy(qs.begin(), qs.end(), f.q);
  f.kh = ks[1], f.vd = vs[3], f.sk = ks[2];
  f.causal = causal == Py_True;
  f.scale = pybind11::reinterpret_borrow<pybind11::object>(scale);
  f.one_thread = at::get_num_threads() == 1;  // auto's step rules depend on it
  f.req = pybind11::reinterpret_steal<pybind11::object>(requested(a[6]));
  return f.req ? 1 : -1;
}

// The lean key of facts f (the length breaks of its class into *breaks where given), or nullptr with a Python error.
PyObject* make_key(const Facts& f, std::vector<int64_t>* breaks = nullptr) {
  // the key length itself when recording (auto's rule for small training calls bounds B * Hq * Sq * Sk * D)
  const int64_t cls = f.records ? -1 - f.sk : length_class(f.q[2], f.sk, breaks);
  if (!f.records && cls < 0) return nullptr;
  PyObject* mask_dims = f.masked ? Py_BuildValue("(LLL)", static_cast<long long>(f.mdims[0]),
                                                  static_cast<long long>(f.mdims[1]),
                                                  static_cast<long long>(f.mdims[2]))
                                 : Py_NewRef(Py_None);
  if (mask_dims == nullptr) return nullptr;
  PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(f.dt));  // borrowed (a static object)
  // "O" takes a new reference, "N" steals one (mask_dims)
  return Py_BuildValue("(OOO(LLLL)LLLOONO)", g_tag, f.req.ptr(), dtype, static_cast<long long>(f.q[0]),
                       static_cast<long long>(f.q[1]), static_cast<long long>(f.q[2]), static_cast<long long>(f.q[3]),
                       static_cast<long long>(f.kh), static_cast<long long>(f.vd), static_cast<long long>(cls),
                       f.causal ? Py_True : Py_False, f.scale.ptr(), mask_dims, f.one_thread ? Py_True : Py_False);
}

// lean_key(query, key, value, is_causal, scale, enable_gqa, backend[, attn_mask]) -> tuple | None
PyObject* key(PyObject* const* a, Py_ssize_t n) {
  if (!key_entry_ready("lean_key", n, 7, 8,
                       "lean_key(query, key, value, is_causal, scale, enable_gqa, backend[, mask])")) {
    return nullptr;
  }
  Facts f;
  const int read = read_facts(a, n, f);
  return read > 0 ? make_key(f) : read < 0 ? nullptr : Py_NewRef(Py_None);
}

RouteMemo<Facts>& memo() {
  static auto* m = new RouteMemo<Facts>();  // never destroyed (lean_memo.h)
  return *m;
}

// lean_call's route: learnt_route<key>'s answer, from the memo where the call's facts have an entry (no key made),
// else through its key, remembered in the memo where a route was learnt for it.
PyObject* sdpa_route(PyObject* const* a, Py_ssize_t n, PyObject** instead) {
  if (!FASTATTN_LEAN_MEMO || n < 7 || n > 8 || g_tag == nullptr) return learnt_route<key>(a, n, instead);
  return memo_first<Facts>(
      instead, [&](Facts& f) { return read_facts(a, n, f); },
      [](PyObject* choices, const Facts& f) { return memo().find(choices, f); },
      [](PyObject* choices, const Facts& f, PyObject** inst) {
        std::vector<int64_t> breaks;
        PyObject* k = make_key(f, &breaks);
        PyObject* route = k ? lookup(choices, k, inst) : nullptr;
        if (route != nullptr) {
          Facts kept = f;  // the memo's copy: its class and the breaks it was found among
          kept.cls = f.records ? -1 - f.sk : length_class_of(breaks, f.sk);
          kept.breaks = std::move(breaks);
          memo().fill(choices, std::move(kept), route);
        }
        return route;
      });
}

// lean_call(query, key, value, is_causal, scale, enable_gqa, backend[, attn_mask]) -> Tensor | tuple | None: the
// SDPA surface's lean path in one call (lean.call_py, the reference). The learnt route's output where the call's key
// has one; the key where none is learnt yet (the surface learns it after its full path); None where the call cannot
// take the path (refused, no key) or its key takes the full path. Each Python frame it replaces ran cold between two
// kernels that stream a cache through the L2 (~1 us each; the surface's hand-over to sdpa read 0.88-0.90x torch on
// fp32 steps of 125 us, one thread, Intel Xeon, 2026-12-05).
PyObject* call(PyObject* const* a, Py_ssize_t n) {
  PyObject* instead = nullptr;
  PyObject* route = sdpa_route(a, n, &instead);
  if (route == nullptr) return instead;
  PyObject* mask = n == 8 ? a[7] : Py_None;
  PyObject* args[4] = {a[0], a[1], a[2], mask};
  PyObject* out = PyObject_Vectorcall(PyTuple_GET_ITEM(route, 1), args, mask == Py_None ? 3 : 4, nullptr);
  Py_DECREF(route);
  return out;
}

// A key function as a METH_FASTCALL entry: a C++ exception (metadata a tensor does not have, such as strides) is no
// key, so the call takes the full path, which says why.
template <PyObject* (*Key)(PyObject* const*, Py_ssize_t)>
PyObject* guarded(PyObject*, PyObject* const* a, Py_ssize_t n) {
  try {
    return Key(a, n);
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
}

// lean_call / cache_call as a METH_FASTCALL entry: a C++ error (cache_call's append checks, a restore) as a Python
// RuntimeError (the routes' own errors are Python exceptions already).
template <PyObject* (*Call)(PyObject* const*, Py_ssize_t)>
PyObject* raising(PyObject*, PyObject* const* a, Py_ssize_t n) {
  try {
    return Call(a, n);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef kMethods[] = {
    {"lean_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(guarded<key>)), METH_FASTCALL,
     "lean_key(query, key, value, is_causal, scale, enable_gqa, backend[, attn_mask]): fastattn/lean.py's key"},
    {"lean_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raising<call>)), METH_FASTCALL,
     "lean_call(query, key, value, is_causal, scale, enable_gqa, backend[, attn_mask]): fastattn/lean.py's call"},
    {"lean_cache_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(raising<cache_call>)), METH_FASTCALL,
     "lean_cache_call(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, "
     "num_splits, return_lse, backend): fastattn/lean.py's cache_call"},
    {"cache_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(guarded<cache_key>)), METH_FASTCALL,
     "cache_key(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, num_splits, "
     "return_lse, backend): fastattn/lean.py's cache_key"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void lean_init(pybind11::object dispatch, pybind11::object tag, pybind11::object cache, pybind11::object ctx,
               pybind11::object env, pybind11::object os_module, pybind11::object environ, pybind11::object env_data,
               pybind11::object env_key) {
  TORCH_CHECK(PyContextVar_CheckExact(ctx.ptr()), "lean_init: ctx must be a contextvars.ContextVar");
  TORCH_CHECK(env_data.is_none() || (PyDict_CheckExact(env_data.ptr()) && PyBytes_CheckExact(env_key.ptr())),
              "lean_init: env_data must be os.environ's dict of bytes (or None), env_key bytes");
  for (PyObject** g : {&g_tag, &g_cache, &g_dispatch, &g_ctx, &g_env, &g_auto, &g_choices, &g_breaks, &g_os,
                       &g_environ, &g_env_data, &g_env_key, &g_environ_name}) {
    Py_CLEAR(*g);
  }
  g_tag = tag.inc_ref().ptr();
  g_cache = cache.inc_ref().ptr();
  g_dispatch = dispatch.inc_ref().ptr();
  g_ctx = ctx.inc_ref().ptr();
  g_env = env.inc_ref().ptr();
  g_os = os_module.inc_ref().ptr();
  g_environ = environ.inc_ref().ptr();
  if (!env_data.is_none()) {
    g_env_data = env_data.inc_ref().ptr();
    g_env_key = env_key.inc_ref().ptr();
  }
  g_environ_name = PyUnicode_InternFromString("environ");
  g_auto = PyUnicode_InternFromString("auto");
  g_choices = PyUnicode_InternFromString("_CHOICES");
  g_breaks = PyUnicode_InternFromString("length_breaks");
}

void add_lean(pybind11::module_& m) {
  m.def("cache_append", &cache_append, "flash_attn_with_kvcache's lean append: (old k slots, old v slots, lengths)");
  m.def("lean_init", &lean_init,
        "Binds lean_key, lean_call and cache_key to dispatch (its LEAN tag), lean._CACHE, _ctx_backend, _env_backend "
        "and os.environ (its module, the object, its encoded mapping and FASTATTN_BACKEND's encoded key)");
  TORCH_CHECK(PyModule_AddFunctions(m.ptr(), kMethods) == 0, "fastattn._C: adding lean_key failed");
  m.attr("LEAN_MEMO") = static_cast<bool>(FASTATTN_LEAN_MEMO);  // lean_call's memo compiled in (lean_memo.h)
}

}  // namespace fastattn::lean
