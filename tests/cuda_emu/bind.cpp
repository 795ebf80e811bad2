// Python bindings of the emulated CUDA kernels (tests/test_cuda_emulated.py builds this with cpp_extension.load).
#include <torch/extension.h>

#include "emu.h"

namespace fastattn {
namespace emu_harness {
std::tuple<at::Tensor, at::Tensor> decode_fwd_emu(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& seqlens_k,
                                                  const std::optional<at::Tensor>& block_table,
                                                  const std::optional<at::Tensor>& cache_batch_idx, double scale,
                                                  int64_t window_left, int64_t window_right, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits,
                                                  int64_t sms);
}  // namespace emu_harness
}  // namespace fastattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("decode_fwd", &fastattn::emu_harness::decode_fwd_emu,
        "decode_fwd's CUDA kernels run by the CPU emulator; same arguments as torch.ops.fastattn.decode_fwd, plus the "
        "SM count the split heuristic assumes",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens_k"), py::arg("block_table"),
        py::arg("cache_batch_idx"), py::arg("scale"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("alibi_slopes"), py::arg("num_splits"), py::arg("sms") = 132);
  m.def("set_options", [](bool reverse_warps, bool delay_copies) {
    emu::options().reverse_warps = reverse_warps;
    emu::options().delay_copies = delay_copies;
  }, py::arg("reverse_warps") = false, py::arg("delay_copies") = false);
  m.def("stats", [] {
    const emu::Stats& s = emu::stats();
    return py::dict(py::arg("launches") = s.launches, py::arg("blocks") = s.blocks, py::arg("warp_ops") = s.warp_ops,
                    py::arg("barriers") = s.barriers, py::arg("copies") = s.copies);
  });
  m.def("shared_statics", [] { return emu::shared_static_count(); },
        "number of __shared__ statics found in the symbol table (poisoned before every block)");
}
