// flash_attn_with_kvcache's lean path in C++ (fastattn/lean.py's cache_key_py, cache_call_py and cache_append_py are
// the references, checked against these in tests/test_lean_key.py and tests/test_lean_cache.py): cache_key, its key;
// cache_call, the whole path; cache_append, the append of the new keys and values. As Python, the path around the
// kernel cost ~15 us a call cold (GQA 16/4 D=128 bf16 at 1024 keys, one thread, Intel Xeon).
#include <torch/extension.h>

#include <array>
#include <cstring>
#include <vector>

#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>

#include "lean_common.h"
#include "lean_memo.h"

namespace fastattn::lean {
namespace {

// route(qt, k_cache, v_cache, seqlens) -> (out, lse) for a learnt cache route, -> nullptr with a Python error set.
PyObject* run_cache_route(PyObject* route, const at::Tensor& qt, PyObject* kc, PyObject* vc, const at::Tensor& lens) {
  PyObject* args[4] = {THPVariable_Wrap(qt), kc, vc, THPVariable_Wrap(lens)};
  PyObject* res = args[0] && args[3] ? PyObject_Vectorcall(route, args, 4, nullptr) : nullptr;
  Py_XDECREF(args[0]);
  Py_XDECREF(args[3]);
  return res;
}

// The facts of a cache_key call: what its key is made of, as values.
struct CacheFacts {
  pybind11::object req;  // the requested backend
  at::ScalarType dt = at::kFloat;
  std::vector<int64_t> dims;  // q's, k_cache's, v_cache's (and the new k's and v's) shapes, each after its rank
  int64_t wl = 0, wr = 0, splits = 0;
  double softcap = 0, scale = 0;
  bool has_new = false, causal = false, has_scale = false;
  bool values = true;  // the ints fit int64 (else no memo: the key still holds the call's objects)

  void add_shape(const at::Tensor& t) {
    dims.push_back(t.dim());
    dims.insert(dims.end(), t.sizes().begin(), t.sizes().end());
  }
  bool matches(const CacheFacts& o) const {  // (softcap and scale as the key's floats compare: a NaN never equal)
    return values && o.values && dt == o.dt && dims == o.dims && wl == o.wl && wr == o.wr && splits == o.splits &&
           softcap == o.softcap && has_scale == o.has_scale && (!has_scale || scale == o.scale) &&
           has_new == o.has_new && causal == o.causal && same_backend(req.ptr(), o.req.ptr());
  }
};

// The facts of cache_key's call a[0, 13) into f: 1; 0 where the call has no key (it takes the full path); -1 with a
// Python error set. Throws where a tensor lacks the metadata (strides).
int read_cache_facts(PyObject* const* a, CacheFacts& f) {
  PyObject *kn = a[3], *vn = a[4], *lens = a[5], *scale = a[6], *causal = a[7], *window = a[8], *softcap = a[9];
  PyObject *splits = a[10], *lse = a[11];
  const bool has_new = kn != Py_None || vn != Py_None;
  if (!(PyBool_Check(causal) && PyBool_Check(lse) && PyLong_CheckExact(splits) && PyFloat_CheckExact(softcap) &&
        (scale == Py_None || PyFloat_CheckExact(scale)) && PyTuple_CheckExact(window) &&
        PyTuple_GET_SIZE(window) == 2 && PyLong_CheckExact(PyTuple_GET_ITEM(window, 0)) &&
        PyLong_CheckExact(PyTuple_GET_ITEM(window, 1)) && (!has_new || (plain_type(kn) && plain_type(vn))))) {
    return 0;
  }
  const at::Tensor *q = plain_cpu(a[0]), *kc = plain_cpu(a[1]), *vc = plain_cpu(a[2]);
  if (!q || !kc || !vc) return 0;
  const at::ScalarType dt = q->scalar_type();
  const bool grad = at::GradMode::is_enabled();
  if (!float_dtype(dt) || kc->scalar_type() != dt || vc->scalar_type() != dt || q->dim() == 0 || kc->dim() == 0 ||
      vc->dim() == 0 || q->stride(-1) != 1 || kc->stride(-1) != 1 || vc->stride(-1) != 1 ||
      (grad && (q->requires_grad() || kc->requires_grad() || vc->requires_grad()))) {
    return 0;
  }
  if (!PyLong_CheckExact(lens)) {  // else an int32 (B,) unit-stride CPU tensor, B = q's batch
    if (!plain_type(lens)) return 0;
    const at::Tensor& L = THPVariable_Unpack(lens);
    if (!(L.scalar_type() == at::kInt && L.is_cpu() && L.layout() == at::kStrided && !L.is_nested() &&
          q->dim() == 4 && L.dim() == 1 && L.size(0) == q->size(0) && L.stride(0) == 1)) {
      return 0;
    }
  }
  f.dt = dt;
  f.add_shape(*q);
  f.add_shape(*kc);
  f.add_shape(*vc);
  f.has_new = has_new;
  if (has_new) {
    const at::Tensor *k = plain_cpu(kn), *v = plain_cpu(vn);
    if (!(k && v && k->scalar_type() == dt && v->scalar_type() == dt && !(grad && (k->requires_grad() ||
                                                                                  v->requires_grad())))) {
      return 0;
    }
    f.add_shape(*k);
    f.add_shape(*v);
  }
  int overflow = 0;
  f.wl = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(window, 0), &overflow);
  f.values = overflow == 0;
  f.wr = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(window, 1), &overflow);
  f.values = f.values && overflow == 0;
  f.splits = PyLong_AsLongLongAndOverflow(splits, &overflow);
  f.values = f.values && overflow == 0;
  f.softcap = PyFloat_AS_DOUBLE(softcap);
  f.has_scale = scale != Py_None;
  f.scale = f.has_scale ? PyFloat_AS_DOUBLE(scale) : 0.0;
  f.causal = causal == Py_True;
  f.req = pybind11::reinterpret_steal<pybind11::object>(requested(a[12]));
  return f.req ? 1 : -1;
}

// A tuple of ints from dims[at + 1, at + 1 + dims[at]) (a shape, equal to and hashing as its torch.Size); `at`
// moves past it.
PyObject* shape_at(const std::vector<int64_t>& dims, size_t& at) {
  const auto rank = static_cast<Py_ssize_t>(dims[at++]);
  PyObject* out = PyTuple_New(rank);
  for (Py_ssize_t i = 0; out && i < rank; ++i) {
    PyObject* d = PyLong_FromLongLong(dims[at + i]);
    if (d == nullptr) {
      Py_CLEAR(out);
      break;
    }
    PyTuple_SET_ITEM(out, i, d);
  }
  at += rank;
  return out;
}

// The key of cache_key's call a[0, 13) with facts f, or nullptr with a Python error set.
PyObject* make_cache_key(PyObject* const* a, const CacheFacts& f) {
  size_t at = 0;
  PyObject* shapes[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  const int count = f.has_new ? 5 : 3;
  bool ok = true;
  for (int i = 0; i < count; ++i) ok = ok && (shapes[i] = shape_at(f.dims, at)) != nullptr;
  PyObject* out = nullptr;
  PyObject* fresh = !ok ? nullptr : f.has_new ? Py_BuildValue("(OO)", shapes[3], shapes[4]) : Py_NewRef(Py_None);
  if (fresh) {
    PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(f.dt));  // borrowed (a static object)
    // "O" takes a new reference, "N" steals one (fresh); the call's own objects for the scalars
    out = Py_BuildValue("(OOOOOOONOOOOO)", g_tag, g_cache, f.req.ptr(), dtype, shapes[0], shapes[1], shapes[2], fresh,
                        a[7], a[8], a[9], a[6], a[10]);
  }
  for (PyObject* o : shapes) Py_XDECREF(o);
  return out;
}

RouteMemo<CacheFacts>& cache_memo() {  // flash_attn_with_kvcache's memo, as lean_call's (lean_memo.h)
  static auto* m = new RouteMemo<CacheFacts>();  // never destroyed
  return *m;
}

// lean_cache_call's route: learnt_route<cache_key>'s answer, from the memo where the call's facts have an entry.
PyObject* cache_route(PyObject* const* a, Py_ssize_t n, PyObject** instead) {
  if (!FASTATTN_LEAN_MEMO || n != 13 || g_tag == nullptr) return learnt_route<cache_key>(a, n, instead);
  return memo_first<CacheFacts>(
      instead, [&](CacheFacts& f) { return read_cache_facts(a, f); },
      [](PyObject* choices, const CacheFacts& f) { return cache_memo().find(choices, f); },
      [&](PyObject* choices, const CacheFacts& f, PyObject** inst) {
        PyObject* k = make_cache_key(a, f);
        PyObject* route = k ? lookup(choices, k, inst) : nullptr;
        if (route != nullptr && f.values) cache_memo().fill(choices, f, route);
        return route;
      });
}

}  // namespace

// cache_key(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, window_size, softcap, num_splits,
// return_lse, backend) -> tuple | None: lean.cache_key_py's key (flash_attn_with_kvcache's lean path).
PyObject* cache_key(PyObject* const* a, Py_ssize_t n) {
  if (!key_entry_ready("cache_key", n, 13, 13, "cache_key takes 13 arguments")) return nullptr;
  CacheFacts f;
  const int read = read_cache_facts(a, f);
  return read > 0 ? make_cache_key(a, f) : read < 0 ? nullptr : Py_NewRef(Py_None);
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
  PyObject* route = cache_route(a, n, &instead);
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
    const at::Tensor seqlens = given.defined() ? given : lengths(q.size(0), lo, q.options());
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

namespace {

// Whether cache_append may move bytes with memcpy where copy_ would do the same and nothing else: CPU tensors of one
// dtype that autograd does not track (no requires_grad), caches that are not inference tensors (copy_ refuses those
// outside inference mode) whose (S, H, D) rows lie back to back, contiguous new k, v that share no storage with a
// cache. Anything else takes copy_ and its checks.
bool raw_append(const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&kc, &vc, &k, &v}) {
    if (!t->device().is_cpu() || t->layout() != at::kStrided || !t->has_storage() || t->requires_grad() ||
        t->is_inference() || t->scalar_type() != kc.scalar_type()) {
      return false;
    }
  }
  for (const at::Tensor* c : {&kc, &vc}) {
    if (c->stride(3) != 1 || c->stride(2) != c->size(3) || c->stride(1) != c->size(2) * c->size(3)) return false;
  }
  const auto apart = [](const at::Tensor& a, const at::Tensor& b) { return !a.storage().is_alias_of(b.storage()); };
  return k.is_contiguous() && v.is_contiguous() && apart(k, kc) && apart(k, vc) && apart(v, kc) && apart(v, vc);
}

// Slots [lo, lo + Snew) of each batch row of cache (B, S, H, D) into old (B, Snew, H, D), then fresh's into them
// (raw_append's layouts: each row's slots one run of bytes); the cache's version bumped as copy_ bumps it.
void move_slots(const at::Tensor& cache, const at::Tensor& fresh, const at::Tensor& old, int64_t lo) {
  const int64_t es = cache.element_size(), run = fresh.size(1) * cache.stride(1) * es;
  char* c = static_cast<char*>(cache.data_ptr()) + lo * cache.stride(1) * es;
  const char* f = static_cast<const char*>(fresh.data_ptr());
  char* o = static_cast<char*>(old.data_ptr());
  for (int64_t b = 0; b < cache.size(0); ++b, c += cache.stride(0) * es, f += run, o += run) {
    std::memcpy(o, c, run);
    std::memcpy(c, f, run);
  }
  cache.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

at::Tensor lengths(int64_t B, int64_t value, const at::TensorOptions& on) {
  const at::TensorOptions opts = on.dtype(at::kInt);
  if (!opts.device().is_cpu()) return at::full({B}, value, opts);
  at::Tensor t = at::empty({B}, opts);
  std::fill_n(t.data_ptr<int32_t>(), B, static_cast<int32_t>(value));
  return t;
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
  at::Tensor lens = lengths(k_cache.size(0), lo + snew, k_cache.options());
  if (raw_append(k_cache, v_cache, k, v)) {  // bytes moved directly: the append 4.1 -> 2.9 us (B1 H12 D64, one token)
    at::Tensor old_k = at::empty(ks.sizes(), ks.options()), old_v = at::empty(vs.sizes(), vs.options());
    move_slots(k_cache, k, old_k, lo);
    move_slots(v_cache, v, old_v, lo);
    return {old_k, old_v, lens};
  }
  at::Tensor old_k = ks.clone(), old_v = vs.clone();
  ks.copy_(k);
  try {  // what the checks cannot see (e.g. an inference-mode v_cache outside inference mode) refuses v's write
    vs.copy_(v);
  } catch (...) {
    ks.copy_(old_k);  // k's slots as they were: a failing call leaves both caches untouched
    throw;
  }
  return {old_k, old_v, lens};
}

}  // namespace fastattn::lean
