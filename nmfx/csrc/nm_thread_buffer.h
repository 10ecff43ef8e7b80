// Per-thread buffers the kernels keep across calls, counted and releasable.
//
// Kernels keep their staging buffers per thread so that a call does not page-fault through
// fresh memory (nm_scratch.h). Sized by the largest call a thread has run, they outlive it: the
// autotuner's probes at up to 512 rows of x once left ~90 MB resident (4-layer TinyLlama-sized
// Llama, one thread) in a model that then decodes one row at a time. Every such buffer is a
// ThreadBytes: counted in nmfx_cpu::scratch_stats, and freed by nmfx_cpu::release_scratch, each
// thread freeing its own (torch's threads at once; any other thread each buffer before its next
// use).
//
// No inline code here beyond trivial accessors: the kernel files that include this are compiled
// for AVX2/AVX-512, and an inline function shared with them could be emitted with their
// instructions (the definitions are in nm_dense.cpp, compiled for baseline x86-64).
#pragma once

#include <cstddef>
#include <cstdint>

namespace nmfx {

class ThreadBytes {
 public:
  constexpr ThreadBytes() = default;  // as std::vector's: no per-use initialisation check
  ~ThreadBytes();
  ThreadBytes(const ThreadBytes&) = delete;
  ThreadBytes& operator=(const ThreadBytes&) = delete;
  // At least `bytes` bytes, 64-byte aligned. As std::vector::resize: what was held is kept,
  // bytes past it are zero. The first call registers the buffer with its thread's list.
  void* resize(size_t bytes);
  // Bytes held; 0 once released. On a thread that a release_scratch() did not reach (one
  // outside torch's pool), the buffer is freed here first.
  size_t size();
  void* data() const { return p_; }
  void release() noexcept;

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
  int64_t epoch_ = 0;  // release_scratch calls this buffer has caught up with
  bool listed_ = false;
};

// Frees every ThreadBytes of the calling thread.
void release_thread_buffers();

// The part of std::vector<T> the kernels use (T trivially copyable; resize only grows).
template <class T>
class KeptVector {
 public:
  size_t size() { return bytes_.size() / sizeof(T); }
  void resize(size_t n) { bytes_.resize(n * sizeof(T)); }
  T* data() const { return static_cast<T*>(bytes_.data()); }
  T* begin() const { return data(); }
  T& operator[](size_t i) const { return data()[i]; }

 private:
  ThreadBytes bytes_;
};

}  // namespace nmfx
