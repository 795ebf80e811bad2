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
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
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

using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, c10::SymInt, c10::SymInt, double, int64_t, int64_t, bool,
    double, const OptTensor&, double, c10::SymInt, c10::SymInt, bool, const OptTensor&, const OptTensor&, int64_t);

const c10::TypedOperatorHandle<DecodeSig>& decode_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::decode_fwd", "").typed<DecodeSig>();
  return op;
}

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastattn::bwd", "").typed<BwdSig>();
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

// fwd on a plain call (no varlen, alibi, dropout or block offsets), below the Autograd key as ops.cpp_attention runs
// it. With `grad` set, a call whose q, k or v records a gradient runs through FwdGrad (below), the C++ twin of
// ops.eager_function's autograd.Function: the same saved tensors, the same bwd call, once differentiable.
struct FwdRoute {
  int64_t max_seqlen_q, max_seqlen_k, window_left, window_right, head_start;
  double scale, softcap;
  bool bottom_right, deterministic, out_fp32, grad;

  Pair call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& bias) const {
    at::AutoDispatchBelowAutograd below;
    return fwd_op().call(q, k, v, bias, std::nullopt, std::nullopt, c10::SymInt(max_seqlen_q),
                         c10::SymInt(max_seqlen_k), scale, window_left, window_right, bottom_right, softcap,
                         std::nullopt, 0.0, c10::SymInt(0), c10::SymInt(0), deterministic, std::nullopt, std::nullopt,
                         out_fp32, head_start);
  }

  // (out, lse); lse records no gradient (as ops.autograd_pair marks it).
  Pair pair(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& bias) const;

  at::Tensor out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& bias) const {
    return std::get<0>(pair(q, k, v, bias));
  }

  at::Tensor out_masked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) const {
    return out(q, k, v, lean_bias(q, k, mask));
  }
};

// The autograd node of a FwdRoute call that records a gradient. Why in C++: the Python autograd.Function's apply,
// setup_context and backward cost ~60 us a forward+backward over PyTorch's own SDPA's (one thread, Intel Xeon), which
// made small fp32 training calls slower on the cpu kernels than on torch's. The route's fields ride in saved_data.
struct FwdGrad : torch::autograd::Function<FwdGrad> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, const OptTensor& bias,
                                                const FwdRoute& route) {
    auto [out, lse] = route.call(q, k, v, bias);
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // lse's gradient stays undefined, not a tensor of zeros
    ctx->save_for_backward({q, k, v, out, lse, bias.value_or(at::Tensor())});
    ctx->saved_data["i"] = std::vector<int64_t>{route.max_seqlen_q, route.max_seqlen_k, route.window_left,
                                                route.window_right, route.head_start, route.bottom_right,
                                                route.deterministic};
    ctx->saved_data["f"] = std::vector<double>{route.scale, route.softcap};
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();  // q, k, v, out, lse, bias (undefined: none)
    const auto i = ctx->saved_data["i"].toIntVector();
    const auto f = ctx->saved_data["f"].toDoubleVector();
    const at::Tensor& q = saved[0];
    const OptTensor bias = saved[5].defined() ? OptTensor(saved[5]) : std::nullopt;
    const bool record = at::GradMode::is_enabled() && grads[0].requires_grad();  // a double backward's graph
    at::Tensor dq, dk, dv;
    {
      at::AutoGradMode no_grad(false);
      at::AutoDispatchBelowAutograd below;
      std::tie(dq, dk, dv) = bwd_op().call(
          grads[0].to(q.scalar_type()), q, saved[1], saved[2], saved[3], saved[4], bias, std::nullopt, std::nullopt,
          c10::SymInt(i[0]), c10::SymInt(i[1]), f[0], i[2], i[3], i[5] != 0, f[1], std::nullopt, 0.0, c10::SymInt(0),
          c10::SymInt(0), i[6] != 0, std::nullopt, std::nullopt, i[4]);
    }
    if (record) {  // as torch.autograd.function.once_differentiable: differentiating these raises
      auto error = std::make_shared<torch::autograd::DelayedError>(
          "trying to differentiate twice a function that was marked with @once_differentiable", 3);
      auto wrapped = (*error)({dq.detach().requires_grad_(true), dk.detach().requires_grad_(true),
                               dv.detach().requires_grad_(true)});
      dq = wrapped[0];
      dk = wrapped[1];
      dv = wrapped[2];
    }
    if (plant_grad_swap() && dk.sizes() == dv.sizes()) std::swap(dk, dv);
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }

  // FASTATTN_CPU_PLANT=grad_swap (tests only, read once): backward returns dK as dV and dV as dK, a bug the
  // correctness matrix must catch on every cell this node records (tests/test_eager_autograd.py).
  static bool plant_grad_swap() {
    static const bool on = [] {
      const char* e = std::getenv("FASTATTN_CPU_PLANT");
      return e != nullptr && std::strcmp(e, "grad_swap") == 0;
    }();
    return on;
  }
};

Pair FwdRoute::pair(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& bias) const {
  if (grad && at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    auto outs = FwdGrad::apply(q, k, v, bias, *this);
    return {outs[0], outs[1]};
  }
  return call(q, k, v, bias);
}

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
  py::class_<FwdRoute>(m, "FwdRoute",
                      "fastattn::fwd with a lean route's fixed arguments bound, below Autograd (grad: a call that "
                      "records a gradient runs through a C++ autograd node whose backward is fastattn::bwd)")
      .def(py::init([](int64_t max_q, int64_t max_k, double scale, int64_t wl, int64_t wr, bool bottom_right,
                       double softcap, bool deterministic, bool out_fp32, int64_t head_start, bool grad) {
             TORCH_CHECK(!(grad && out_fp32), "fastattn: FwdRoute records no gradient of an fp32 output");
             return FwdRoute{max_q, max_k, wl, wr, head_start, scale, softcap, bottom_right, deterministic, out_fp32,
                             grad};
           }),
           py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("window_left"),
           py::arg("window_right"), py::arg("bottom_right"), py::arg("softcap"), py::arg("deterministic"),
           py::arg("out_fp32"), py::arg("head_start"), py::arg("grad") = false)
      .def("out", &FwdRoute::out, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_bias") = py::none(),
           py::call_guard<py::gil_scoped_release>(), "out (B, H, Sq, Dv) of (q, k, v[, attn_bias])")
      .def("out_masked", &FwdRoute::out_masked, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask"),
           py::call_guard<py::gil_scoped_release>(), "out of (q, k, v, a lean call's 4-D bool or q-dtype mask)")
      .def("pair", &FwdRoute::pair, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_bias") = py::none(),
           py::call_guard<py::gil_scoped_release>(), "(out, lse) of (q, k, v[, attn_bias]); lse records no gradient");
  py::class_<SdpaRoute>(m, "SdpaRoute", "torch's scaled_dot_product_attention with a lean route's flags bound")
      .def(py::init([](bool is_causal, std::optional<double> scale, bool enable_gqa) {
             return SdpaRoute{is_causal, enable_gqa, scale};
           }),
           py::arg("is_causal"), py::arg("scale"), py::arg("enable_gqa"))
      .def("out", &SdpaRoute::out, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn_mask") = py::none(),
           py::call_guard<py::gil_scoped_release>(), "torch's SDPA of (q, k, v[, attn_mask])");
}

}  // namespace fastattn::lean
