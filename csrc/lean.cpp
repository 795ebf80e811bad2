// The lean paths' C++ (fastattn/lean.py): lean_key, the SDPA surface's lean key (lean.key_py, the reference);
// lean_call, that surface's whole lean path (lean.call_py); cache_key, flash_attn_with_kvcache's
// (lean.cache_key_py); lean_cache_call, its whole lean path (lean.cache_call_py); cache_append, its append of the new
// keys and values.
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

#include "lean_memo.h"

namespace fastattn::lean {
std::tuple<at::Tensor, at::Tensor, at::Tensor> cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                            const at::Tensor& k, const at::Tensor& v, int64_t lo);
namespace {

// Set once by lean_init (strong references kept for the process's life).
PyObject* g_tag = nullptr;        // dispatch.LEAN
PyObject* g_cache = nullptr;      // lean._CACHE (second field of flash_attn_with_kvcache's keys)
PyObject* g_dispatch = nullptr;   // the dispatch module: _CHOICES and length_breaks are read from it per call
PyObject* g_ctx = nullptr;        // dispatch._ctx_backend (a ContextVar)
PyObject* g_env = nullptr;        // dispatch._env_backend () -> str | None
PyObject* g_os = nullptr;         // the os module: os.environ replaced wholesale sends requested() to g_env
PyObject* g_environ = nullptr;    // os.environ as lean_init saw it
PyObject* g_env_data = nullptr;   // its encoded mapping (os.environ._data), or nullptr: always ask g_env
PyObject* g_env_key = nullptr;    // b"FASTATTN_BACKEND", encoded as os.environ encodes keys
PyObject* g_environ_name = nullptr;  // "environ"
PyObject* g_auto = nullptr;       // "auto"
PyObject* g_choices = nullptr;    // "_CHOICES"
PyObject* g_breaks = nullptr;     // "length_breaks"

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
  if (!(qs[0] == ks[0] && ks[0] == vs[0] && ks[1] == vs[1] && heads_ok && qs[3] == ks[3] && ks[2] == vs[2] &&
        q->stride(3) == 1 && k->stride(3) == 1 && v->stride(3) == 1)) {
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
  // a gradient to record: lean.learn keeps only a hand-over to PyTorch's SDPA for such calls
  f.records = grad && (q->requires_grad() || k->requires_grad() || v->requires_grad());
  f.dt = dt;
  std::copy(qs.begin(), qs.end(), f.q);
  f.kh = ks[1], f.vd = vs[3], f.sk = ks[2];
  f.causal = causal == Py_True;
  f.scale = scale;
  f.one_thread = at::get_num_threads() == 1;  // auto's step rules depend on it
  f.req = requested(a[6]);
  return f.req == nullptr ? -1 : 1;
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
  return Py_BuildValue("(OOO(LLLL)LLLOONO)", g_tag, f.req, dtype, static_cast<long long>(f.q[0]),
                       static_cast<long long>(f.q[1]), static_cast<long long>(f.q[2]), static_cast<long long>(f.q[3]),
                       static_cast<long long>(f.kh), static_cast<long long>(f.vd), static_cast<long long>(cls),
                       f.causal ? Py_True : Py_False, f.scale, mask_dims, f.one_thread ? Py_True : Py_False);
}

// lean_key(query, key, value, is_causal, scale, enable_gqa, backend[, attn_mask]) -> tuple | None
PyObject* key(PyObject* const* a, Py_ssize_t n) {
  if (n < 7 || n > 8) {
    PyErr_SetString(PyExc_TypeError, "lean_key(query, key, value, is_causal, scale, enable_gqa, backend[, mask])");
    return nullptr;
  }
  if (g_tag == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "fastattn._C.lean_key: lean_init was not called");
    return nullptr;
  }
  Facts f;
  const int read = read_facts(a, n, f);
  return read > 0 ? make_key(f) : read < 0 ? nullptr : Py_NewRef(Py_None);
}

// A tensor's shape as a tuple of ints (equal to, and hashing as, its torch.Size).
PyObject* shape(const at::Tensor& t) {
  const auto s = t.sizes();
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(s.size()));
  for (size_t i = 0; out && i < s.size(); ++i) {
    PyObject* d = PyLong_FromLongLong(s[i]);
    if (d == nullptr) {
      Py_CLEAR(out);
      break;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), d);
  }
  return out;
}


// cache_key(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, num_splits,
// return_lse, backend) -> tuple | None: lean.cache_key_py's key (flash_attn_with_kvcache's lean path).
PyObject* cache_key(PyObject* const* a, Py_ssize_t n) {
  if (n != 13) {
    PyErr_SetString(PyExc_TypeError, "cache_key takes 13 arguments");
    return nullptr;
  }
  if (g_tag == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "fastattn._C.cache_key: lean_init was not called");
    return nullptr;
  }
  PyObject *kn = a[3], *vn = a[4], *lens = a[5], *scale = a[6], *causal = a[7], *window = a[8], *softcap = a[9];
  PyObject *splits = a[10], *lse = a[11];
  const bool has_new = kn != Py_None || vn != Py_None;
  if (!(PyBool_Check(causal) && PyBool_Check(lse) && PyLong_CheckExact(splits) && PyFloat_CheckExact(softcap) &&
        (scale == Py_None || PyFloat_CheckExact(scale)) && PyTuple_CheckExact(window) &&
        PyTuple_GET_SIZE(window) == 2 && PyLong_CheckExact(PyTuple_GET_ITEM(window, 0)) &&
        PyLong_CheckExact(PyTuple_GET_ITEM(window, 1)) && (!has_new || (plain_type(kn) && plain_type(vn))))) {
    Py_RETURN_NONE;
  }
  const at::Tensor *q = plain_cpu(a[0]), *kc = plain_cpu(a[1]), *vc = plain_cpu(a[2]);
  if (!q || !kc || !vc) Py_RETURN_NONE;
  const at::ScalarType dt = q->scalar_type();
  const bool grad = at::GradMode::is_enabled();
  if (!float_dtype(dt) || kc->scalar_type() != dt || vc->scalar_type() != dt || q->dim() == 0 || kc->dim() == 0 ||
      vc->dim() == 0 || q->stride(-1) != 1 || kc->stride(-1) != 1 || vc->stride(-1) != 1 ||
      (grad && (q->requires_grad() || kc->requires_grad() || vc->requires_grad()))) {
    Py_RETURN_NONE;
  }
  if (!PyLong_CheckExact(lens)) {  // else an int32 (B,) unit-stride CPU tensor, B = q's batch
    if (!plain_type(lens)) Py_RETURN_NONE;
    const at::Tensor& L = THPVariable_Unpack(lens);
    if (!(L.scalar_type() == at::kInt && L.is_cpu() && L.layout() == at::kStrided && !L.is_nested() &&
          q->dim() == 4 && L.dim() == 1 && L.size(0) == q->size(0) && L.stride(0) == 1)) {
      Py_RETURN_NONE;
    }
  }
  PyObject* shapes[5] = {shape(*q), shape(*kc), shape(*vc), nullptr, nullptr};
  PyObject* out = nullptr;
  if (has_new) {
    const at::Tensor *k = plain_cpu(kn), *v = plain_cpu(vn);
    if (!(k && v && k->scalar_type() == dt && v->scalar_type() == dt && !(grad && (k->requires_grad() ||
                                                                                  v->requires_grad())))) {
      for (PyObject* o : shapes) Py_XDECREF(o);
      Py_RETURN_NONE;
    }
    shapes[3] = shape(*k);
    shapes[4] = shape(*v);
  }
  PyObject* req = requested(a[12]);
  if (req && shapes[0] && shapes[1] && shapes[2] && (!has_new || (shapes[3] && shapes[4]))) {
    PyObject* fresh = has_new ? Py_BuildValue("(OO)", shapes[3], shapes[4]) : Py_NewRef(Py_None);
    PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(dt));  // borrowed (a static object)
    if (fresh) {
      out = Py_BuildValue("(OOOOOOONOOOOO)", g_tag, g_cache, req, dtype, shapes[0], shapes[1], shapes[2], fresh,
                          causal, window, softcap, scale, splits);
    }
  }
  Py_XDECREF(req);
  for (PyObject* o : shapes) Py_XDECREF(o);
  return out;
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

// The route learnt for key k (a new reference to its Lean (name, run)) in choices (dispatch._CHOICES); nullptr where
// there is none, with *instead what lean_call / cache_call return then: k (none learnt yet), None (the key takes the
// full path: False), or nullptr with a Python error set. Steals k.
PyObject* lookup(PyObject* choices, PyObject* k, PyObject** instead) {
  PyObject* route = PyDict_Check(choices) ? PyDict_GetItemWithError(choices, k) : nullptr;  // borrowed
  if (route == nullptr) {
    if (PyErr_Occurred()) Py_DECREF(k);
    else *instead = k;  // to learn
    return nullptr;
  }
  Py_DECREF(k);
  if (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) != 2) {  // False: the key takes the full path
    *instead = Py_NewRef(Py_None);
    return nullptr;
  }
  return Py_NewRef(route);
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

Memo& memo() {
  static Memo* m = new Memo();  // never destroyed (lean_memo.h)
  return *m;
}

// lean_call's route: learnt_route<key>'s answer, from the memo where the call's facts have an entry (no key made),
// else through its key, remembered in the memo where a route was learnt for it.
PyObject* sdpa_route(PyObject* const* a, Py_ssize_t n, PyObject** instead) {
  if (!FASTATTN_LEAN_MEMO || n < 7 || n > 8 || g_tag == nullptr) return learnt_route<key>(a, n, instead);
  *instead = nullptr;
  if (refused()) {
    *instead = Py_NewRef(Py_None);
    return nullptr;
  }
  Facts f;
  int read = 0;
  try {
    read = read_facts(a, n, f);
  } catch (const std::exception&) {  // metadata a tensor lacks (as guarded): no key
  }
  if (read <= 0) {
    if (read == 0) *instead = Py_NewRef(Py_None);
    return nullptr;
  }
  PyObject* choices = PyObject_GetAttr(g_dispatch, g_choices);
  if (choices == nullptr) return nullptr;
  PyObject* route = memo().find(choices, f);
  if (route != nullptr) {
    Py_DECREF(choices);
    return Py_NewRef(route);
  }
  std::vector<int64_t> breaks;
  PyObject* k = make_key(f, &breaks);
  route = k ? lookup(choices, k, instead) : nullptr;
  if (route != nullptr) memo().fill(choices, f, std::move(breaks), route);  // (at the version after any learning)
  Py_DECREF(choices);
  return route;
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

// route(qt, k_cache, v_cache, seqlens) -> (out, lse) for a learnt cache route, -> nullptr with a Python error set.
PyObject* run_cache_route(PyObject* route, const at::Tensor& qt, PyObject* kc, PyObject* vc, const at::Tensor& lens) {
  PyObject* args[4] = {THPVariable_Wrap(qt), kc, vc, THPVariable_Wrap(lens)};
  PyObject* res = args[0] && args[3] ? PyObject_Vectorcall(route, args, 4, nullptr) : nullptr;
  Py_XDECREF(args[0]);
  Py_XDECREF(args[3]);
  return res;
}

// cache_call(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, num_splits,
// return_lse, backend) -> out | (out, lse) | key | None: flash_attn_with_kvcache's lean path in one call
// (lean.cache_call_py, the reference; the caller has checked block_table, cache_batch_idx, rotary_cos, alibi_slopes
// and cache_leftpad are None and that dynamo is not tracing). The learnt route's result (lean.cache_run's steps:
// the lengths read and checked against the cache, an append of the new k, v undone if the kernel fails); the key
// (a 13-tuple) where none is learnt yet; None where the call cannot take the path, its key takes the full path, or
// its values send it there (lengths outside the cache, appends into rows of different lengths).
PyObject* cache_call(PyObject* const* a, Py_ssize_t n) {
  PyObject* instead = nullptr;
  PyObject* route = learnt_route<cache_key>(a, n, &instead);
  if (route == nullptr) return instead;
  // cache_key accepted the tensors: plain CPU tensors, cache_seqlens an int or an int32 (B,) unit-stride tensor
  const at::Tensor& q = THPVariable_Unpack(a[0]);
  const at::Tensor& kc = THPVariable_Unpack(a[1]);
  const at::Tensor& vc = THPVariable_Unpack(a[2]);
  PyObject* lens = a[5];
  int64_t lo = 0, hi = 0;
  at::Tensor given;
  if (PyLong_CheckExact(lens)) {
    lo = hi = PyLong_AsLongLong(lens);
    if (lo == -1 && PyErr_Occurred()) {
      Py_DECREF(route);
      return nullptr;
    }
  } else {
    given = THPVariable_Unpack(lens);
    const int32_t* L = given.data_ptr<int32_t>();
    lo = hi = given.size(0) ? L[0] : 0;
    for (int64_t b = 1; b < given.size(0); ++b) lo = std::min<int64_t>(lo, L[b]), hi = std::max<int64_t>(hi, L[b]);
  }
  const bool fresh = a[3] != Py_None;
  const int64_t snew = fresh ? THPVariable_Unpack(a[3]).size(1) : 0;
  if (lo < 0 || hi + snew > kc.size(1) || (snew && lo != hi)) {  // the full path: its message, its indexed append
    Py_DECREF(route);
    Py_RETURN_NONE;
  }
  const at::Tensor qt = q.transpose(1, 2);  // (B, Sq, Hq, D) -> (B, Hq, Sq, D)
  PyObject* run = PyTuple_GET_ITEM(route, 1);
  PyObject* res = nullptr;
  if (!fresh) {
    const at::Tensor seqlens = given.defined() ? given : at::full({q.size(0)}, lo, q.options().dtype(at::kInt));
    res = run_cache_route(run, qt, a[1], a[2], seqlens);
  } else {
    const at::Tensor &kn = THPVariable_Unpack(a[3]), &vn = THPVariable_Unpack(a[4]);
    auto [old_k, old_v, seqlens] = cache_append(kc, vc, kn, vn, lo);  // seqlens: lo + snew
    res = run_cache_route(run, qt, a[1], a[2], seqlens);
    if (res == nullptr) {  // the caches bit for bit as they were, then the route's error
      PyObject *type, *value, *trace;
      PyErr_Fetch(&type, &value, &trace);
      cache_append(kc, vc, old_k, old_v, lo);
      PyErr_Restore(type, value, trace);
    }
  }
  Py_DECREF(route);
  if (res == nullptr) return nullptr;
  if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 || !THPVariable_Check(PyTuple_GET_ITEM(res, 0))) {
    Py_DECREF(res);
    PyErr_SetString(PyExc_TypeError, "fastattn._C.lean_cache_call: a cache route must return (out, lse)");
    return nullptr;
  }
  PyObject* out = THPVariable_Wrap(THPVariable_Unpack(PyTuple_GET_ITEM(res, 0)).transpose(1, 2));  // -> (B, Sq, Hq, Dv)
  if (out == nullptr || a[11] != Py_True) {
    Py_DECREF(res);
    return out;
  }
  PyObject* both = PyTuple_Pack(2, out, PyTuple_GET_ITEM(res, 1));
  Py_DECREF(out);
  Py_DECREF(res);
  return both;
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

// flash_attn_with_kvcache's lean append: slots [lo, lo + Snew) of every batch row of the caches (B, S, Hkv, D|Dv)
// take k, v (B, Snew, Hkv, D|Dv); returns what they held (to restore the caches bit for bit if the kernel fails)
// and the int32 (B,) lengths after the append. One call for the seven tensor ops the Python made (~1.5 us each).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                            const at::Tensor& k, const at::Tensor& v, int64_t lo) {
  const int64_t snew = k.size(1);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && lo >= 0 && lo + snew <= k_cache.size(1) &&
                  v.size(1) == snew && lo + snew <= v_cache.size(1),
              "cache_append: slots [", lo, ", ", lo + snew, ") outside caches ", k_cache.sizes(), " / ",
              v_cache.sizes());
  at::Tensor ks = k_cache.narrow(1, lo, snew), vs = v_cache.narrow(1, lo, snew);  // (B, Snew, Hkv, D|Dv) views
  // Everything copy_ could refuse halfway (after k's slots were written) or take silently (broadcast, a dtype
  // conversion), checked before the first write.
  for (const auto& [t, slots, name] : {std::tuple{&k, &ks, "k"}, std::tuple{&v, &vs, "v"}}) {
    TORCH_CHECK(t->sizes() == slots->sizes() && t->scalar_type() == slots->scalar_type() &&
                    t->device() == slots->device(),
                "cache_append: ", name, " must be ", slots->scalar_type(), " ", slots->sizes(), " on ",
                slots->device(), " (the slots it fills), got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
  }
  at::Tensor old_k = ks.clone(), old_v = vs.clone();
  ks.copy_(k);
  try {  // what the checks cannot see (e.g. an inference-mode v_cache outside inference mode) refuses v's write
    vs.copy_(v);
  } catch (...) {
    ks.copy_(old_k);  // k's slots as they were: a failing call leaves both caches untouched
    throw;
  }
  return {old_k, old_v, at::full({k_cache.size(0)}, lo + snew, k_cache.options().dtype(at::kInt))};
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
