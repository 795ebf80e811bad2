// lean_call's memo (csrc/lean.cpp): the facts and routes of the SDPA surface's last few lean calls. A call whose facts
// equal an entry's, while dispatch._CHOICES is the dict the entry was filled from at the same version (nothing learnt,
// forgotten or replaced since), replays the entry's route without making its key: Py_BuildValue, the length class's
// lookup of length_breaks' memo, the key's hash and compare cost ~1.5-2 us a call cold, between kernels that stream a
// cache through the L2 (one thread, Intel Xeon, 2026-12-05).
//
// The version: CPython 3.11 and 3.12 give every dict a version tag (PEP 509), set from one process-wide counter on
// every change and on creation, so a dict created at a freed one's address has another. 3.13 dropped the field from
// its API: there (and in free-threaded builds) the memo stays off and every call makes its key.
#pragma once

#include <Python.h>

#include <c10/core/ScalarType.h>

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

// What an SDPA call's lean key is made of (lean.key_py's fields), read from its arguments; the key length itself, of
// which the key holds the class.
struct Facts {
  PyObject* req = nullptr;    // the requested backend (a strong reference)
  PyObject* scale = nullptr;  // the call's scale: None or a float (borrowed from the call)
  c10::ScalarType dt = c10::ScalarType::Float;
  int64_t q[4] = {0, 0, 0, 0}, kh = 0, vd = 0, sk = 0, mdims[3] = {0, 0, 0};
  bool masked = false, causal = false, records = false, one_thread = false;

  Facts() = default;
  Facts(const Facts&) = delete;
  Facts& operator=(const Facts&) = delete;
  ~Facts() { Py_XDECREF(req); }
};

// bisect_left(breaks, sk): the class of key length sk among sorted breaks.
inline int64_t length_class_of(const std::vector<int64_t>& breaks, int64_t sk) {
  int64_t cls = 0;
  for (const int64_t b : breaks) cls += b < sk;
  return cls;
}

inline bool same_scale(PyObject* a, PyObject* b) {
  if (a == Py_None || b == Py_None) return a == b;
  return PyFloat_AS_DOUBLE(a) == PyFloat_AS_DOUBLE(b);  // as the key's float compares (a NaN never equal)
}

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

// Two requested backends (exact str: what a memo keeps) equal.
inline bool same_backend(PyObject* a, PyObject* b) {
  return a == b || (PyUnicode_CheckExact(a) && PyUnicode_CheckExact(b) && PyUnicode_Compare(a, b) == 0);
}

// One per process (lean.cpp's memo(), never destroyed: no teardown after the interpreter is gone); the GIL guards it.
class Memo {
 public:
  // The route (borrowed) of the entry whose facts equal f, filled from `choices` at its present version; nullptr
  // where none is.
  PyObject* find(PyObject* choices, const Facts& f) const {
    const TableStamp now = TableStamp::of(choices);
    if (!now.valid() || !PyUnicode_CheckExact(f.req)) return nullptr;
    for (const Entry& e : entries_) {
      if (e.route != nullptr && e.stamp == now && same(e, f)) return e.route;
    }
    return nullptr;
  }

  // Remembers route (a Lean tuple) for facts f, learnt in `choices` under the length breaks `breaks` (Sq's).
  void fill(PyObject* choices, const Facts& f, std::vector<int64_t> breaks, PyObject* route) {
    const TableStamp now = TableStamp::of(choices);
    if (!now.valid() || !PyUnicode_CheckExact(f.req)) return;
    Entry& e = entries_[next_];
    next_ = (next_ + 1) % entries_.size();
    Py_XSETREF(e.req, Py_NewRef(f.req));
    Py_XSETREF(e.scale, Py_NewRef(f.scale));
    Py_XSETREF(e.route, Py_NewRef(route));
    e.stamp = now;
    e.dt = f.dt;
    std::copy(f.q, f.q + 4, e.q);
    std::copy(f.mdims, f.mdims + 3, e.mdims);
    e.kh = f.kh, e.vd = f.vd, e.sk = f.sk;
    e.masked = f.masked, e.causal = f.causal, e.records = f.records, e.one_thread = f.one_thread;
    e.cls = f.records ? -1 - f.sk : length_class_of(breaks, f.sk);
    e.breaks = std::move(breaks);
  }

 private:
  struct Entry {
    PyObject *req = nullptr, *scale = nullptr, *route = nullptr;  // strong references
    TableStamp stamp;
    c10::ScalarType dt = c10::ScalarType::Float;
    int64_t q[4] = {0, 0, 0, 0}, kh = 0, vd = 0, sk = 0, mdims[3] = {0, 0, 0}, cls = 0;
    bool masked = false, causal = false, records = false, one_thread = false;
    std::vector<int64_t> breaks;  // length_breaks(q[2]) when filled: the class of another key length
  };

  static bool same(const Entry& e, const Facts& f) {
    if (!(e.dt == f.dt && std::equal(f.q, f.q + 4, e.q) && e.kh == f.kh && e.vd == f.vd && e.masked == f.masked &&
          e.causal == f.causal && e.records == f.records && e.one_thread == f.one_thread &&
          (!f.masked || std::equal(f.mdims, f.mdims + 3, e.mdims)) && same_scale(e.scale, f.scale))) {
      return false;
    }
    if (f.records ? e.sk != f.sk : e.cls != length_class_of(e.breaks, f.sk)) return false;
    return same_backend(e.req, f.req);
  }

  std::array<Entry, 4> entries_;  // a model's few kinds of call (a step's layers share one)
  size_t next_ = 0;
};

}  // namespace fastattn::lean
