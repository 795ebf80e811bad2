// Python bindings of the emulated CUDA kernels (tests/test_cuda_emulated.py builds this with cpp_extension.load).
#include <torch/extension.h>

#include "emu.h"
#include "harness.h"  // the harness entry points bound below
#include "cuda/primitives.cuh"

// Kernels with planted bugs of each class the emulator must catch (tests/test_cuda_emulated.py runs them).
// In fastattn::cuda so that their __shared__ statics are found and poisoned like the real kernels'.
namespace fastattn {
namespace cuda {
namespace emu_selftest {
__global__ void divergent_shuffle(float* out) {
  float x = threadIdx.x;
  if ((threadIdx.x & 31) < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);  // half the warp shuffles
  out[threadIdx.x] = x;
}
__global__ void partial_barrier(float* out) {
  if (threadIdx.x < 64) __syncthreads();  // warps 2 and 3 skip the barrier
  out[threadIdx.x] = 1.f;
}
__global__ void read_unwritten_shared(float* out) {
  __shared__ float s[128];
  if (threadIdx.x < 64) s[threadIdx.x] = 1.f;  // half written
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];  // the other half reads poison (NaN)
}
__global__ void cp_async_outside(float* out, const float* src) {
  FA_DYN_SMEM(smem);
  cp_async16(smem_u32(smem + 16 * threadIdx.x), src + 4 * threadIdx.x, true);  // src holds 128 floats: 4x too few
  cp_async_commit();
  cp_async_wait<0>();
  out[threadIdx.x] = 0.f;
}
__global__ void missing_wait(float* out, const float* src) {
  FA_DYN_SMEM(smem);
  float* s = reinterpret_cast<float*>(smem);
  if (threadIdx.x < 32) cp_async16(smem_u32(s + 4 * threadIdx.x), src + 4 * threadIdx.x, true);
  cp_async_commit();
  __syncthreads();  // no cp_async_wait<0>() before it: the copies may not have landed
  out[threadIdx.x] = s[threadIdx.x];
}
}  // namespace emu_selftest
}  // namespace cuda
}  // namespace fastattn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("decode_fwd", &fastattn::emu_harness::decode_fwd_emu,
        "decode_fwd's CUDA kernels run by the CPU emulator; same arguments as torch.ops.fastattn.decode_fwd, plus the "
        "SM count the split heuristic assumes (before kv_bhsd)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens_k"), py::arg("block_table"),
        py::arg("cache_batch_idx"), py::arg("scale"), py::arg("window_left"), py::arg("window_right"),
        py::arg("softcap"), py::arg("alibi_slopes"), py::arg("num_splits"), py::arg("sms") = 132,
        py::arg("kv_bhsd") = false);
  m.def("fwd", &fastattn::emu_harness::fwd_emu,
        "fastattn::fwd's CUDA kernel run by the CPU emulator (fp16/bf16, no bias/softcap/alibi, like the CUDA op)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("window_left"),
        py::arg("window_right"), py::arg("bottom_right"), py::arg("dropout_p"), py::arg("seed"), py::arg("offset"),
        py::arg("q_start") = py::none(), py::arg("k_start") = py::none(), py::arg("out_fp32") = false,
        py::arg("head_start") = 0);
  m.def("bwd", &fastattn::emu_harness::bwd_emu, "fastattn::bwd's CUDA kernels run by the CPU emulator",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("scale"), py::arg("window_left"), py::arg("window_right"), py::arg("bottom_right"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("offset"), py::arg("q_start") = py::none(),
        py::arg("k_start") = py::none(), py::arg("head_start") = 0);
  m.def("bwd_acc", &fastattn::emu_harness::bwd_acc_emu,
        "fastattn::bwd_acc's CUDA kernels run by the CPU emulator: adds the fp32 gradients into dq_acc/dk_acc/dv_acc",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("scale"), py::arg("window_left"), py::arg("window_right"), py::arg("bottom_right"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("offset"), py::arg("q_start"), py::arg("k_start"),
        py::arg("dq_acc"), py::arg("dk_acc"), py::arg("dv_acc"), py::arg("head_start") = 0);
  m.def("selftest", [](const std::string& name) {
    namespace st = fastattn::cuda::emu_selftest;
    at::Tensor out = at::full({128}, -1.f), src = at::arange(128, at::kFloat);
    emu::clear_globals();
    emu::add_global(src.data_ptr(), src.nbytes());
    if (name == "divergent_shuffle") emu::launch(dim3(1), dim3(128), 0, st::divergent_shuffle, out.data_ptr<float>());
    else if (name == "partial_barrier") emu::launch(dim3(1), dim3(128), 0, st::partial_barrier, out.data_ptr<float>());
    else if (name == "read_unwritten_shared")
      emu::launch(dim3(2), dim3(128), 0, st::read_unwritten_shared, out.data_ptr<float>());
    else if (name == "cp_async_outside")
      emu::launch(dim3(1), dim3(128), 2048, st::cp_async_outside, out.data_ptr<float>(), src.data_ptr<float>());
    else if (name == "missing_wait")
      emu::launch(dim3(1), dim3(128), 512, st::missing_wait, out.data_ptr<float>(), src.data_ptr<float>());
    else throw std::invalid_argument("unknown selftest " + name);
    return out;
  }, "runs a kernel with a planted bug (divergent_shuffle, partial_barrier, read_unwritten_shared, "
     "cp_async_outside, missing_wait); returns its output or raises the emulator's error");
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
