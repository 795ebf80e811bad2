// CUDA's built-in variables and intrinsics as the kernels (csrc/cuda) name them, each over the emulator's runtime
// (emu.h, which includes this file after its namespace; either header may be included first).
#pragma once
#include "emu.h"

// ---------------------------------------------------------------- built-in variables and intrinsics
#define threadIdx (::emu::rt().cur->tid)
#define blockIdx (::emu::rt().block_idx)
#define blockDim (::emu::rt().block_dim)
#define gridDim (::emu::rt().grid_dim)

inline void __syncthreads() {
  emu::Thread* t = emu::rt().cur;
  t->state = emu::State::kBarrier;
  emu::yield_to_scheduler();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_collective(emu::Op::kSyncWarp, mask); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a register-sized value");
  if (width != 32) emu::fail("__shfl_xor_sync: only width 32 is emulated");
  emu::Thread* t = emu::rt().cur;
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  t->in[0] = bits;
  t->in[1] = static_cast<uint64_t>(lane_mask);
  emu::warp_collective(emu::Op::kShflXor, mask);
  T r;
  std::memcpy(&r, &t->out[0], sizeof(T));
  return r;
}

template <typename T>
inline T __ldg(const T* p) {
  emu::check_global(p, sizeof(T), "__ldg");
  return *p;
}

inline size_t __cvta_generic_to_shared(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(emu::g_dyn_smem);
  if (a < base || a >= base + emu::kDynSmemMax) {
    emu::fail("__cvta_generic_to_shared of an address outside dynamic shared memory");
  }
  return a - base;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __expf(float x) { return expf(x); }

// CUDA's integer min/max overloads (device code calls them unqualified).
template <typename A, typename B, typename = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(a) : C(b);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) > C(b) ? C(a) : C(b);
}
