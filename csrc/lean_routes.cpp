// The learnt routes' op calls (fastattn/ops.py decode_runner, cache_runner, attention_runner; backends/sdpa.py's
// hand-over): fastattn::decode_fwd, fastattn::fwd and torch's own SDPA with every argument that a route fixes bound
// once, the first two called through the dispatcher's typed entry.
//
// Why: calling torch.ops.fastattn.<op>.default from Python parses its 14-22 arguments against the schema into a
// boxed stack on every call: ~2.5-3 us a call (one thread, Intel Xeon, 2026-12-05), as long as a 12-head one-key
// decode step's whole kernel and ~40% of PyTorch's own SDPA call at that size. Here one C++ call with the tensors of
// the call: the same dispatcher path from its top (Python dispatch modes, the profiler's record, decode_fwd's
// Autograd fallback and fwd's guard below Autograd as the Python runners had), without the parsing.
// torch.ops also consults torch-function modes; the lean keys refuse calls while one is active (fastattn/lean.py), so
// such a mode keeps seeing the ops through the full path.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <tuple>

namespace fastattn::lean {
namespace {

using OptTensor = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;

// The schemas' C++ signatures (csrc/ops.cpp).
using DecodeSig = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                       const OptTensor&, double, int64_t, int64_t, double, const OptTensor&, int64_t, bool,
                       const OptTensor&);
using FwdSig = Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                    const OptTensor&, c10::SymInt, c10::SymInt, double, int64_t, int64_t, bool, double,
                    const OptTensor&, double, c10::SymInt, c10::SymInt, bool, const OptTensor&, const OptTensor&,
                    bool, int64_t);

const c10::TypedOperatorHandle<DecodeSig>& decode_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::decode_fwd", "").typed<DecodeSig>();
  return op;
}

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::fwd", "").typed<FwdSig>();
  return op;
}

// A lean call's 4-D bool or q-dtype mask as the bias the ops take, expanded to (B, Hq, Sq, Sk) (ops._lean_bias, which
// the Python routes use: 0 where a bool mask is True, -inf where False, the same values as the full path's).
at::Tensor lean_bias(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask) {
  const at::Tensor bias =
      mask.scalar_type() == at::kBool
          ? at::where(mask, at::zeros({}, q.options()),
                      at::full({}, -std::numeric_limits<double>::infinity(), q.options()))
          : mask;
  return bias.expand({q.size(0), q.size(1), q.size(2), k.size(2)});  // (B|1, Hq|1, Sq|1, Sk|1) -> (B, Hq, Sq, Sk)
}

// decode_fwd on a dense cache without block_table, cache_batch_idx or alibi (what the lean routes take).
struct DecodeRoute {
  double scale, softcap;
  int64_t window_left, window_right, num_splits;
  bool kv_bhsd;

  // The SDPA surface's route: out of (q, k, v[, bias]) in SDPA's layout, every key visible (seqlens_k None).
  at::Tensor out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& bias) const {
    return std::get<0>(call(q, k, v, std::nullopt, bias));
  }

  // The same with a lean call's mask (lean_bias).
  at::Tensor out_masked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) const {
    return out(q, k, v, lean_bias(q, k, mask));
  }

  // flash_attn_with_kvcache's route: (out, lse) of (q, k_cache, v_cache, seqlens_k).
  Pair call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& seqlens_k,
            const OptTensor& bias) const {
    return decode_op().call(q, k, v, seqlens_k, std::nullopt, std::nullopt, scale, window_left, window_right,
                            softcap, std::nullopt, num_splits, kv_bhsd, bias);
  }
};

// fwd on a plain inference call (no varlen, alibi, dropout or block offsets), below the Autograd key as
// ops.cpp_attention runs calls that record no gradient.
struct FwdRoute {
  int64_t max_seqlen_q, max_seqlen_k, window_left, window_right, head_start;
  double scale, softcap;
  bool bottom_right, deterministic, out_fp32;

  at::Tensor out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& bias) const {
    at::AutoDispatchBelowAutograd below;
    return std::get<0>(fwd_op().call(q, k, v, bias, std::nullopt, std::nullopt, c10::SymInt(max_seqlen_q),
                                     c10::SymInt(max_seqlen_k), scale, window_left, window_right, bottom_right,
                                     softcap, std::nullopt, 0.0, c10::SymInt(0), c10::SymInt(0), deterministic,
                                     std::nullopt, std::nullopt, out_fp32, head_start));
  }

  at::Tensor out_masked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) const {
    return out(q, k, v, lean_bias(q, k, mask));
  }
};

// PyTorch's own SDPA (the hand-over routes, fastattn/backends/sdpa.py): what torch.nn.functional's binding calls
// after parsing its arguments, without the parsing or the Python lambda around it.
struct SdpaRoute {
  bool is_causal, enable_gqa;
  std::optional<double> scale;

  at::Tensor out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask) const {
    return at::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, enable_gqa);
  }
};

}  // namespace

void add_routes(pybind11::module_& m) {
  namespace py = pybind11;
  // The GIL is released around the op, as torch.ops does (a Python mode or kernel below takes it back).
  py::class_<DecodeRoute>(m, "DecodeRoute", "fastattn::decode_fwd with a lean route's fixed arguments bound")
      .def(py::init([](double scale, int64_t wl, int64_t wr, double softcap, int64_t splits, bool kv_bhsd) {
             return DecodeRoute{scale, softcap, wl, wr, splits, kv_bhsd};
           }),
           py::arg("scale"), py::arg("window_left"), py::arg("window_right"), py::arg("softcap"),
           py::arg("num_splits"), py::arg("kv_bhsd"))
      .def("out", &DecodeRoute::out, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_bias") = py::none(),
           py::call_guard<py::gil_scoped_release>(), "out (B, Hq, Sq, Dv) of (q, k, v[, attn_bias]), SDPA's layout")
      .def("out_masked", &DecodeRoute::out_masked, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask"),
           py::call_guard<py::gil_scoped_release>(), "out of (q, k, v, a lean call's 4-D bool or q-dtype mask)")
      .def("call", &DecodeRoute::call, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens_k"),
           py::arg("attn_bias") = py::none(), py::call_guard<py::gil_scoped_release>(), "(out, lse)");
  py::class_<FwdRoute>(m, "FwdRoute", "fastattn::fwd with a lean route's fixed arguments bound, below Autograd")
      .def(py::init([](int64_t max_q, int64_t max_k, double scale, int64_t wl, int64_t wr, bool bottom_right,
                       double softcap, bool deterministic, bool out_fp32, int64_t head_start) {
             return FwdRoute{max_q, max_k, wl, wr, head_start, scale, softcap, bottom_right, deterministic, out_fp32};
           }),
           py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("window_left"),
           py::arg("window_right"), py::arg("bottom_right"), py::arg("softcap"), py::arg("deterministic"),
           py::arg("out_fp32"), py::arg("head_start"))
      .def("out", &FwdRoute::out, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_bias") = py::none(),
           py::call_guard<py::gil_scoped_release>(), "out (B, H, Sq, Dv) of (q, k, v[, attn_bias])")
      .def("out_masked", &FwdRoute::out_masked, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask"),
           py::call_guard<py::gil_scoped_release>(), "out of (q, k, v, a lean call's 4-D bool or q-dtype mask)");
  py::class_<SdpaRoute>(m, "SdpaRoute", "torch's scaled_dot_product_attention with a lean route's flags bound")
      .def(py::init([](bool is_causal, std::optional<double> scale, bool enable_gqa) {
             return SdpaRoute{is_causal, enable_gqa, scale};
           }),
           py::arg("is_causal"), py::arg("scale"), py::arg("enable_gqa"))
      .def("out", &SdpaRoute::out, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask") = py::none(),
           py::call_guard<py::gil_scoped_release>(), "torch's SDPA of (q, k, v[, attn_mask])");
}

}  // namespace fastattn::lean
