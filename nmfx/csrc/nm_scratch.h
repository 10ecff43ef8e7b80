// Per-thread scratch buffers reused across calls.
//
// Freshly allocated multi-MB buffers come from mmap (or a trimmed heap) and page-fault on every
// call: a 64x4096 weight at 192 rows of x took 5.8-6.2 ms that way instead of 1.4 ms,
// erratically, as glibc's mmap and trim thresholds moved. Dense F.linear does not pay this
// (oneDNN/MKL keep their own pools). Buffers up to kScratchMaxBytes are kept per thread and slot;
// larger ones are allocated per call and held by the caller's tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>

namespace nmfx {

constexpr size_t kScratchMaxBytes = size_t{64} << 20;

class Scratch {
 public:
  ~Scratch() { std::free(p_); }
  void* get(size_t bytes) {
    if (bytes > n_) {
      std::free(p_);
      const size_t rounded = (std::max<size_t>(bytes, 64) + 63) / 64 * 64;
      p_ = std::aligned_alloc(64, rounded);
      TORCH_CHECK(p_ != nullptr, "nmfx: out of memory allocating ", rounded, " bytes of scratch");
      n_ = bytes;
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

enum ScratchSlot {
  kScratchX = 0,
  kScratchPanels = 1,
  kScratchSel = 2,
  kScratchDense = 3,
  kScratchSlots = 4
};

// `bytes` bytes, 64-byte aligned, valid until the next call on this thread with the same slot;
// `hold` keeps a per-call buffer alive when over kScratchMaxBytes.
inline void* scratch_bytes(ScratchSlot slot, size_t bytes, at::Tensor& hold) {
  if (bytes > kScratchMaxBytes) {
    hold = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
    return hold.data_ptr();
  }
  static thread_local Scratch cache[kScratchSlots];
  return cache[slot].get(bytes);
}

inline float* scratch_floats(ScratchSlot slot, int64_t n, at::Tensor& hold) {
  return static_cast<float*>(scratch_bytes(slot, static_cast<size_t>(n) * sizeof(float), hold));
}

}  // namespace nmfx
