// The dense branch of nm_linear without a resident dense weight: W is expanded per call, a block
// of rows at a time, into a per-thread scratch buffer (its dtype, bit for bit), and torch's dense
// GEMM (MKL's sgemm/sgemv directly for fp32, else at::mm_out: MKL / oneDNN) runs on each block. Where dense wins (compute-bound batches) expanding costs
// one memory-bound pass over the packed weight next to a compute-bound GEMM; the lowered model's
// resident weight memory stays its packed size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "nm_args.h"
#include "nm_kernels.h"
#include "nm_parallel.h"
#include "nm_scratch.h"

namespace nmfx {
namespace {

// Dense bytes per block: a block stays in L2 (few rows of x: the GEMV then reads it from L2
// rather than the whole dense weight from L3/DRAM, which is how the branch keeps up with F.linear)
// or L2/L3 (many rows of x: larger blocks stage x fewer times).
constexpr int64_t kDenseBlockBytesFew = int64_t{1} << 18;
constexpr int64_t kDenseBlockBytesMany = int64_t{1} << 21;
constexpr int64_t kFewRows = 16;

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

at::Tensor nm_dense(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                    const std::optional<at::Tensor>& bias, int64_t rows, int64_t cols, int64_t n,
                    int64_t m) {
  const PackedShape shape = check_packed(x, values, mask, bias, rows, cols, n, m);
  const int64_t B = x.size(0);
  at::Tensor y = new_buffer({B, rows}, x.options());
  if (B == 0 || rows == 0) return y;
  const ValueTail vt = value_tail(values, rows, shape.kept);
  const NMProblem p = weight_problem(values, mask, shape, vt, rows, n, m);
  const auto expand = cpu_has_avx512() ? expand_rows_avx512 : expand_rows_portable;
  const bool has_bias = bias.has_value() && bias->defined();
  const bool blas = use_blas(x, rows, cols);
  if (blas && has_bias) {  // the BLAS calls accumulate onto the bias
    const at::Tensor bc = bias->contiguous();
    float* yp = y.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) std::memcpy(yp + b * rows, bc.const_data_ptr<float>(), rows * 4);
  }

  const int64_t esize = values.element_size();
  const int64_t ldo = (cols + 15) / 16 * 16;
  const int64_t block_bytes = B <= kFewRows ? kDenseBlockBytesFew : kDenseBlockBytesMany;
  const int64_t rb = std::clamp<int64_t>(block_bytes / (ldo * esize) / 16 * 16, 16, rows);
  const int64_t nblocks = (rows + rb - 1) / rb;
  auto run_block = [&](int64_t blk) {
    const int64_t r0 = blk * rb;
    const int64_t nr = std::min(rows, r0 + rb) - r0;
    at::Tensor hold;
    void* buf = scratch_bytes(kScratchDense, static_cast<size_t>(rb * ldo * esize), hold);
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
  const int64_t nthreads = at::get_num_threads();
  if (nthreads <= 1 || nblocks == 1 || rows * cols * B < (int64_t{1} << 16)) {
    for (int64_t blk = 0; blk < nblocks; ++blk) run_block(blk);
    return y;
  }
  // Blocks from a shared counter (parallel_items); each thread expands into its own scratch
  // and runs a one-thread GEMM on its block (BLAS inside a parallel region runs on one thread).
  // at::mm_out goes through the dispatcher on worker threads: it needs the caller's
  // thread-local state (inference mode, autograd and dispatch keys), which OpenMP workers do
  // not inherit.
  const at::ThreadLocalState caller;
  const OneBlasThread one_blas_thread;
  parallel_items(nblocks, nthreads, [&](int64_t blk) {
    if (blas) return run_block(blk);
    const at::ThreadLocalStateGuard guard(caller);
    run_block(blk);
  });
  return y;
}

// [bytes kept by the per-thread scratch buffers (all threads), the keep limit per buffer, bytes
// of per-call mappings alive now, mappings made so far]: tests check that a large call leaves
// no more than the bounded scratch behind; benchmarks/packed_memory.py reports them.
std::vector<int64_t> scratch_stats() {
  const ScratchCounters& c = scratch_counters();
  return {c.kept.load(), static_cast<int64_t>(kScratchKeepBytes), c.mapped_live.load(),
          c.mapped_total.load()};
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
      "int m) -> Tensor",
      &nmfx::nm_dense);
  lib.def("scratch_stats() -> int[]", &nmfx::scratch_stats);
  lib.def("parallel_stats() -> int[]", &nmfx::parallel_stats);
  lib.def("mark_contended(float ms) -> ()", &nmfx::mark_contended_ms);
}
