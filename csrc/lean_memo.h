// The lean paths' memos (lean_call's in csrc/lean.cpp, lean_cache_call's in csrc/lean_cache.cpp): the facts and
// routes of each path's last few calls. A call whose facts match an entry's, while dispatch._CHOICES is the dict the
// entry was filled from at the same version (nothing learnt, forgotten or replaced since), replays the entry's route
// without making its key: Py_BuildValue, the length class's lookup of length_breaks' memo, the key's hash and
// compare cost ~1.5-2 us a call cold, between kernels that stream a cache through the L2 (one thread, Intel Xeon,
// 2026-12-05).
//
// The version: CPython 3.11 and 3.12 give every dict a version tag (PEP 509), set from one process-wide counter on
// every change and on creation, so a dict created at a freed one's address has another. 3.13 dropped the field from
// its API: there (and in free-threaded builds) the memo stays off and every call makes its key.
#pragma once

#include <Python.h>

#include <c10/core/ScalarType.h>
#include <pybind11/pytypes.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#if PY_VERSION_HEX < 0x030D0000 && !defined(Py_GIL_DISABLED)
#define FASTATTN_LEAN_MEMO 1
#else
#define FASTATTN_LEAN_MEMO 0
#endif

namespace fastattn::lean {

// bisect_left(breaks, sk): the class of key length sk among sorted breaks.
inline int64_t length_class_of(const std::vector<int64_t>& breaks, int64_t sk) {
  int64_t cls = 0;
  for (const int64_t b : breaks) cls += b < sk;
  return cls;
}

// Two requested backends (exact str: what a memo keeps) equal.
inline bool same_backend(PyObject* a, PyObject* b) {
  return a == b || (PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b) && PyUnicode_Compare(a, b) == 0);
}

// What an SDPA call's lean key is made of (lean.key_py's fields), read from its arguments; the key length itself, of
// which the key holds the class. A memo's copy also keeps the length breaks its class was found among.
struct Facts {
  pybind11::object req;    // the requested backend
  pybind11::object scale;  // the call's scale: None or a float
  c10::ScalarType dt = c10::ScalarType::Float;
  int64_t q[4] = {0, 0, 0, 0}, kh = 0, vd = 0, sk = 0, mdims[3] = {0, 0, 0};
  bool masked = false, causal = false, records = false, one_thread = false;
  std::vector<int64_t> breaks;  // (a memo's copy) length_breaks(q[2]): the class of another key length
  int64_t cls = 0;              // (a memo's copy) its key's class

  // Whether a call with facts `call` has this memo copy's key.
  bool matches(const Facts& call) const {
    if (!(dt == call.dt && std::equal(q, q + 4, call.q) && kh == call.kh && vd == call.vd &&
          masked == call.masked && causal == call.causal && records == call.records &&
          one_thread == call.one_thread && (!masked || std::equal(mdims, mdims + 3, call.mdims)) &&
          same_scale(scale.ptr(), call.scale.ptr()))) {
      return false;
    }
    if (records ? sk != call.sk : cls != length_class_of(breaks, call.sk)) return false;
    return same_backend(req.ptr(), call.req.ptr());
  }

 private:
  static bool same_scale(PyObject* a, PyObject* b) {
    if (a == Py_None || b == Py_None) return a == b;
    return PyFloat_AS_DOUBLE(a) == PyFloat_AS_DOUBLE(b);  // as the key's float compares (a NaN never equal)
  }
};

// Where an entry was learnt: dispatch._CHOICES by identity, and its version then (PEP 509's tag: never a freed
// dict's successor's, never the same after a change).
struct TableStamp {
  const PyObject* choices = nullptr;  // nullptr: matches nothing (the memo off, or no plain dict)
  uint64_t version = 0;

  static TableStamp of(PyObject* choices) {
#if FASTATTN_LEAN_MEMO
    if (PyDict_CheckExact(choices)) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
      return {choices, reinterpret_cast<PyDictObject*>(choices)->ma_version_tag};
#pragma GCC diagnostic pop
    }
#else
    (void)choices;
#endif
    return {};
  }
  bool valid() const { return choices != nullptr; }
  bool operator==(const TableStamp& o) const { return choices == o.choices && version == o.version; }
};

// The facts and routes of the last four lean calls of one kind (F: lean.cpp's Facts, lean_cache.cpp's CacheFacts: a
// copy, `req` (the requested backend) and matches(call)). One per kind and process (never destroyed: no teardown
// after the interpreter is gone); the GIL guards it.
template <typename F>
class RouteMemo {
 public:
  // The route (borrowed) of the entry whose facts match f, filled from `choices` at its present version; nullptr
  // where none is.
  PyObject* find(PyObject* choices, const F& f) const {
    const TableStamp now = TableStamp::of(choices);
    if (!now.valid() || !PyUnicode_CheckExact(f.req.ptr())) return nullptr;
    for (const Entry& e : entries_) {
      if (e.route && e.stamp == now && e.facts.matches(f)) return e.route.ptr();
    }
    return nullptr;
  }

  // Remembers route (a Lean tuple) for facts f, learnt in `choices` (at its version now: after any learning).
  void fill(PyObject* choices, F f, PyObject* route) {
    const TableStamp now = TableStamp::of(choices);
    if (!now.valid() || !PyUnicode_CheckExact(f.req.ptr())) return;
    Entry& e = entries_[next_];
    next_ = (next_ + 1) % entries_.size();
    e.facts = std::move(f);
    e.route = pybind11::reinterpret_borrow<pybind11::object>(route);
    e.stamp = now;
  }

 private:
  struct Entry {
    F facts;
    pybind11::object route;
    TableStamp stamp;
  };
  std::array<Entry, 4> entries_;  // a model's few kinds of call (a step's layers share one)
  size_t next_ = 0;
};

}  // namespace fastattn::lean
