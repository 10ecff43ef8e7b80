// The dense branch of nm_linear without a resident dense weight.
//
// One or two rows of x: the AVX2 kernel that expands W in registers (nm_gemm, PATH_EXPAND) does
// every multiply-add of the dense product with W read once in its packed form; expanding W into
// memory first cannot keep up with F.linear there (1024x1024 fp32 at one row, one thread on a
// Zen 4: 0.16 ms expanded + GEMV against F.linear's 0.074 and this kernel's 0.064).
//
// More rows: W is expanded per call, a block of rows at a time, into a per-thread scratch buffer
// (its dtype, bit for bit), and torch's dense GEMM runs on each block (MKL's sgemm_/sgemv_
// directly for fp32; at::mm_out, i.e. oneDNN, for bf16/fp16). Where dense wins (compute-bound
// batches) expanding costs one memory-bound pass over the packed weight next to a compute-bound
// GEMM; the lowered model's resident weight memory stays its packed size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <omp.h>
#include <torch/library.h>

#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <limits>
#include <optional>
#include <vector>

#include "nm_args.h"
#include "nm_kernels.h"
#include "nm_parallel.h"
#include "nm_scratch.h"

namespace nmfx {

// ThreadBytes (nm_thread_buffer.h), defined here: compiled for baseline x86-64.
namespace {
std::vector<ThreadBytes*>& thread_list() {
  // Destroyed at thread exit before or after the buffers; nothing reads it then (buffers never
  // unlist themselves, and their destructors only free their own memory).
  static thread_local std::vector<ThreadBytes*> list;
  return list;
}
}  // namespace

ThreadBytes::~ThreadBytes() { release(); }

size_t ThreadBytes::size() {
  // A release_scratch that did not reach this thread: this buffer goes now, before it is used
  // (only this one: the caller may hold pointers into the thread's others).
  const int64_t epoch = scratch_counters().epoch.load(std::memory_order_relaxed);
  if (epoch != epoch_) {
    release();
    epoch_ = epoch;
  }
  return n_;
}

void* ThreadBytes::resize(size_t bytes) {
  if (bytes <= size()) return p_;
  const size_t rounded = (std::max<size_t>(bytes, 64) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  TORCH_CHECK(p != nullptr, "nmfx: out of memory allocating ", rounded, " bytes of scratch");
  if (n_ > 0) std::memcpy(p, p_, n_);
  std::memset(static_cast<char*>(p) + n_, 0, rounded - n_);
  std::free(p_);
  scratch_counters().kept += static_cast<int64_t>(rounded) - static_cast<int64_t>(n_);
  p_ = p;
  n_ = rounded;
  if (!listed_) {
    thread_list().push_back(this);
    listed_ = true;
  }
  return p_;
}

void ThreadBytes::release() noexcept {
  if (p_ == nullptr) return;
  std::free(p_);
  scratch_counters().kept -= static_cast<int64_t>(n_);
  p_ = nullptr;
  n_ = 0;
}

void release_thread_buffers() {
  for (ThreadBytes* b : thread_list()) b->release();
}

namespace {

// Dense bytes per block, at most. fp32 (MKL called directly, ~1 us a call): a block stays in L2
// (few rows of x: the GEMV then reads it from L2 rather than the whole dense weight from
// L3/DRAM) or L2/L3 (many rows of x: larger blocks stage x fewer times). bf16/fp16 (at::mm_out:
// oneDNN costs ~20-30 us a call on one thread whatever the size, 128 calls of 32 rows had made a
// 4096x4096 bf16 GEMV 1.8x F.linear): 2 MB at any batch (1 and 4 MB measured no better at
// 64-256 rows of x, quiet, 2 threads).
constexpr int64_t kDenseBlockBytesFew = int64_t{1} << 18;
constexpr int64_t kDenseBlockBytesMany = int64_t{1} << 21;
constexpr int64_t kDenseBlockBytesMm = int64_t{1} << 21;
constexpr int64_t kFewRows = 16;
// Rows of x up to which the dense branch runs the register-expanding kernel (see the top).
constexpr int64_t kFusedRows = 2;
// nm_gemm's isa argument for it: ISA avx2 | PATH_EXPAND (nm_ops.cpp, nmfx/kernels/_build.py).
constexpr int64_t kAvx2Expand = 2 | (1 << 8);

// Fortran BLAS as torch's CPU builds export it (MKL: F.linear's own GEMM), called per block
// without the dispatcher's few microseconds per op; weak, so a torch without them still loads
// and the blocks go through at::mm_out.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void sgemv_(const char* t, const int* m, const int* n, const float* alpha, const float* a,
            const int* lda, const float* x, const int* incx, const float* beta, float* y,
            const int* incy) __attribute__((weak));
// MKL's C entry point (mkl_service.h maps mkl_set_num_threads_local to it; the lowercase symbol
// exported beside it is the Fortran one, which takes a pointer).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

// MKL on one thread, on the calling thread, for the scope: the blocks are the parallel work.
// Run serially (after a stall, see nm_parallel.h), each block's BLAS call would otherwise start
// MKL's own threads, a barrier per block that waits for the descheduled thread (beside one
// busy process, 1024x1024 at 8 rows: worst call 89 ms). MKL's local setting also sets this
// thread's OpenMP thread count (torch.get_num_threads reads it), so both are put back.
class OneBlasThread {
 public:
  OneBlasThread()
      : omp_(omp_get_max_threads()),
        prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : -1) {}
  ~OneBlasThread() {
    if (prev_ >= 0) MKL_Set_Num_Threads_Local(prev_);
    omp_set_num_threads(omp_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int omp_;
  int prev_;
};

// OpenMP on one thread for the scope when `active`: parallel_items runs the blocks on the
// calling thread alone for a while after it waited on a descheduled thread (nm_parallel.h), and
// there, outside any parallel region, oneDNN (at::mm_out) would start its own threads for each
// block and meet them at a barrier: beside one busy process, a 4096x4096 bf16 call at 8 rows
// of x had a worst call of 109 ms (F.linear: 13 ms). MKL's local setting does not cover oneDNN.
class OmpOneThread {
 public:
  explicit OmpOneThread(bool active) : prev_(active ? omp_get_max_threads() : 0) {
    if (prev_ > 0) omp_set_num_threads(1);
  }
  ~OmpOneThread() {
    if (prev_ > 0) omp_set_num_threads(prev_);
  }
  OmpOneThread(const OmpOneThread&) = delete;
  OmpOneThread& operator=(const OmpOneThread&) = delete;

 private:
  int prev_;
};

// y[:, r0:r0+nr] (row stride ldy) = x [B, cols] (row stride ldx) @ wb[nr, cols]^T (row stride
// ldo), + y where `accumulate` (y holds the bias).
void blas_block(const float* x, int64_t ldx, int64_t B, const float* wb, int64_t ldo, int64_t nr,
                int64_t cols, bool accumulate, float* y, int64_t ldy) {
  const float one = 1.f;
  const float beta = accumulate ? 1.f : 0.f;
  const int k = static_cast<int>(cols), m = static_cast<int>(nr), lda = static_cast<int>(ldo);
  if (B == 1) {
    const int inc = 1;
    sgemv_("T", &k, &m, &one, wb, &lda, x, &inc, &beta, y, &inc);
    return;
  }
  const int n = static_cast<int>(B), ldb = static_cast<int>(ldx), ldc = static_cast<int>(ldy);
  sgemm_("T", "N", &m, &n, &k, &one, wb, &lda, x, &ldb, &beta, y, &ldc);
}

bool use_blas(const at::Tensor& x, int64_t rows, int64_t cols) {
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  return sgemm_ != nullptr && sgemv_ != nullptr && x.scalar_type() == at::kFloat &&
         x.stride(1) == 1 && (x.size(0) == 1 || x.stride(0) >= cols) && x.stride(0) < kMaxInt &&
         x.size(0) < kMaxInt && rows < kMaxInt && cols + 16 < kMaxInt;
}

#if defined(__x86_64__) || defined(__i386__)
// Rows [r0, r1) of W dense into out (row stride ldo), as expand_rows_avx512 but a whole
// 512-bit vector per step (16 fp32 or 32 bf16/fp16 columns) and the kept values loaded first,
// then expanded in registers: on a Zen 4, 1.4x the speed of the 16-column expand-loads for bf16,
// where expanding a 4096x4096 weight had cost a tenth of a 64-row GEMM. Reads only the kept
// values of a row (masked loads, the pattern's constant count per vector, whatever the mask
// holds) and writes only columns [0, ldo). Needs M to divide the vector's columns.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2"))) void expand_rows_wide(
    const NMProblem& p, int64_t r0, int64_t r1, T* out, int64_t ldo) {
  constexpr int64_t kCols = 64 / sizeof(T);  // columns per vector
  constexpr int64_t kMaskBytes = kCols / 8;
  const int64_t per = kCols / p.m * p.n;  // kept values per vector
  const int64_t full = (ldo / kCols < p.KB / kMaskBytes) ? ldo / kCols : p.KB / kMaskBytes;
  const uint32_t load_mask = per >= 32 ? ~0u : (1u << per) - 1;
  for (int64_t r = r0; r < r1; ++r) {
    const T* vp = static_cast<const T*>(row_values(p, r, sizeof(T)));
    const uint8_t* mrow = p.mask + r * p.KB;
    T* o = out + (r - r0) * ldo;
    int64_t c = 0;
    for (; c < full; ++c, vp += per) {
      uint32_t bits = 0;
      std::memcpy(&bits, mrow + c * kMaskBytes, kMaskBytes);
      if constexpr (sizeof(T) == 4) {
        const __m512i v = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(load_mask), vp);
        _mm512_storeu_si512(o + c * kCols, _mm512_maskz_expand_epi32(bits, v));
      } else {
        const __m512i v = _mm512_maskz_loadu_epi16(load_mask, vp);
        _mm512_storeu_si512(o + c * kCols, _mm512_maskz_expand_epi16(bits, v));
      }
    }
    // The last part vector: the mask bytes left (bits past cols are zero), the values left,
    // stored up to ldo.
    const int64_t left_cols = ldo - c * kCols;
    if (left_cols <= 0) continue;
    uint32_t bits = 0;
    const int64_t left_bytes = std::min<int64_t>(kMaskBytes, p.KB - c * kMaskBytes);
    if (left_bytes > 0) std::memcpy(&bits, mrow + c * kMaskBytes, left_bytes);
    const int64_t left_vals = std::clamp<int64_t>(p.kept - c * per, 0, per);
    const uint32_t vmask = left_vals >= 32 ? ~0u : (1u << left_vals) - 1;
    const uint32_t smask = left_cols >= 32 ? ~0u : (1u << left_cols) - 1;
    if constexpr (sizeof(T) == 4) {
      const __m512i v = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(vmask), vp);
      _mm512_mask_storeu_epi32(o + c * kCols, static_cast<__mmask16>(smask),
                               _mm512_maskz_expand_epi32(bits, v));
    } else {
      const __m512i v = _mm512_maskz_loadu_epi16(vmask, vp);
      _mm512_mask_storeu_epi16(o + c * kCols, smask, _mm512_maskz_expand_epi16(bits, v));
    }
  }
}

void expand_wide(const NMProblem& p, int64_t r0, int64_t r1, void* out, int64_t ldo) {
  if (p.vtype == ValueType::kFloat32) {
    expand_rows_wide(p, r0, r1, static_cast<uint32_t*>(out), ldo);
  } else {
    expand_rows_wide(p, r0, r1, static_cast<uint16_t*>(out), ldo);
  }
}
#endif

using ExpandFn = void (*)(const NMProblem&, int64_t, int64_t, void*, int64_t);

// The ISA codes of nm_ops.cpp (nmfx/kernels/_build.py ISA_CODES); 0: the best this CPU runs.
constexpr int64_t kIsaPortable = 1;
constexpr int64_t kIsaAvx2 = 2;
constexpr int64_t kIsaAvx512 = 3;
constexpr int64_t kIsaAvx512Bf16 = 4;

// The ISA the dense branch uses: `isa` (an upper bound tests use to run the AVX2 or portable
// code on an AVX-512 host), checked against the CPU, or the CPU's best when 0.
int64_t dense_isa(int64_t isa) {
  const bool ok = isa == 0 || isa == kIsaPortable || (isa == kIsaAvx2 && cpu_has_avx2()) ||
                  (isa == kIsaAvx512 && cpu_has_avx512()) ||
                  (isa == kIsaAvx512Bf16 && cpu_has_avx512bf16());
  TORCH_CHECK(ok, "nmfx: nm_dense isa ", isa, " is unknown or not supported by this CPU (0: auto, ",
              "1: portable, 2: avx2, 3: avx512, 4: avx512bf16)");
  if (isa != 0) return isa;
  return cpu_has_avx512() ? kIsaAvx512 : cpu_has_avx2() ? kIsaAvx2 : kIsaPortable;
}

ExpandFn pick_expand(const NMProblem& p, int64_t isa) {
  if (isa < kIsaAvx512) return expand_rows_portable;
#if defined(__x86_64__) || defined(__i386__)
  const int64_t cols = p.vtype == ValueType::kFloat32 ? 16 : 32;
  if (cols % p.m == 0) return expand_wide;
#endif
  return expand_rows_avx512;
}

// Rows of W per block and blocks: at most max_bytes of dense rows per block; when the blocks
// run on several threads, a multiple of the threads, all of one size (the last may be smaller by
// a few rows), so no thread is left with a block after the others have finished (a 43rd block
// of 11008 rows had cost a 2.3% tail). block_rows > 0 forces the rows per block (tests).
struct BlockPlan {
  int64_t rows;  // per block
  int64_t count;
};

BlockPlan plan_blocks(int64_t rows, int64_t row_bytes, int64_t max_bytes, int64_t threads,
                      int64_t block_rows) {
  if (block_rows > 0) {
    const int64_t rb = std::min(block_rows, rows);
    return {rb, (rows + rb - 1) / rb};
  }
  const int64_t most = std::max<int64_t>(1, max_bytes / row_bytes);
  int64_t count = (rows + most - 1) / most;
  if (threads > 1) count = std::min(rows, (count + threads - 1) / threads * threads);
  const int64_t rb = (rows + count - 1) / count;
  return {rb, (rows + rb - 1) / rb};
}

// Below this many multiply-adds the blocks stay on the calling thread (a fork costs more).
constexpr int64_t kParallelMacs = int64_t{1} << 16;

// B <= kFusedRows with AVX2: the register-expanding kernel (see the top), through the
// dispatcher (nm_gemm lives in nm_ops.cpp); its results follow F.linear's NaN and Inf as well.
at::Tensor fused_dense(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                       const std::optional<at::Tensor>& bias, int64_t rows, int64_t cols,
                       int64_t n, int64_t m) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nmfx_cpu::nm_gemm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, int64_t,
                            int64_t)>();
  return op.call(x, values, mask, bias, rows, cols, n, m, kAvx2Expand);
}

at::Tensor nm_dense(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                    const std::optional<at::Tensor>& bias, int64_t rows, int64_t cols, int64_t n,
                    int64_t m, int64_t block_rows, int64_t isa) {
  const PackedShape shape = check_packed(x, values, mask, bias, rows, cols, n, m);
  TORCH_CHECK(block_rows >= 0, "nmfx: block_rows must be >= 0 (0: automatic), got ", block_rows);
  isa = dense_isa(isa);
  const int64_t B = x.size(0);
  if (B <= kFusedRows && B > 0 && rows > 0 && block_rows == 0 && isa >= kIsaAvx2) {
    return fused_dense(x, values, mask, bias, rows, cols, n, m);
  }
  at::Tensor y = new_buffer({B, rows}, x.options());
  if (B == 0 || rows == 0) return y;
  const ValueTail vt = value_tail(values, rows, shape.kept);
  const NMProblem p = weight_problem(values, mask, shape, vt, rows, n, m);
  const ExpandFn expand = pick_expand(p, isa);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool blas = use_blas(x, rows, cols);
  if (blas && has_bias) {  // the BLAS calls accumulate onto the bias
    const at::Tensor bc = bias->contiguous();
    float* yp = y.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) std::memcpy(yp + b * rows, bc.const_data_ptr<float>(), rows * 4);
  }

  const int64_t esize = values.element_size();
  const int64_t ldo = (cols + 15) / 16 * 16;
  const int64_t max_bytes = !blas          ? kDenseBlockBytesMm
                            : B <= kFewRows ? kDenseBlockBytesFew
                                            : kDenseBlockBytesMany;
  const int64_t nthreads = at::get_num_threads();
  const bool parallel = nthreads > 1 && rows > 1 && rows * cols * B >= kParallelMacs;
  const BlockPlan plan = plan_blocks(rows, ldo * esize, max_bytes, parallel ? nthreads : 1,
                                     block_rows);
  auto run_block = [&](int64_t blk) {
    const int64_t r0 = blk * plan.rows;
    const int64_t nr = std::min(rows, r0 + plan.rows) - r0;
    at::Tensor hold;
    void* buf = scratch_bytes(kScratchDense, static_cast<size_t>(plan.rows * ldo * esize), hold);
    expand(p, r0, r0 + nr, buf, ldo);
    if (blas) {
      return blas_block(x.const_data_ptr<float>(), x.stride(0), B, static_cast<const float*>(buf),
                        ldo, nr, cols, has_bias, y.data_ptr<float>() + r0, rows);
    }
    const at::Tensor wb = at::from_blob(buf, {nr, cols}, {ldo, 1}, values.options());
    at::Tensor out = y.narrow(1, r0, nr);
    if (has_bias) {
      at::addmm_out(out, bias->narrow(0, r0, nr), x, wb.t());
    } else {
      at::mm_out(out, x, wb.t());
    }
  };
  if (!parallel || plan.count == 1) {
    for (int64_t blk = 0; blk < plan.count; ++blk) run_block(blk);
    return y;
  }
  // Blocks from a shared counter (parallel_items); each thread expands into its own scratch
  // and runs a one-thread GEMM on its block (BLAS inside a parallel region runs on one thread).
  // at::mm_out goes through the dispatcher on worker threads: it needs the caller's
  // thread-local state (inference mode, autograd and dispatch keys), which OpenMP workers do
  // not inherit.
  const at::ThreadLocalState caller;
  const OneBlasThread one_blas_thread;
  parallel_items(plan.count, nthreads, [&](int64_t blk) {
    if (blas) return run_block(blk);
    const at::ThreadLocalStateGuard guard(caller);
    const OmpOneThread one_thread(!omp_in_parallel());
    run_block(blk);
  });
  return y;
}

// [rows per block, blocks] of nm_dense's expand-and-GEMM path for a call (tests: the plan of a
// shape, dtype and thread count).
std::vector<int64_t> dense_block_plan(int64_t rows, int64_t cols, int64_t batch,
                                      at::ScalarType dtype, int64_t threads) {
  const int64_t esize = c10::elementSize(dtype);
  const int64_t ldo = (cols + 15) / 16 * 16;
  const bool blas = dtype == at::kFloat && sgemm_ != nullptr;
  const int64_t max_bytes = !blas              ? kDenseBlockBytesMm
                            : batch <= kFewRows ? kDenseBlockBytesFew
                                                : kDenseBlockBytesMany;
  const bool parallel = threads > 1 && rows > 1 && rows * cols * batch >= kParallelMacs;
  const BlockPlan plan = plan_blocks(rows, ldo * esize, max_bytes, parallel ? threads : 1, 0);
  return {plan.rows, plan.count};
}

// [bytes kept by the per-thread scratch buffers (all threads), the keep limit per buffer, bytes
// of per-call mappings alive now, mappings made so far]: tests check that a large call leaves
// no more than the bounded scratch behind; benchmarks/packed_memory.py reports them.
std::vector<int64_t> scratch_stats() {
  const ScratchCounters& c = scratch_counters();
  return {c.kept.load(), static_cast<int64_t>(kScratchKeepBytes), c.mapped_live.load(),
          c.mapped_total.load()};
}

// Frees the per-thread buffers the kernels keep (nm_thread_buffer.h): this thread's and every
// torch thread's now, any other thread's at its next call. For after a burst of large calls
// (autotuning probes up to 512 rows of x) in a process that then runs small ones. Safe while
// kernels run on other threads: each thread frees only its own buffers, between calls.
void release_scratch() {
  scratch_counters().epoch.fetch_add(1, std::memory_order_relaxed);
  release_thread_buffers();
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, threads, 1, [](int64_t, int64_t) { release_thread_buffers(); });
  }
}

// [parallel calls that waited on an idle descheduled thread, calls run on one thread since]
// (nm_parallel.h); mark_contended(ms) makes the next ms of calls run on one thread (tests).
std::vector<int64_t> parallel_stats() {
  const ParallelCounters& c = parallel_counters();
  return {c.stalls.load(), c.serial_calls.load()};
}

void mark_contended_ms(double ms) { mark_contended(static_cast<int64_t>(ms * 1e6)); }

}  // namespace
}  // namespace nmfx

TORCH_LIBRARY_FRAGMENT(nmfx_cpu, lib) {
  lib.def(
      "nm_dense(Tensor x, Tensor values, Tensor mask, Tensor? bias, int rows, int cols, int n, "
      "int m, int block_rows=0, int isa=0) -> Tensor",
      &nmfx::nm_dense);
  lib.def(
      "dense_block_plan(int rows, int cols, int batch, ScalarType dtype, int threads) -> int[]",
      &nmfx::dense_block_plan);
  lib.def("scratch_stats() -> int[]", &nmfx::scratch_stats);
  lib.def("release_scratch() -> ()", &nmfx::release_scratch);
  lib.def("parallel_stats() -> int[]", &nmfx::parallel_stats);
  lib.def("mark_contended(float ms) -> ()", &nmfx::mark_contended_ms);
}
