// Scratch and large-output memory: small buffers kept per thread, large ones returned at once.
//
// Freshly allocated multi-MB buffers come from mmap (or a trimmed heap) and page-fault on every
// call: a 64x4096 weight at 192 rows of x took 5.8-6.2 ms that way instead of 1.4 ms,
// erratically, as glibc's mmap and trim thresholds moved. So buffers up to kScratchKeepBytes are
// kept per thread and slot across calls; the callers split their work so that they stay below it
// (nm_gemm stages x a block of rows at a time, nm_dense expands W in 2 MB blocks).
//
// Anything larger (a call's output over kMappedBytes, a scratch buffer over the keep limit) is
// mapped from the OS for the call and unmapped when its tensor dies. Through malloc, glibc would
// raise its mmap threshold on the first free of such a block and from then on keep every freed
// output of that size in its heap: after 512 rows of x through an 11008x4096 layer RSS stayed
// 22 MB (the freed output) above what was live. A fresh mapping costs its page faults: in huge
// pages, about 1 ms per 16 MB on the VM measured, under 1% of a GEMM with an output that large.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "nm_thread_buffer.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace nmfx {

// Per thread and slot: staging of x (a block of rows), its panels and a block of expanded W.
constexpr size_t kScratchKeepBytes = size_t{4} << 20;
// Outputs and per-call buffers from this size on are mapped per call, not taken from malloc.
constexpr size_t kMappedBytes = size_t{16} << 20;

// Process-wide counters for tests and benchmarks (nmfx_cpu::scratch_stats).
struct ScratchCounters {
  std::atomic<int64_t> kept{0};          // bytes held by the per-thread buffers, all threads
  std::atomic<int64_t> epoch{0};         // release_scratch calls so far
  std::atomic<int64_t> mapped_live{0};   // bytes of per-call mappings not yet returned
  std::atomic<int64_t> mapped_total{0};  // per-call mappings made so far
};

inline ScratchCounters& scratch_counters() {
  static ScratchCounters counters;
  return counters;
}

class Scratch {
 public:
  void* get(size_t bytes) { return bytes <= raw_.size() ? raw_.data() : raw_.resize(bytes); }

 private:
  ThreadBytes raw_;  // counted, released by nmfx_cpu::release_scratch (nm_thread_buffer.h)
};

enum ScratchSlot {
  kScratchX = 0,
  kScratchPanels = 1,
  kScratchSel = 2,
  kScratchDense = 3,
  kScratchSlots = 4
};

struct Mapping {
  void* base;  // what mmap returned, and its length
  size_t length;
  size_t bytes;  // what the tensor asked for (the counters)
};

inline void unmap(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
#if defined(__linux__)
  munmap(m->base, m->length);
#endif
  scratch_counters().mapped_live -= static_cast<int64_t>(m->bytes);
  delete m;
}

// An uninitialised contiguous tensor whose memory is mapped for it alone when it is
// kMappedBytes or more (returned to the OS when the tensor dies; resizing it reallocates through
// torch's allocator as usual), else from torch's allocator. The mapping asks for transparent
// huge pages: on the VM measured, faulting 16 MB in 4 KB pages took 7-15 ms, in 2 MB pages ~1 ms.
inline at::Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
#if defined(__linux__)
  if (bytes >= kMappedBytes) {
    constexpr size_t kHuge = size_t{2} << 20;
    const size_t length = (bytes + kHuge - 1) / kHuge * kHuge + kHuge;  // room to align
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "nmfx: out of memory mapping ", length, " bytes");
    const uintptr_t b = reinterpret_cast<uintptr_t>(base);
    void* p = reinterpret_cast<void*>((b + kHuge - 1) / kHuge * kHuge);
#if defined(MADV_HUGEPAGE)
    madvise(p, length - (static_cast<char*>(p) - static_cast<char*>(base)), MADV_HUGEPAGE);
#endif
    ScratchCounters& c = scratch_counters();
    c.mapped_live += static_cast<int64_t>(bytes);
    c.mapped_total += 1;
    c10::DataPtr data(p, new Mapping{base, length, bytes}, &unmap, at::Device(at::kCPU));
    c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<int64_t>(bytes),
                         std::move(data), c10::GetAllocator(at::kCPU), /*resizable=*/true);
    at::Tensor t = at::empty({0}, options);
    t.set_(storage, 0, sizes);
    return t;
  }
#endif
  return at::empty(sizes, options);
}

// `bytes` bytes, 64-byte aligned, valid until the next call on this thread with the same slot;
// over kScratchKeepBytes, a per-call buffer that `hold` keeps alive.
inline void* scratch_bytes(ScratchSlot slot, size_t bytes, at::Tensor& hold) {
  if (bytes > kScratchKeepBytes) {
    hold = new_buffer({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
    return hold.data_ptr();
  }
  static thread_local Scratch cache[kScratchSlots];
  return cache[slot].get(bytes);
}

inline float* scratch_floats(ScratchSlot slot, int64_t n, at::Tensor& hold) {
  return static_cast<float*>(scratch_bytes(slot, static_cast<size_t>(n) * sizeof(float), hold));
}

}  // namespace nmfx
