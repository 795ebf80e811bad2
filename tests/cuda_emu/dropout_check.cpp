// fastattn's CUDA dropout kernels (fwd, delta, dK/dV, dQ with kDropout) executed by the CPU emulator (emu.h), against
// the CPU kernels' Dropout mask (csrc/cpu/rng.h) and a float64 forward/backward that uses that mask. Torch-free:
// tests/test_cuda_dropout_emulated.py builds it with g++ and runs it. V = identity (Dv >= Sk) makes out[i][j] =
// P_ij * keep_ij / (1 - p), so the forward's keep mask is read off out bitwise; the gradients then show whether the
// dK/dV kernel (transposed tiles) and the dQ kernel regenerate it. With any argument ("control") the backward gets
// a different Philox offset and the dropout cases must FAIL: the check can tell a wrong mask.
#include "emu.h"
#include "cuda/fwd_kernel.cuh"
#include "cuda/bwd_kernel.cuh"
#include "cpu/rng.h"

#include <cmath>
#include <random>

using namespace fastattn;
using T = __half;

struct Case { int B, Hq, Hkv, Sq, Sk, D, Dv; int wl, wr; float p; uint64_t seed, off, bwd_off; };

template <int kD, bool kDrop = true>
int run(const Case& c) {
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, Sq = c.Sq, Sk = c.Sk, D = c.D, Dv = c.Dv, G = Hq / Hkv;
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](std::vector<T>& x, size_t n, float s) { x.resize(n); for (auto& e : x) e = __float2half(s * nd(rng)); };
  std::vector<T> q, k, v, dout, o(size_t(B) * Hq * Sq * Dv), dq(size_t(B) * Hq * Sq * D), dk(size_t(B) * Hkv * Sk * D),
      dv(size_t(B) * Hkv * Sk * Dv);
  fill(q, size_t(B) * Hq * Sq * D, 0.5f);
  fill(k, size_t(B) * Hkv * Sk * D, 0.5f);
  fill(v, size_t(B) * Hkv * Sk * Dv, 1.f);
  for (int b = 0; b < B; ++b) for (int h = 0; h < Hkv; ++h) for (int j = 0; j < Sk; ++j)  // V = I: out exposes the mask
    for (int d = 0; d < Dv; ++d) v[((size_t(b) * Hkv + h) * Sk + j) * Dv + d] = __float2half(d == j ? 1.f : 0.f);
  fill(dout, size_t(B) * Hq * Sq * Dv, 1.f);
  std::vector<float> lse(size_t(B) * Hq * Sq), delta(size_t(B) * Hq * Sq);
  auto ref = [](void* ptr, int H, int S, int Dd) { return cuda::TensorRef{ptr, int64_t(H) * S * Dd, int64_t(S) * Dd, Dd}; };
  const float scale = 1.f / std::sqrt(float(D));
  auto shape = [&](cuda::AttnShape& s) {
    s.batch = B; s.h = Hq; s.h_kv = Hkv; s.seqlen_q = Sq; s.seqlen_k = Sk; s.d = D; s.dv = Dv;
    s.cu_seqlens_q = s.cu_seqlens_k = nullptr; s.scale = scale; s.scale_log2 = scale * 1.4426950408889634f;
    s.window_left = c.wl; s.window_right = c.wr; s.bottom_right = false;
  };
  auto drop = [&](cuda::DropoutParams& d, uint64_t off) {
    d.rng = Philox::from_seed(c.seed, off); d.threshold = dropout_threshold(c.p); d.rescale = 1.f / (1.f - c.p);
  };
  cuda::FwdParams fp{};
  shape(fp); drop(fp.drop, c.off);
  fp.q = ref(q.data(), Hq, Sq, D); fp.k = ref(k.data(), Hkv, Sk, D); fp.v = ref(v.data(), Hkv, Sk, Dv);
  fp.o = ref(o.data(), Hq, Sq, Dv); fp.lse = lse.data(); fp.lse_batch_stride = int64_t(Hq) * Sq; fp.lse_head_stride = Sq;
  emu::clear_globals();
  for (auto* x : {&q, &k, &v}) emu::add_global(x->data(), x->size() * 2);
  cuda::launch_fwd<T, kD, kDrop>(fp, [&](auto kernel, dim3 grid, int threads, int smem) {  // run_fwd's geometry
    emu::launch(grid, dim3(threads), smem, kernel, fp);
    return cudaSuccess;
  });
  // Reference: mask from the CPU Dropout struct; float64 forward and backward.
  cpu::Dropout cd(c.seed, c.off, c.p);
  long mism = 0, kept = 0, vis_total = 0;
  double err_o = 0, max_o = 0, err_lse = 0;
  double err[3] = {0, 0, 0}, mx[3] = {0, 0, 0};
  std::vector<double> dl_ref(size_t(B) * Hq * Sq);
  std::vector<double> gq(size_t(B) * Hq * Sq * D, 0), gk(size_t(B) * Hkv * Sk * D, 0), gv(size_t(B) * Hkv * Sk * Dv, 0);
  auto H = [](T x) { return double(__half2float(x)); };
  for (int b = 0; b < B; ++b) for (int h = 0; h < Hq; ++h) {
    const int hk = h / G;
    for (int i = 0; i < Sq; ++i) {
      std::vector<float> ones(Sk, 1.f);
      cd.apply_row(ones.data(), b, h, i, 0, Sk);
      std::vector<double> s(Sk), P(Sk, 0.0), Z(Sk);
      double m = -INFINITY;
      std::vector<bool> vis(Sk);
      for (int j = 0; j < Sk; ++j) {
        vis[j] = (c.wl < 0 || j >= i - c.wl) && (c.wr < 0 || j <= i + c.wr);
        double acc = 0;
        for (int d = 0; d < D; ++d) acc += H(q[((size_t(b) * Hq + h) * Sq + i) * D + d]) * H(k[((size_t(b) * Hkv + hk) * Sk + j) * D + d]);
        s[j] = acc * scale;
        if (vis[j]) m = std::max(m, s[j]);
        Z[j] = ones[j];  // keep / (1 - p)
      }
      double l = 0;
      for (int j = 0; j < Sk; ++j) if (vis[j]) { P[j] = std::exp(s[j] - m); l += P[j]; }
      for (int j = 0; j < Sk; ++j) P[j] /= l;
      err_lse = std::max(err_lse, std::abs(double(lse[(size_t(b) * Hq + h) * Sq + i]) - (m + std::log(l))));
      const size_t orow = ((size_t(b) * Hq + h) * Sq + i) * Dv;
      for (int j = 0; j < Sk; ++j) {  // V = I: out[i][j] = P_ij Z_ij
        const bool keep_ref = ones[j] != 0.f, keep_cuda = __half2float(o[orow + j]) != 0.f;
        if (vis[j]) { ++vis_total; kept += keep_ref; if (keep_ref != keep_cuda) ++mism; }
        else if (keep_cuda) ++mism;
        const double oref = P[j] * Z[j];
        err_o = std::max(err_o, std::abs(H(o[orow + j]) - oref));
        max_o = std::max(max_o, std::abs(oref));
      }
      // backward: dV += (P Z)^T dO; dP = dO V^T; dS = P (Z dP - delta); delta = sum_j P Z dP
      std::vector<double> dP(Sk);
      for (int j = 0; j < Sk; ++j) {
        double acc = 0;
        for (int d = 0; d < Dv; ++d) acc += H(dout[orow + d]) * H(v[((size_t(b) * Hkv + hk) * Sk + j) * Dv + d]);
        dP[j] = acc;
      }
      double dl = 0;
      for (int j = 0; j < Sk; ++j) dl += P[j] * Z[j] * dP[j];
      dl_ref[(size_t(b) * Hq + h) * Sq + i] = dl;
      for (int j = 0; j < Sk; ++j) {
        const double dS = P[j] * (Z[j] * dP[j] - dl);
        for (int d = 0; d < Dv; ++d) gv[((size_t(b) * Hkv + hk) * Sk + j) * Dv + d] += P[j] * Z[j] * H(dout[orow + d]);
        for (int d = 0; d < D; ++d) {
          gq[((size_t(b) * Hq + h) * Sq + i) * D + d] += scale * dS * H(k[((size_t(b) * Hkv + hk) * Sk + j) * D + d]);
          gk[((size_t(b) * Hkv + hk) * Sk + j) * D + d] += scale * dS * H(q[((size_t(b) * Hq + h) * Sq + i) * D + d]);
        }
      }
    }
  }
  // Backward kernels (launch_bwd: the geometry of run_bwd), dropout regenerated with c.bwd_off.
  cuda::BwdParams bp{};
  shape(bp); drop(bp.drop, c.bwd_off);
  bp.q = fp.q; bp.k = fp.k; bp.v = fp.v; bp.o = fp.o; bp.dout = ref(dout.data(), Hq, Sq, Dv);
  bp.grad_q = ref(dq.data(), Hq, Sq, D); bp.grad_k = ref(dk.data(), Hkv, Sk, D); bp.grad_v = ref(dv.data(), Hkv, Sk, Dv);
  bp.lse = lse.data(); bp.delta = delta.data(); bp.lse_batch_stride = fp.lse_batch_stride; bp.lse_head_stride = Sq;
  bp.rows_q_total = Sq; bp.batch_total = B;
  emu::clear_globals();
  for (auto* x : {&q, &k, &v, &o, &dout}) emu::add_global(x->data(), x->size() * 2);
  emu::add_global(lse.data(), lse.size() * 4);
  emu::add_global(delta.data(), delta.size() * 4);
  cuda::launch_bwd<T, kD, kDrop>(bp, [&](auto kernel, dim3 grid, int threads, int smem) {
    emu::launch(grid, dim3(threads), smem, kernel, bp);
    return cudaSuccess;
  });
  auto cmp = [&](int w, const std::vector<T>& g, const std::vector<double>& r) {
    for (size_t x = 0; x < r.size(); ++x) { err[w] = std::max(err[w], std::abs(H(g[x]) - r[x])); mx[w] = std::max(mx[w], std::abs(r[x])); }
  };
  double derr = 0, dmax = 0;
  for (size_t x = 0; x < dl_ref.size(); ++x) { derr = std::max(derr, std::abs(delta[x] - dl_ref[x])); dmax = std::max(dmax, std::abs(dl_ref[x])); }
  cmp(0, dq, gq); cmp(1, dk, gk); cmp(2, dv, gv);
  std::printf("kD=%d B=%d Hq=%d Hkv=%d Sq=%d Sk=%d D=%d Dv=%d win=(%d,%d) p=%.2f bwd_off%s: mask mismatches %ld / %ld "
              "visible (kept %.3f), out err %.2e (max %.2e), lse err %.2e, delta rel err %.2e, rel err dq %.2e dk %.2e dv %.2e\n",
              kD, B, Hq, Hkv, Sq, Sk, D, Dv, c.wl, c.wr, c.p, c.bwd_off == c.off ? "=fwd" : "!=fwd", mism, vis_total,
              double(kept) / vis_total, err_o, max_o, err_lse, derr / dmax, err[0] / mx[0], err[1] / mx[1], err[2] / mx[2]);
  const bool ok = mism == 0 && err_o < 2e-3 * max_o && err_lse < 1e-4 && derr / dmax < 2e-3 && err[0] / mx[0] < 1e-2 &&
                  err[1] / mx[1] < 1e-2 && err[2] / mx[2] < 1e-2;
  std::printf("  -> %s\n", ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  int bad = 0;
  const bool control = argc > 1;  // regenerate the backward with another offset: the dropout cases must FAIL
  auto C = [&](Case c) { if (control) c.bwd_off = c.off + 1; return c; };
  for (int sched = 0; sched < 2; ++sched) {  // in order, then warps reversed with late-landing cp.async copies
    emu::options().reverse_warps = emu::options().delay_copies = sched == 1;
    std::printf("schedule: %s\n", sched ? "reverse_warps, delay_copies" : "default");
    bad += run<64, false>(C({2, 4, 2, 70, 37, 16, 40, -1, -1, 0.0f, 42, 7, 7}));  // plain kernels, same harness
    bad += run<64>(C({2, 4, 2, 70, 37, 16, 40, -1, -1, 0.3f, 42, 7, 7}));          // GQA, ragged tiles
    bad += run<64>(C({1, 2, 1, 130, 61, 24, 64, -1, 0, 0.5f, 5, 9, 9}));           // causal, 3 query tiles
    bad += run<128>(C({1, 2, 2, 40, 100, 32, 104, -1, -1, 0.25f, 1ull << 61, 3, 3}));
    bad += run<256>(C({1, 2, 1, 35, 200, 64, 200, 30, 10, 0.4f, 11, 12, 12}));     // sliding window, split dK/dV
  }
  std::printf("%d failing cases\n", bad);
  return bad;
}
