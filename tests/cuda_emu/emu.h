// Host emulation of the CUDA features fastattn's kernels use, so that the exact kernel source (csrc/cuda) runs on
// the CPU under g++ and is compared with the float64 oracle (tests/test_cuda_emulated.py).
//
// Model. A launch runs the grid's blocks one after another. A block's threads are fibers (own stacks, cooperative
// switches, single OS thread: deterministic). Warps run one at a time between block barriers: each lane runs until
// it reaches a warp collective (shuffle, ldmatrix, mma, __syncwarp), a __syncthreads or its end; when all 32 lanes
// wait at the same collective it executes, warp-wide, and the lanes resume. A lane missing from a collective
// (exited, at a barrier, at another collective) is a divergence error, as is a __syncthreads that some threads of
// the block never reach. Shared memory (__shared__ statics, found through the ELF symbol table, and the dynamic
// buffer) is filled with 0xFF bytes (NaN in fp32/fp16/bf16) before every block. ldmatrix and mma follow the PTX ISA
// fragment layouts (section "Matrix Fragments for mma.m16n8k16 with floating point type", and ldmatrix); mma
// multiplies in fp32 and accumulates in fp32 (products of 16-bit floats are exact in fp32; only the summation
// order differs from the tensor cores).
//
// Options (emu::options()): reverse_warps runs warps last to first (exposes missing __syncthreads between warps
// that write and read the same shared memory); delay_copies makes cp.async land only at the cp.async.wait_group
// that retires it (exposes reads of a stage before its wait).
#pragma once
#define FASTATTN_CUDA_EMU_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <elf.h>
#include <math.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------- keywords
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __shared__ static  // blocks run one at a time, so a static is what all threads of the running block share
#define __forceinline__ inline
#define __launch_bounds__(...)
#ifndef __restrict__
#define __restrict__ __restrict
#endif

namespace emu {

enum class State : uint8_t { kReady, kWarpOp, kBarrier, kDone, kFault };
enum class Op : uint8_t { kNone, kShflXor, kSyncWarp, kLdsm, kLdsmTrans, kMmaF16, kMmaBF16 };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kLdsm: return "ldmatrix.x4";
    case Op::kLdsmTrans: return "ldmatrix.x4.trans";
    case Op::kMmaF16: return "mma.m16n8k16.f16";
    case Op::kMmaBF16: return "mma.m16n8k16.bf16";
    default: return "?";
  }
}

struct Copy {
  uint32_t dst;
  const void* src;
  bool valid;
};

struct Thread {
  void* sp = nullptr;
  uint3 tid{};
  int linear = 0, lane = 0, warp = 0;
  State state = State::kReady;
  Op op = Op::kNone;
  uint32_t mask = 0;
  uint64_t in[10] = {};  // collective operands
  uint64_t out[4] = {};  // collective results
  std::vector<Copy> open;                  // cp.async not yet committed (delay_copies)
  std::vector<std::vector<Copy>> groups;   // committed, not yet retired (delay_copies)
};

struct Options {
  bool reverse_warps = false;
  bool delay_copies = false;
};

struct Stats {
  uint64_t launches = 0, blocks = 0, warp_ops = 0, barriers = 0, copies = 0;
};

struct Runtime {
  std::vector<Thread> threads;
  Thread* cur = nullptr;
  void* sched_sp = nullptr;
  uint3 block_idx{};
  dim3 grid_dim, block_dim;
  size_t dyn_bytes = 0;
  std::function<void()> body;
  std::string error;
  Options opt;
  Stats stats;
  std::vector<std::pair<uintptr_t, uintptr_t>> globals;  // readable global ranges [lo, hi)
  std::vector<std::pair<unsigned char*, size_t>> statics;  // __shared__ statics (poisoned per block)
  bool statics_found = false;
  bool in_fiber = false;  // running a thread (errors yield) rather than the scheduler (errors throw)
  unsigned char* stacks = nullptr;
  size_t stack_count = 0;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

constexpr size_t kDynSmemMax = 228 * 1024;  // sm_90's largest opt-in dynamic shared memory per block
alignas(128) inline unsigned char g_dyn_smem[kDynSmemMax];
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

inline Options& options() { return rt().opt; }
inline Stats& stats() { return rt().stats; }

// ---------------------------------------------------------------- fibers (x86-64 SysV: callee-saved registers)
extern "C" void emu_fiber_switch(void** save_sp, void* to_sp);
asm(R"(
  .pushsection .text
  .weak emu_fiber_switch
  .hidden emu_fiber_switch
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch
  .popsection
)");

inline void yield_to_scheduler() { emu_fiber_switch(&rt().cur->sp, rt().sched_sp); }

// Errors found inside a thread: recorded, and the thread never runs again; the launch throws.
[[noreturn]] inline void fail(const std::string& msg) {
  Runtime& r = rt();
  if (!r.in_fiber) {
    char where[96];
    std::snprintf(where, sizeof(where), " [block (%u,%u,%u)]", r.block_idx.x, r.block_idx.y, r.block_idx.z);
    throw std::runtime_error("CUDA emulation: " + msg + where);
  }
  if (r.error.empty()) {
    char where[160];
    std::snprintf(where, sizeof(where), " [block (%u,%u,%u) thread %d (warp %d lane %d)]", r.block_idx.x,
                  r.block_idx.y, r.block_idx.z, r.cur ? r.cur->linear : -1, r.cur ? r.cur->warp : -1,
                  r.cur ? r.cur->lane : -1);
    r.error = msg + where;
  }
  r.cur->state = State::kFault;
  yield_to_scheduler();
  __builtin_unreachable();
}

// ---------------------------------------------------------------- memory
inline unsigned char* smem_at(uint32_t addr, size_t bytes, size_t align) {
  Runtime& r = rt();
  if (addr % align != 0) {
    fail("shared address " + std::to_string(addr) + " not " + std::to_string(align) + "-byte aligned");
  }
  if (size_t(addr) + bytes > r.dyn_bytes) {
    fail("shared access [" + std::to_string(addr) + ", +" + std::to_string(bytes) + ") past the " +
         std::to_string(r.dyn_bytes) + " bytes of dynamic shared memory the launch requested");
  }
  return g_dyn_smem + addr;
}

inline void check_global(const void* p, size_t bytes, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (const auto& g : rt().globals) {
    if (a >= g.first && a + bytes <= g.second) return;
  }
  char buf[160];
  std::snprintf(buf, sizeof(buf), "%s reads %zu bytes at %p, outside every tensor passed to the launch", what, bytes,
                p);
  fail(buf);
}

// __shared__ statics: function-local statics of fastattn::cuda functions ("_ZZN8fastattn4cuda..."), read from
// this shared object's symbol table (GCC ignores section attributes on template statics, so no linker section).
inline void find_shared_statics() {
  Runtime& r = rt();
  if (r.statics_found) return;
  r.statics_found = true;
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&find_shared_statics), &info) || !info.dli_fname) return;
  FILE* f = std::fopen(info.dli_fname, "rb");
  if (!f) return;
  std::vector<unsigned char> img;
  unsigned char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) img.insert(img.end(), buf, buf + n);
  std::fclose(f);
  if (img.size() < sizeof(Elf64_Ehdr)) return;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(img.data());
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) return;
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(img.data() + eh->e_shoff);
  const char prefix[] = "_ZZN8fastattn4cuda";
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* sym = reinterpret_cast<const Elf64_Sym*>(img.data() + sh[i].sh_offset);
    const char* str = reinterpret_cast<const char*>(img.data() + sh[sh[i].sh_link].sh_offset);
    for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
      if (ELF64_ST_TYPE(sym[k].st_info) != STT_OBJECT || sym[k].st_size == 0 || sym[k].st_shndx == SHN_UNDEF) continue;
      if (std::strncmp(str + sym[k].st_name, prefix, sizeof(prefix) - 1) != 0) continue;
      r.statics.emplace_back(static_cast<unsigned char*>(info.dli_fbase) + sym[k].st_value, sym[k].st_size);
    }
  }
}

inline size_t shared_static_count() {
  find_shared_statics();
  return rt().statics.size();
}

inline void poison_shared() {
  Runtime& r = rt();
  std::memset(g_dyn_smem, 0xFF, r.dyn_bytes);
  for (auto& s : r.statics) std::memset(s.first, 0xFF, s.second);
}

// ---------------------------------------------------------------- collectives
// Deposits this lane's operands and waits for the warp; the scheduler executes the op once all lanes arrived.
inline void warp_collective(Op op, uint32_t mask) {
  Thread* t = rt().cur;
  t->op = op;
  t->mask = mask;
  t->state = State::kWarpOp;
  yield_to_scheduler();
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float f16_bits_to_float(uint16_t b) {
  __half_raw raw;
  raw.x = b;
  return __half2float(__half(raw));
}

// Executes the collective all lanes of warp `lanes` wait at (same op and mask checked by the caller).
inline void execute(Thread** lanes, Op op) {
  switch (op) {
    case Op::kSyncWarp:
      break;
    case Op::kShflXor: {
      uint64_t v[32];
      for (int l = 0; l < 32; ++l) v[l] = lanes[l]->in[0];
      for (int l = 0; l < 32; ++l) lanes[l]->out[0] = v[l ^ int(lanes[l]->in[1] & 31)];
      break;
    }
    case Op::kLdsm:
    case Op::kLdsmTrans: {
      // PTX ldmatrix .m8n8.x4.b16: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (16 bytes each).
      // Without .trans lane l receives in register i the elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i,
      // lower column in the low half; .trans loads the matrix column-major: element (r, c) is stored row c, col r.
      uint16_t m[4][8][8];
      for (int i = 0; i < 4; ++i) {
        for (int row = 0; row < 8; ++row) {
          const Thread* t = lanes[8 * i + row];
          std::memcpy(m[i][row], smem_at(uint32_t(t->in[0]), 16, 16), 16);
        }
      }
      const bool trans = op == Op::kLdsmTrans;
      for (int l = 0; l < 32; ++l) {
        const int r = l / 4, c = 2 * (l % 4);
        for (int i = 0; i < 4; ++i) {
          const uint16_t lo = trans ? m[i][c][r] : m[i][r][c];
          const uint16_t hi = trans ? m[i][c + 1][r] : m[i][r][c + 1];
          lanes[l]->out[i] = uint32_t(lo) | uint32_t(hi) << 16;
        }
      }
      break;
    }
    case Op::kMmaF16:
    case Op::kMmaBF16: {
      // PTX mma.m16n8k16.row.col, f16/bf16 inputs, f32 accumulators; groupID g = lane >> 2, t = lane % 4.
      //   A (16x16): a_i in register i/2 (low half = even i); row g for i in {0,1,4,5} else g+8,
      //              col 2t + (i & 1) for i < 4, + 8 for i >= 4.
      //   B (16x8):  b_i in register i/2; row (k) 2t + (i & 1) for i < 2, + 8 for i >= 2; col g.
      //   C/D (16x8): c_i; row g for i < 2 else g+8; col 2t + (i & 1).
      const bool bf = op == Op::kMmaBF16;
      auto cvt = [bf](uint32_t reg, int half) {
        const uint16_t b = uint16_t(reg >> (16 * half));
        return bf ? bf16_bits_to_float(b) : f16_bits_to_float(b);
      };
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        const Thread* th = lanes[l];
        for (int i = 0; i < 8; ++i) {
          const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
          const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
          A[row][col] = cvt(uint32_t(th->in[i / 2]), i & 1);
        }
        for (int i = 0; i < 4; ++i) {
          const int k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
          B[k][g] = cvt(uint32_t(th->in[4 + i / 2]), i & 1);
        }
        for (int i = 0; i < 4; ++i) {
          float c;
          const uint32_t u = uint32_t(th->in[6 + i]);
          std::memcpy(&c, &u, 4);
          C[i < 2 ? g : g + 8][2 * t + (i & 1)] = c;
        }
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
          float acc = 0.f;
          for (int k = 0; k < 16; ++k) acc = fmaf(A[row][k], B[k][col], acc);
          const float d = C[row][col] + acc;
          uint32_t u;
          std::memcpy(&u, &d, 4);
          lanes[l]->out[i] = u;
        }
      }
      break;
    }
    default:
      break;
  }
}

// ---------------------------------------------------------------- cp.async
inline void do_copy(const Copy& c) {
  unsigned char* dst = smem_at(c.dst, 16, 16);
  if (c.valid) {
    if (reinterpret_cast<uintptr_t>(c.src) % 16 != 0) fail("cp.async global source not 16-byte aligned");
    check_global(c.src, 16, "cp.async");
    std::memcpy(dst, c.src, 16);
  } else {
    std::memset(dst, 0, 16);  // src-size 0: nothing is read, all 16 bytes are zero-filled
  }
}

inline void cp_async16(uint32_t dst, const void* src, bool valid) {
  ++rt().stats.copies;
  const Copy c{dst, src, valid};
  smem_at(dst, 16, 16);  // check the destination when issued
  if (rt().opt.delay_copies) {
    rt().cur->open.push_back(c);
  } else {
    do_copy(c);
  }
}
inline void cp_async_commit() {
  Thread* t = rt().cur;
  if (!rt().opt.delay_copies) return;
  t->groups.push_back(std::move(t->open));
  t->open.clear();
}
// Retires all but the newest n committed groups (copies issued after the last commit stay pending).
inline void cp_async_wait(int n) {
  Thread* t = rt().cur;
  while (static_cast<int>(t->groups.size()) > n) {
    for (const Copy& c : t->groups.front()) do_copy(c);
    t->groups.erase(t->groups.begin());
  }
}

inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  Thread* t = rt().cur;
  t->in[0] = addr;
  warp_collective(trans ? Op::kLdsmTrans : Op::kLdsm, 0xffffffffu);
  for (int i = 0; i < 4; ++i) r[i] = uint32_t(t->out[i]);
}

inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Thread* t = rt().cur;
  for (int i = 0; i < 4; ++i) t->in[i] = a[i];
  t->in[4] = b0;
  t->in[5] = b1;
  for (int i = 0; i < 4; ++i) {
    uint32_t u;
    std::memcpy(&u, &c[i], 4);
    t->in[6 + i] = u;
  }
  warp_collective(bf16 ? Op::kMmaBF16 : Op::kMmaF16, 0xffffffffu);
  for (int i = 0; i < 4; ++i) {
    const uint32_t u = uint32_t(t->out[i]);
    std::memcpy(&c[i], &u, 4);
  }
}

// ---------------------------------------------------------------- scheduler
inline void resume(Thread* t) {
  Runtime& r = rt();
  r.cur = t;
  r.in_fiber = true;
  emu_fiber_switch(&r.sched_sp, t->sp);
  r.in_fiber = false;
  r.cur = nullptr;
}

[[noreturn]] inline void fiber_entry() {
  Runtime& r = rt();
  r.body();
  Thread* t = r.cur;  // copies still in flight land when the block ends (not now: other lanes may still read)
  t->state = State::kDone;
  yield_to_scheduler();
  __builtin_unreachable();
}

inline void init_fiber(Thread& t, int index) {
  unsigned char* lo = rt().stacks + size_t(index) * (kStackBytes + kGuardBytes) + kGuardBytes;
  auto* sp = reinterpret_cast<uint64_t*>(lo + kStackBytes);  // 16-byte aligned top
  *--sp = 0;                                                  // fiber_entry's (never used) return address
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);           // where emu_fiber_switch's ret lands
  for (int i = 0; i < 6; ++i) *--sp = 0;                      // rbp rbx r12-r15
  t.sp = sp;
}

inline void ensure_stacks(size_t n) {
  Runtime& r = rt();
  if (r.stack_count >= n) return;
  if (r.stacks) munmap(r.stacks, r.stack_count * (kStackBytes + kGuardBytes));
  const size_t bytes = n * (kStackBytes + kGuardBytes);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("emu: cannot map fiber stacks");
  r.stacks = static_cast<unsigned char*>(p);
  r.stack_count = n;
  for (size_t i = 0; i < n; ++i) mprotect(r.stacks + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
}

inline std::string describe_lanes(Thread** lanes, int n) {
  std::string s;
  for (int l = 0; l < n; ++l) {
    const Thread* t = lanes[l];
    s += " lane" + std::to_string(l) + "=";
    switch (t->state) {
      case State::kWarpOp: s += op_name(t->op); break;
      case State::kBarrier: s += "__syncthreads"; break;
      case State::kDone: s += "exited"; break;
      default: s += "?"; break;
    }
  }
  return s;
}

inline void throw_if_error() {
  Runtime& r = rt();
  if (!r.error.empty()) {
    std::string e = std::move(r.error);
    r.error.clear();
    throw std::runtime_error("CUDA emulation: " + e);
  }
}

// Runs warp w until all its lanes are at a block barrier or done.
inline void run_warp(int w) {
  Runtime& r = rt();
  const int n = static_cast<int>(r.threads.size());
  const int l0 = 32 * w, nl = std::min(32, n - l0);
  Thread* lanes[32];
  for (int l = 0; l < nl; ++l) lanes[l] = &r.threads[l0 + l];
  for (;;) {
    for (int l = 0; l < nl; ++l) {
      while (lanes[l]->state == State::kReady) {
        resume(lanes[l]);
        throw_if_error();
      }
    }
    int at_op = 0;
    for (int l = 0; l < nl; ++l) at_op += lanes[l]->state == State::kWarpOp;
    if (at_op == 0) return;
    char head[200];
    std::snprintf(head, sizeof(head), "block (%u,%u,%u) warp %d: ", r.block_idx.x, r.block_idx.y, r.block_idx.z, w);
    if (nl != 32) {
      throw std::runtime_error(std::string("CUDA emulation: ") + head + "warp collective in a partial warp");
    }
    const Op op = lanes[0]->op;
    bool same = at_op == 32;
    for (int l = 0; l < 32 && same; ++l) same = lanes[l]->op == op && lanes[l]->mask == 0xffffffffu;
    if (!same) {
      throw std::runtime_error(std::string("CUDA emulation: ") + head +
                               "divergent warp collective (all 32 lanes must execute the same full-mask op):" +
                               describe_lanes(lanes, 32));
    }
    execute(lanes, op);
    throw_if_error();
    ++r.stats.warp_ops;
    for (int l = 0; l < 32; ++l) lanes[l]->state = State::kReady;
  }
}

inline void run_block() {
  Runtime& r = rt();
  const int n = static_cast<int>(r.threads.size());
  const int warps = (n + 31) / 32;
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t.state = State::kReady;
    t.op = Op::kNone;
    t.open.clear();
    t.groups.clear();
    init_fiber(t, i);
  }
  poison_shared();
  for (;;) {
    for (int k = 0; k < warps; ++k) run_warp(r.opt.reverse_warps ? warps - 1 - k : k);
    int done = 0, waiting = 0;
    for (const Thread& t : r.threads) {
      done += t.state == State::kDone;
      waiting += t.state == State::kBarrier;
    }
    if (done == n) {
      for (Thread& t : r.threads) {
        for (const auto& g : t.groups) {
          for (const Copy& c : g) do_copy(c);
        }
        for (const Copy& c : t.open) do_copy(c);
      }
      return;
    }
    if (done > 0) {
      char buf[200];
      std::snprintf(buf, sizeof(buf),
                    "CUDA emulation: block (%u,%u,%u): __syncthreads reached by %d threads while %d threads exited",
                    r.block_idx.x, r.block_idx.y, r.block_idx.z, waiting, done);
      throw std::runtime_error(buf);
    }
    ++r.stats.barriers;
    for (Thread& t : r.threads) t.state = State::kReady;
  }
}

// Registers a readable global range for the next launches (cp.async / __ldg sources are checked against them).
inline void clear_globals() { rt().globals.clear(); }
inline void add_global(const void* p, size_t bytes) {
  if (p && bytes) rt().globals.emplace_back(reinterpret_cast<uintptr_t>(p), reinterpret_cast<uintptr_t>(p) + bytes);
}

// kernel<<<grid, block, dyn_smem>>>(args...), run to completion on the calling thread.
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, size_t dyn_smem, void (*kernel)(KArgs...), Args&&... args) {
  Runtime& r = rt();
  if (dyn_smem > kDynSmemMax) throw std::runtime_error("CUDA emulation: dynamic shared memory request too large");
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) throw std::runtime_error("CUDA emulation: bad block size");
  find_shared_statics();
  ensure_stacks(n);
  r.threads.assign(n, Thread{});
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t.linear = i;
    t.tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    t.lane = i % 32;
    t.warp = i / 32;
  }
  r.grid_dim = grid;
  r.block_dim = block;
  r.dyn_bytes = dyn_smem;
  r.error.clear();
  std::tuple<std::decay_t<KArgs>...> kargs(std::forward<Args>(args)...);  // by value, as a launch copies them
  r.body = [&] { std::apply(kernel, kargs); };
  ++r.stats.launches;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        r.block_idx = make_uint3(x, y, z);
        ++r.stats.blocks;
        run_block();
      }
    }
  }
  r.body = nullptr;
}

}  // namespace emu

// CUDA's own names (threadIdx, __syncthreads, __shfl_xor_sync, ...) over the runtime above.
#include "builtins.h"
