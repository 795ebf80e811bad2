// The per-thread workspace (workspace.h).
#include "workspace.h"

#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "../common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastattn::cpu {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kGrain = size_t(64) << 10;  // blocks are whole multiples of 64 KB

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Each piece its own allocation, freed when its scope closes: under AddressSanitizer (a piece's overrun then hits a
// redzone instead of its neighbour) and under FASTATTN_CPU_PLANT=workspace_off (tests only, read once: the per-call
// allocation the workspace replaced, which the page-fault check must catch; tests/test_cpu_workspace.py).
bool separate_pieces() {
#if defined(__SANITIZE_ADDRESS__)
  return true;
#else
  static const bool on = [] {
    const char* e = std::getenv("FASTATTN_CPU_PLANT");
    return e != nullptr && std::strcmp(e, "workspace_off") == 0;
  }();
  return on;
#endif
}

struct FreeCpu {
  void operator()(void* p) const { c10::free_cpu(p); }
};

struct Block {
  std::unique_ptr<char, FreeCpu> base;
  size_t size;
};

struct Arena {
  std::vector<Block> blocks;  // a block never moves or shrinks while a scope is open
  size_t block = 0, offset = 0;  // where the next piece goes: blocks[block] at offset
  size_t high = 0;               // most bytes in use at once since the outermost scope opened
  int depth = 0;

  size_t in_use() const {
    size_t n = offset;
    for (size_t b = 0; b < block; ++b) n += blocks[b].size;  // (block <= blocks.size())
    return n;
  }
  void add_block(size_t bytes) {
    const size_t size = separate_pieces() ? bytes : round_up(bytes, kGrain);
    blocks.push_back({std::unique_ptr<char, FreeCpu>(static_cast<char*>(c10::alloc_cpu(size))), size});
  }
  // The next piece: after the last in its block, or at the start of the next block (the rest of the block stays
  // unused until the scope closes), or in a new block.
  char* bump(size_t bytes) {
    while (block < blocks.size() && offset + bytes > blocks[block].size) ++block, offset = 0;
    if (block == blocks.size()) add_block(bytes), offset = 0;
    char* p = blocks[block].base.get() + offset;
    offset += bytes;
    high = std::max(high, in_use());
    return p;
  }
  char* own_block(size_t bytes) {
    add_block(bytes);
    block = blocks.size();  // the next piece gets a block of its own too
    return blocks.back().base.get();
  }
  // The outermost scope closed: keep one block as large as the call needed (the next call of its kind fits in it
  // without a second), or none past kWorkspaceKeptBytes.
  void settle() {
    const size_t need = high;
    block = offset = high = 0;
    if (need > kWorkspaceKeptBytes) return blocks.clear();
    if (blocks.size() > 1 || (!blocks.empty() && blocks[0].size < need)) {
      blocks.clear();
      add_block(need);
    }
  }
};

thread_local Arena arena;

}  // namespace

WorkspaceScope::WorkspaceScope() : block_(arena.block), offset_(arena.offset), blocks_(arena.blocks.size()) {
  ++arena.depth;
}

WorkspaceScope::~WorkspaceScope() {
  arena.block = block_;
  arena.offset = offset_;
  if (separate_pieces()) arena.blocks.resize(blocks_);  // frees the scope's pieces
  if (--arena.depth == 0) arena.settle();
}

void* workspace_take(size_t bytes) {
  Arena& a = arena;
  TORCH_INTERNAL_ASSERT(a.depth > 0, "workspace_take outside a WorkspaceScope");
  bytes = round_up(std::max<size_t>(bytes, 1), kAlign);
  char* p = separate_pieces() ? a.own_block(bytes) : a.bump(bytes);
  if (poison_outputs()) std::memset(p, 0xff, bytes);  // NaN in fp32, bf16 and fp16
  return p;
}

namespace {
struct Kept {  // the buffer kept between calls (SharedBuffer); never freed: the process keeps it to the end
  std::mutex mu;
  void* base = nullptr;
  size_t size = 0;
};
Kept& kept() {
  static Kept* k = new Kept;
  return *k;
}
}  // namespace

SharedBuffer::SharedBuffer(size_t bytes, size_t keep) : keep_(keep) {
  if (bytes == 0) return;
  Kept& k = kept();
  if (!separate_pieces()) {
    std::lock_guard<std::mutex> lock(k.mu);
    if (k.base != nullptr && k.size >= bytes) {
      std::swap(base_, k.base), std::swap(size_, k.size);
      keep_ = std::max(keep_, size_);  // kept under a larger limit: it goes back, whatever this call's limit
    }
  }
  if (base_ == nullptr) {
    size_ = round_up(bytes, kGrain);
    base_ = c10::alloc_cpu(size_);
    advise_huge_pages(base_, size_);
  }
  if (poison_outputs()) std::memset(base_, 0xff, bytes);
}

SharedBuffer::~SharedBuffer() {
  if (base_ == nullptr) return;
  Kept& k = kept();
  if (size_ <= keep_ && !separate_pieces()) {
    std::lock_guard<std::mutex> lock(k.mu);
    if (k.size < size_) std::swap(base_, k.base), std::swap(size_, k.size);  // base_: the smaller one, or none
  }
  if (base_ != nullptr) c10::free_cpu(base_);
}

void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugeOutputBytes) return;
  const char* env = std::getenv("FASTATTN_CPU_HUGE_PAGES");
  if (env != nullptr && std::strcmp(env, "0") == 0) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + bytes) & ~(kHuge - 1);  // whole 2 MB pages inside
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // refused: the 4 KB pages, as before
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace fastattn::cpu
