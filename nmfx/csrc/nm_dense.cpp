// The dense branch of nm_linear without a resident dense weight: W is expanded per call, a block
// of rows at a time, into a per-thread scratch buffer (its dtype, bit for bit), and torch's dense
// GEMM (MKL / oneDNN) runs on each block. Where dense wins (compute-bound batches) expanding costs
// one memory-bound pass over the packed weight next to a compute-bound GEMM; the lowered model's
// resident weight memory stays its packed size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <vector>

#include "nm_args.h"
#include "nm_kernels.h"
#include "nm_scratch.h"

namespace nmfx {
namespace {

// Dense bytes per block: a block stays in L2/L3 between its expansion and its GEMM.
constexpr int64_t kDenseBlockBytes = int64_t{1} << 21;

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

  const int64_t esize = values.element_size();
  const int64_t ldo = (cols + 15) / 16 * 16;
  const int64_t rb = std::clamp<int64_t>(kDenseBlockBytes / (ldo * esize) / 16 * 16, 16, rows);
  const int64_t nblocks = (rows + rb - 1) / rb;
  const bool has_bias = bias.has_value() && bias->defined();
  auto run_block = [&](int64_t blk) {
    const int64_t r0 = blk * rb;
    const int64_t nr = std::min(rows, r0 + rb) - r0;
    at::Tensor hold;
    void* buf = scratch_bytes(kScratchDense, static_cast<size_t>(rb * ldo * esize), hold);
    expand(p, r0, r0 + nr, buf, ldo);
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
  // Blocks from a shared counter (a preempted thread does not hold the others up); each
  // thread expands into its own scratch and runs a one-thread GEMM on its block.
  // The GEMMs go through the dispatcher on worker threads: they need the caller's thread-local
  // state (inference mode, autograd and dispatch keys), which OpenMP workers do not inherit.
  const at::ThreadLocalState caller;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nthreads, nblocks), 1, [&](int64_t t0, int64_t t1) {
    const at::ThreadLocalStateGuard guard(caller);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t blk = next.fetch_add(1); blk < nblocks; blk = next.fetch_add(1)) {
        run_block(blk);
      }
    }
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

}  // namespace
}  // namespace nmfx

TORCH_LIBRARY_FRAGMENT(nmfx_cpu, lib) {
  lib.def(
      "nm_dense(Tensor x, Tensor values, Tensor mask, Tensor? bias, int rows, int cols, int n, "
      "int m) -> Tensor",
      &nmfx::nm_dense);
  lib.def("scratch_stats() -> int[]", &nmfx::scratch_stats);
}
