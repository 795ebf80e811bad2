// A thread's working memory for the CPU kernels (tile buffers, packed K/V), kept across calls.
//
// Why: a kernel's ~1 MB of per-thread buffers allocated afresh in every parallel region sent an OpenMP worker's
// glibc arena, in some heap states, through a new 64 MB heap per call (mmap, a page fault, munmap and its TLB
// shootdown): perf counted 28K such heaps in one two-thread rule check, all from these buffers, and the short calls
// in those stretches ran 0.5-0.9x torch instead of 1.0-1.6x (Intel Xeon, 2026-12-06). PyTorch's CPU flash kernel
// dodges it by allocating in the calling thread; a kept workspace also skips the allocator altogether.
//
// A bump arena per thread: WorkspaceScope opens at the top of a thread's share of a parallel region, workspace_take
// carves 64-byte aligned pieces that stay put until that scope closes; scopes nest (a kernel called inside
// another's region). When the outermost scope closes, the blocks it needed are merged into one for the next call;
// a thread keeps at most kWorkspaceKeptBytes between calls (larger calls allocate per call, where it costs little).
// Under AddressSanitizer every piece is an allocation of its own, so overruns still meet a redzone.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fastattn::cpu {

// What a thread keeps at most (the largest need so far below it): by the buffers' sizes a short call needs ~1 MiB (a
// 16-token fp32 step against 512 keys, D=128), a grouped-query fp16 step against 2048 keys ~4 MiB (K/V widened to
// fp32 once for the group, packed key tiles); every thread of the pool holds its own, so not more. Calls that need
// more run long enough that allocating per call costs them little.
constexpr size_t kWorkspaceKeptBytes = size_t(8) << 20;

class WorkspaceScope {
 public:
  WorkspaceScope();
  ~WorkspaceScope();
  WorkspaceScope(const WorkspaceScope&) = delete;
  WorkspaceScope& operator=(const WorkspaceScope&) = delete;

 private:
  size_t block_, offset_, blocks_;  // where the thread's next piece went when the scope opened; its block count
};

// `bytes` from the calling thread's workspace, 64-byte aligned, uninitialised (NaN under FASTATTN_POISON_OUTPUTS=1,
// so a read before a write shows); valid until the innermost open WorkspaceScope of this thread closes.
void* workspace_take(size_t bytes);

template <typename T>
T* workspace_take(int64_t n) {
  return static_cast<T*>(workspace_take(static_cast<size_t>(n) * sizeof(T)));
}

// Fresh outputs of kHugeOutputBytes or more (out, dQ, dK, dV; register.cpp) are advised to transparent huge pages
// before anything touches them (madvise MADV_HUGEPAGE on their whole 2 MB pages; a hint: Linux with THP in `madvise`
// or `always` mode, else nothing). Why: glibc gives every allocation of 32 MB or more a mapping of its own and unmaps
// it when freed, so a training loop's large gradients fault in every 4 KB page again on every call (~0.4 ms a MB
// here, zeroing included: two fresh 61 MB tensors cost 46 ms to fill against 2.8 ms for mapped memory; AMD EPYC
// Zen 5, one thread, 2026-12-07); huge pages fault once per 2 MB. Smaller allocations come back from glibc's heap
// already mapped, so they are left alone. FASTATTN_CPU_HUGE_PAGES=0 turns it off (read per call; tests compare).
// PyTorch's own THP_MEM_ALLOC_ENABLE=1 does this for every allocation of 2 MB or more.
constexpr size_t kHugeOutputBytes = size_t(32) << 20;
void advise_huge_pages(void* p, size_t bytes);

// Memory that a call's threads share (the backward's dQ partials of heads cut into key chunks, kernels.h), taken
// from the one buffer the process keeps between calls where that is large enough, else allocated (and advised to
// huge pages); on destruction kept for the next call if it is the largest so far within `keep` bytes (params.h
// max_partial_bytes). Why: a fresh 32 MB of partials per call faults in and zeroes its pages on every call (a bf16
// backward, GQA 8/2, 2048 keys, D=128: cut into chunks 0.90-0.92x the uncut one, 0.94-0.96x in memory already mapped;
// AMD EPYC Zen 5, one thread, 2026-12-07). Uninitialised (NaN under FASTATTN_POISON_OUTPUTS=1); a concurrent call
// gets its own.
class SharedBuffer {
 public:
  SharedBuffer(size_t bytes, size_t keep);
  ~SharedBuffer();
  SharedBuffer(const SharedBuffer&) = delete;
  SharedBuffer& operator=(const SharedBuffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(base_);
  }

 private:
  void* base_ = nullptr;
  size_t size_ = 0, keep_ = 0;
};

}  // namespace fastattn::cpu
