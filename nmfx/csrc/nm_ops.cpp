// Torch entry points for the N:M kernels: argument checks, x/y staging, ISA selection and
// threading. Registered as the internal op library `nmfx_cpu`; the public op `nmfx::nm_linear`
// (Python, nmfx/kernels/_ops.py) calls into it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#include "nm_args.h"
#include "nm_kernels.h"
#include "nm_parallel.h"
#include "nm_scratch.h"

namespace nmfx {

// The highest ISA code (kernels/_build.py ISA_CODES) this process may use: every kernel choice
// (automatic or forced, nm_gemm, nm_dense, the mask kernels) treats the CPU as lacking the ISAs
// above it. Set from NMFX_ISA_CAP at load (nmfx/kernels/_build.py) or by set_isa_cap, so tests
// run on an AVX-512 host exactly what an AVX2-only or portable-only host would run.
std::atomic<int64_t> g_isa_cap{4};

int64_t isa_cap() { return g_isa_cap.load(std::memory_order_relaxed); }

#if defined(__x86_64__) || defined(__i386__)
namespace {
bool raw_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
  }();
  return yes;
}
bool raw_avx512() {
  static const bool yes = raw_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512dq");
  return yes;
}
bool raw_avx512bf16() {
  static const bool yes = raw_avx512() && __builtin_cpu_supports("avx512vbmi") &&
                          __builtin_cpu_supports("avx512bf16");
  return yes;
}
}  // namespace

bool cpu_has_avx2() { return isa_cap() >= 2 && raw_avx2(); }
bool cpu_has_avx512() { return isa_cap() >= 3 && raw_avx512(); }
bool cpu_has_avx512bf16() { return isa_cap() >= 4 && raw_avx512bf16(); }
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
bool cpu_has_avx512bf16() { return false; }
#endif

namespace {

constexpr int64_t kIsaAuto = 0;
constexpr int64_t kIsaPortable = 1;
constexpr int64_t kIsaAvx2 = 2;
constexpr int64_t kIsaAvx512 = 3;
// AVX-512 plus AVX512-BF16: the AVX-512 kernel, except that bf16 weights of the patterns of
// bf16dot_supports run dot products: the panel path (nm_bf16dot.cpp) under PATH_PANELS and,
// without a path bit, from kDotMinBatch rows of x; the GEMV (nm_bf16gemv.cpp) under PATH_GEMV
// and, without a path bit, below kDotMinBatch rows. Never picked by kIsaAuto: the autotuner
// times it.
constexpr int64_t kIsaAvx512Bf16 = 4;
// Path bits above the ISA code (at most one; the autotuner, tests and benchmarks use them to run
// one path): expanding W in registers at any batch, the batched path on x panels at any batch
// (nm_avx2.cpp, run_panels), or the selecting GEMV (one row of x, patterns 1:4, 1:8, 2:4, 4:8).
// A forced path runs that path on every x86 ISA or fails; the portable ISA has one path and
// ignores PATH_EXPAND / PATH_PANELS. Without a bit, the ISA's kernel picks: the AVX2 one selects
// at one row where the pattern allows, the AVX-512 one for 1:4, 1:8 and fp32 2:4 / 4:8 (its own
// selecting GEMV there, on CPUs with VBMI; it expands bf16/fp16 2:4 and 4:8); fewer than
// kPanelMinBatch rows expand W, and more take the batched path. PATH_GEMV (the
// bf16 dot-product GEMV, any rows of x) applies to ISA avx512bf16, bf16 weights and the
// patterns of bf16dot_supports; anywhere else it means no bit (the ISA's own pick), so a table
// naming it still runs on a host or weight without it.
constexpr int64_t kIsaMask = 0xff;
constexpr int64_t kPathExpand = 1 << 8;
constexpr int64_t kPathPanels = 1 << 9;
constexpr int64_t kPathSelect = 1 << 10;
constexpr int64_t kPathGemv = 1 << 11;
// The bf16 pair-dot-product GEMM (nm_bf16pairs.cpp) under ISA avx512bf16, bf16 weights of 2:4,
// 4:8, 1:4 or 1:8, any rows of x (made for 16+); elsewhere it means no bit, as PATH_GEMV.
constexpr int64_t kPathPairs = 1 << 12;
// The bf16 GEMM on W expanded into L2 slabs (nm_bf16vnni.cpp) under ISA avx512bf16, bf16 weights
// of bf16vnni_supports, any rows of x (made for 16+); elsewhere it means no bit, as PATH_GEMV.
constexpr int64_t kPathVnni = 1 << 13;
constexpr int64_t kPathBits =
    kPathExpand | kPathPanels | kPathSelect | kPathGemv | kPathPairs | kPathVnni;
constexpr int64_t kPanelMinBatch = 32;
constexpr int64_t kDotMinBatch = 8;
// Rows of x per call of the bf16 slab GEMM at most (its y^T of a group of weight rows stays in L2).
constexpr int64_t kVnniBlockRows = 256;

int64_t isa_support() {
  int64_t b = 1 << kIsaPortable;
  if (cpu_has_avx2()) b |= 1 << kIsaAvx2;
  if (cpu_has_avx512()) b |= 1 << kIsaAvx512;
  if (cpu_has_avx512bf16()) b |= 1 << kIsaAvx512Bf16;
  return b;
}

// Sets the ISA cap (1 portable .. 4 avx512bf16; see g_isa_cap) and returns the previous one.
int64_t set_isa_cap(int64_t cap) {
  TORCH_CHECK(cap >= kIsaPortable && cap <= kIsaAvx512Bf16, "nmfx: set_isa_cap(", cap,
              "): the cap is an ISA code from 1 (portable) to 4 (avx512bf16)");
  return g_isa_cap.exchange(cap);
}

using KernelFn = void (*)(const NMProblem&, int64_t, int64_t);

KernelFn select_kernel(int64_t isa) {
  const int64_t support = isa_support();
  if (isa == kIsaAuto) {
    isa = (support & (1 << kIsaAvx512)) ? kIsaAvx512
          : (support & (1 << kIsaAvx2)) ? kIsaAvx2
                                          : kIsaPortable;
  }
  TORCH_CHECK(isa >= kIsaPortable && isa <= kIsaAvx512Bf16, "nmfx: unknown ISA code ", isa);
  TORCH_CHECK(support & (1 << isa), "nmfx: ISA code ", isa,
              " is not supported by this CPU (supported bitmask ", support, ")");
  switch (isa) {
    case kIsaAvx512Bf16:
      return nm_gemm_avx512bf16;
    case kIsaAvx512:
      return nm_gemm_avx512;
    case kIsaAvx2:
      return nm_gemm_avx2;
    default:
      return nm_gemm_portable;
  }
}

// Rows of x holding a NaN or an Inf: F.linear multiplies them by every weight, the pruned zeros
// included (0 * Inf = NaN), while the selecting, batched, dot-product and portable paths multiply
// only the kept ones. For such a row b, y[b, r] becomes NaN wherever row r of W prunes a column
// where x is not finite; the kept products are the same on every path, so the results then agree
// with F.linear in every NaN and Inf. The scan costs one pass over x (small next to the GEMM).
// x is fp32 (float) or bf16 bits (uint16_t).
inline bool nonfinite(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return (bits & 0x7f800000u) == 0x7f800000u;
}
inline bool nonfinite(uint16_t v) { return (v & 0x7f80u) == 0x7f80u; }

// Whether any of row[0, cols) is NaN or Inf: an all-ones exponent plus its lowest bit carries
// into the sign bit. Branch-free ORs the compiler vectorizes (the per-element compare it did not
// vectorize had cost ~1 us of a 4096-column one-row call).
inline bool any_nonfinite(const float* row, int64_t cols) {
  uint32_t acc = 0;
  for (int64_t k = 0; k < cols; ++k) {
    uint32_t bits;
    std::memcpy(&bits, row + k, 4);
    acc |= (bits & 0x7f800000u) + 0x00800000u;
  }
  return (acc >> 31) != 0;
}
inline bool any_nonfinite(const uint16_t* row, int64_t cols) {
  uint32_t acc = 0;
  for (int64_t k = 0; k < cols; ++k) acc |= (row[k] & 0x7f80u) + 0x0080u;
  return (acc >> 15) & 1;
}

template <typename T>
void propagate_nonfinite(const T* x, int64_t ldsrc, int64_t B, int64_t cols,
                         const uint8_t* mask, int64_t KB, int64_t R, float* y) {
  std::vector<int64_t> bad;
  for (int64_t b = 0; b < B; ++b) {
    const T* row = x + b * ldsrc;
    if (!any_nonfinite(row, cols)) continue;
    bad.clear();
    for (int64_t k = 0; k < cols; ++k) {
      if (nonfinite(row[k])) bad.push_back(k);
    }
    for (int64_t r = 0; r < R; ++r) {
      const uint8_t* mrow = mask + r * KB;
      for (const int64_t k : bad) {
        if (((mrow[k >> 3] >> (k & 7)) & 1) == 0) {
          y[b * R + r] = std::numeric_limits<float>::quiet_NaN();
          break;
        }
      }
    }
  }
}

// bf16 x -> [B, ldxb] bf16 bits, columns past cols zero (the dot-product path's x).
void stage_x_bf16(const at::Tensor& x, int64_t cols, int64_t ldxb, uint16_t* out) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  const int64_t sb = x.stride(0);
  const int64_t sk = x.stride(1);
  for (int64_t b = 0; b < x.size(0); ++b) {
    uint16_t* dst = out + b * ldxb;
    const uint16_t* row = src + b * sb;
    if (sk == 1) {
      std::memcpy(dst, row, cols * sizeof(uint16_t));
    } else {
      for (int64_t k = 0; k < cols; ++k) dst[k] = row[k * sk];
    }
    std::fill(dst + cols, dst + ldxb, uint16_t{0});
  }
}

// x -> fp32 [B, ldx], columns past cols zero; plain loops (a TensorIterator copy costs
// microseconds, which is a lot next to a small GEMV).
void stage_x(const at::Tensor& x, int64_t cols, int64_t ldx, float* xb) {
  const int64_t B = x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "nmfx_stage_x", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    const int64_t sb = x.stride(0);
    const int64_t sk = x.stride(1);
    for (int64_t b = 0; b < B; ++b) {
      float* dst = xb + b * ldx;
      const scalar_t* row = src + b * sb;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (sk == 1) {
          std::memcpy(dst, row, cols * sizeof(float));
        } else {
          for (int64_t k = 0; k < cols; ++k) dst[k] = row[k * sk];
        }
      } else {
        for (int64_t k = 0; k < cols; ++k) dst[k] = static_cast<float>(row[k * sk]);
      }
      std::fill(dst + cols, dst + ldx, 0.f);
    }
  });
}

// y [B, rows] fp32, every row the bias (or zero): the kernels accumulate into it. With B == 0
// y has no row to hold the bias.
at::Tensor init_y(int64_t B, int64_t rows, const std::optional<at::Tensor>& bias) {
  at::Tensor y = new_buffer({B, rows}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0) return y;
  float* yp = y.data_ptr<float>();
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bc = bias->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, bc.scalar_type(), "nmfx_bias", [&] {
      const scalar_t* bp = bc.const_data_ptr<scalar_t>();
      for (int64_t r = 0; r < rows; ++r) yp[r] = static_cast<float>(bp[r]);
    });
  } else {
    std::fill(yp, yp + rows, 0.f);
  }
  for (int64_t b = 1; b < B; ++b) std::memcpy(yp + b * rows, yp, rows * sizeof(float));
  return y;
}

constexpr int64_t kPanelBlock = 256;  // rows of x per batched-path work item, at most

// Runs fn over every weight row (and, on the batched path, every panel of x) on the torch
// threads. Small problems stay on one thread (a fork costs more than it saves below ~64k
// multiply-adds). Otherwise threads take work items from a shared counter (parallel_items,
// which also stays on one thread for a while after waiting on a descheduled thread).
void run_threads(KernelFn fn, const NMProblem& p, int64_t cols) {
  const int64_t rows = p.R;
  const int64_t nthreads = at::get_num_threads();
  const int64_t macs = rows * std::max<int64_t>(cols, 1) * p.B;
  if (nthreads <= 1 || macs < (int64_t{1} << 16)) {
    if (p.xpanel == nullptr) return fn(p, 0, rows);
    // The batched path keeps y^T [weight rows, rows of x] per thread: at most kPanelBlock rows
    // of x at a time, as in the work items below.
    for (int64_t b0 = 0; b0 < p.nbp; b0 += kPanelBlock) {
      NMProblem q = p;
      q.pb0 = b0;
      q.pb1 = std::min(p.nbp, b0 + kPanelBlock);
      fn(q, 0, rows);
    }
    return;
  }
  int64_t items, rchunk, bchunk = p.nbp, nbc = 1;
  if (p.xpanel != nullptr) {
    // The batched path re-reads the x panels for every chunk of weight rows, so chunks are at
    // least 128 rows; with few weight rows, work is split along x as well (blocks of 32-256
    // rows of x). 16-row chunks had made 256x4096 at 256-1024 rows of x 0.71-0.78x dense.
    rchunk = std::max<int64_t>(128, ((rows + nthreads * 4 - 1) / (nthreads * 4) + 7) / 8 * 8);
    const int64_t nrc = (rows + rchunk - 1) / rchunk;
    bchunk = kPanelBlock;
    while (bchunk > kPanelBatch && nrc * ((p.nbp + bchunk - 1) / bchunk) < 2 * nthreads) {
      bchunk /= 2;
    }
    nbc = (p.nbp + bchunk - 1) / bchunk;
    items = nrc * nbc;
  } else {  // chunks of rows, about 8 per thread
    const int64_t per = (rows + nthreads * 8 - 1) / (nthreads * 8);
    rchunk = std::max<int64_t>(8, (per + 7) / 8 * 8);
    items = (rows + rchunk - 1) / rchunk;
  }
  parallel_items(items, nthreads, [&](int64_t i) {
    NMProblem q = p;
    if (p.xpanel != nullptr) {
      q.pb0 = i % nbc * bchunk;
      q.pb1 = std::min(p.nbp, q.pb0 + bchunk);
    }
    const int64_t r0 = i / nbc * rchunk;
    fn(q, r0, std::min(rows, r0 + rchunk));
  });
}

at::Tensor to_dtype(const at::Tensor& y, at::ScalarType dtype) {
  if (dtype == at::kFloat) return y;
  const int64_t n = y.numel();
  const float* yp = y.const_data_ptr<float>();
  at::Tensor out = new_buffer(y.sizes(), y.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "nmfx_out", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) op[i] = static_cast<scalar_t>(yp[i]);
  });
  return out;
}

// Rows xs of x (at most a staging block) through the kernel: staged as fp32 rows (regrouped for
// the 1:4/1:8 GEMV) or as transposed panels for the batched path, the kernel over the threads,
// then NaN/Inf as in F.linear, into y (the block's first row of the output).
void run_rows(KernelFn fn, NMProblem p, const at::Tensor& xs, int64_t cols, bool panels,
              bool direct, float* y) {
  const int64_t B = xs.size(0);
  const int64_t ldx = p.ldx;
  at::Tensor xhold, xsel, xpanel;  // hold per-call buffers only when over the scratch limit
  float* xb = direct ? nullptr : scratch_floats(kScratchX, B * ldx, xhold);
  if (!direct) stage_x(xs, cols, ldx, xb);
  float* xsel_p = nullptr;  // the batch-1 GEMV for 1:4 and 1:8 reads x regrouped
  if (!panels && xsel_chunk(B, p.n, p.m) > 0) {
    xsel_p = scratch_floats(kScratchSel, ldx, xsel);
    stage_xsel(xb, cols, p.m, xsel_p);
  }
  const float* src = direct ? xs.const_data_ptr<float>() : xb;
  const int64_t ldsrc = direct ? xs.stride(0) : ldx;
  float* xp = nullptr;
  const int64_t nbp = (B + kPanelBatch - 1) / kPanelBatch * kPanelBatch;
  if (panels) {
    xp = scratch_floats(kScratchPanels, panel_numel(nbp, ldx), xpanel);
    // One panel of kPanelBatch rows of x per item (parallel_items: no join on a late thread).
    const int64_t stage_threads = B * cols < (int64_t{1} << 16) ? 1 : at::get_num_threads();
    parallel_items(nbp / kPanelBatch, stage_threads, [&](int64_t blk) {
      stage_panels(src, ldsrc, cols, B, ldx, nbp, blk * kPanelBatch, (blk + 1) * kPanelBatch, xp);
    });
  }
  p.x = xb;
  p.xsel = xsel_p;
  p.B = B;
  p.y = y;
  p.xpanel = xp;
  p.nbp = nbp;
  p.pb0 = 0;
  p.pb1 = nbp;
  run_threads(fn, p, cols);
  propagate_nonfinite(src, ldsrc, B, cols, p.mask, p.KB, p.R, p.y);
}

// The same for the bf16 dot-product path (p.ldxb set): x staged as bf16 rows of ldxb columns.
void run_rows_dot(KernelFn fn, NMProblem p, const at::Tensor& xs, int64_t cols, float* y) {
  const int64_t B = xs.size(0);
  at::Tensor xhold;
  uint16_t* xd = static_cast<uint16_t*>(
      scratch_bytes(kScratchX, static_cast<size_t>(B * p.ldxb) * sizeof(uint16_t), xhold));
  stage_x_bf16(xs, cols, p.ldxb, xd);
  p.xbf16 = xd;
  p.B = B;
  p.y = y;
  run_threads(fn, p, cols);
  propagate_nonfinite(xd, p.ldxb, B, cols, p.mask, p.KB, p.R, p.y);
}

// The same for the bf16 pair path: x staged as 32-row words per column (bf16pairs_stage). With
// `out` (bf16 [B, R] bits) the kernel writes bf16(sum + bias) itself, y unused; then nothing is
// computed and false returned where x holds NaN or Inf (the caller runs the fp32 path).
bool run_rows_pairs(NMProblem p, const at::Tensor& xs, int64_t cols, float* y,
                    const float* bias = nullptr, uint16_t* out = nullptr) {
  const int64_t B = xs.size(0);
  const int64_t ldc = p.KB * 8;
  const int64_t words = (B + kBf16PairsLanes - 1) / kBf16PairsLanes * ldc * kBf16PairsLanes;
  at::Tensor xhold;
  uint16_t* xt = static_cast<uint16_t*>(
      scratch_bytes(kScratchX, static_cast<size_t>(words) * sizeof(uint16_t), xhold));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(xs.const_data_ptr<at::BFloat16>());
  p.xpairs = xt;
  p.B = B;
  p.y = y;
  // One parallel region per call: the first items stage x (64 windows of 8 columns each), the
  // rest are chunks of weight rows, about 2 per thread (each rebuilds the table slices it reads).
  // Items are handed out in order, so a chunk waits only on staging items being run (a region
  // of its own for the staging had cost one more fork and join per call).
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(64, (p.R + 2 * threads - 1) / (2 * threads) + 3) / 4 * 4;
  const int64_t macs = p.R * cols * B;
  const bool serial = threads <= 1 || macs < (int64_t{1} << 16) || chunk >= p.R;
  const int64_t pre = (p.KB + 63) / 64;
  const int64_t chunks = serial ? 1 : (p.R + chunk - 1) / chunk;
  std::atomic<bool> any{false};
  std::atomic<int64_t> staged{0};
  parallel_items(pre + chunks, serial ? 1 : threads, [&](int64_t i) {
    if (i < pre) {
      const int64_t w0 = i * 64, w1 = std::min(p.KB, w0 + 64);
      if (bf16pairs_stage(src, xs.stride(0), xs.stride(1), B, cols, ldc, w0 * 8, w1 * 8, xt)) {
        any = true;
      }
      staged.fetch_add(1, std::memory_order_release);
      return;
    }
    while (staged.load(std::memory_order_acquire) < pre) std::this_thread::yield();
    if (any && out != nullptr) return;  // the caller runs the fp32 path
    const int64_t r0 = serial ? 0 : (i - pre) * chunk;
    nm_gemm_bf16pairs_out(p, r0, serial ? p.R : std::min(p.R, r0 + chunk), bias, out);
  });
  if (any && out != nullptr) return false;
  if (any) {
    const at::Tensor xc = xs.contiguous();
    propagate_nonfinite(reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>()),
                        cols, B, cols, p.mask, p.KB, p.R, p.y);
  }
  return true;
}

// The bf16 pair GEMM (PATH_PAIRS) with its bf16 output written by the kernel, bias added: no
// fp32 y to allocate, fault in, fill and convert on one thread (at 1024x1024, 256 rows of x, that
// had cost a fifth of the call on two threads). Blocks of rows of x as run_rows' pair blocks. An
// undefined tensor where x holds NaN or Inf: the caller's fp32 path propagates them.
at::Tensor run_pairs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                     const std::optional<at::Tensor>& bias, const PackedShape& shape,
                     int64_t rows, int64_t cols, int64_t n, int64_t m) {
  const int64_t B = x.size(0);
  at::Tensor out = new_buffer({B, rows}, x.options());
  const at::Tensor bf = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous()
                                                          : at::Tensor();
  const ValueTail vt = value_tail(values, rows, shape.kept);
  const NMProblem p = weight_problem(values, mask, shape, vt, rows, n, m);
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t per_row = p.KB * 8 * 2;
  const int64_t most = std::max(kBf16PairsLanes, static_cast<int64_t>(kScratchKeepBytes) / per_row /
                                                     kBf16PairsLanes * kBf16PairsLanes);
  const int64_t nblk = (B + most - 1) / most;
  const int64_t block =
      std::min(most, ((B + nblk - 1) / nblk + kBf16PairsLanes - 1) / kBf16PairsLanes * kBf16PairsLanes);
  for (int64_t b0 = 0; b0 < B; b0 += block) {
    const int64_t bs = std::min(block, B - b0);
    const at::Tensor xs = bs >= B ? x : x.narrow(0, b0, bs);
    if (!run_rows_pairs(p, xs, cols, nullptr, bf.defined() ? bf.const_data_ptr<float>() : nullptr,
                        op + b0 * rows)) {
      return at::Tensor();
    }
  }
  return out;
}

// The bf16 slab GEMM (PATH_VNNI): writes the bf16 output itself, bias added, blocks of at most
// kVnniBlockRows rows of x staged in VNNI pairs. No NaN/Inf scan: it multiplies the pruned zeros
// as F.linear does.
at::Tensor run_vnni(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                    const std::optional<at::Tensor>& bias, const PackedShape& shape, int64_t rows,
                    int64_t cols, int64_t n, int64_t m) {
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t B = xc.size(0);
  at::Tensor out = new_buffer({B, rows}, x.options());
  const at::Tensor bf = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous()
                                                          : at::Tensor();
  const ValueTail vt = value_tail(values, rows, shape.kept);
  NMProblem p = weight_problem(values, mask, shape, vt, rows, n, m);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.const_data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t b0 = 0; b0 < B; b0 += kVnniBlockRows) {
    p.B = std::min(kVnniBlockRows, B - b0);
    at::Tensor hold;
    const int64_t words = bf16vnni_staged_words(p.B, cols);
    auto* staging = static_cast<uint32_t*>(
        scratch_bytes(kScratchX, static_cast<size_t>(words) * sizeof(uint32_t), hold));
    nm_gemm_bf16vnni(p, xp + b0 * xc.stride(0), xc.stride(0), cols,
                     bf.defined() ? bf.const_data_ptr<float>() : nullptr, op + b0 * rows, staging);
  }
  return out;
}

// nm_gemm: argument checks, the kernel over blocks of rows of x (run_rows), the output dtype.
at::Tensor nm_gemm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                   const std::optional<at::Tensor>& bias, int64_t rows, int64_t cols, int64_t n,
                   int64_t m, int64_t isa) {
  int64_t path = isa & ~kIsaMask;
  isa &= kIsaMask;
  TORCH_CHECK((path & ~kPathBits) == 0 && (path & (path - 1)) == 0, "nmfx: bad path bits ", path,
              " (at most one of PATH_EXPAND, PATH_PANELS, PATH_SELECT, PATH_GEMV, PATH_PAIRS, PATH_VNNI)");
  const PackedShape shape = check_packed(x, values, mask, bias, rows, cols, n, m);
  const KernelFn fn = select_kernel(isa);
  const int64_t B = x.size(0);
  TORCH_CHECK(path != kPathSelect || (fn != nm_gemm_portable && B <= 1 &&
                                      has_select_gemv(static_cast<int>(n), static_cast<int>(m))),
              "nmfx: PATH_SELECT needs an x86 ISA, one row of x and pattern 1:4, 1:8, 2:4 or 4:8; "
              "got ", B, " rows, pattern ", n, ":", m);
  const bool vnni_ok = fn == nm_gemm_avx512bf16 && shape.vtype == ValueType::kBFloat16 &&
                       bf16vnni_supports(static_cast<int>(n), static_cast<int>(m));
  if (path == kPathVnni && !vnni_ok) path = 0;  // as PATH_GEMV
  if (path == kPathVnni && B > 0 && rows > 0) {
    return run_vnni(x, values, mask, bias, shape, rows, cols, n, m);
  }
  if (path == kPathPairs && B > 0 && rows > 0 && fn == nm_gemm_avx512bf16 &&
      shape.vtype == ValueType::kBFloat16 &&
      bf16pairs_kind(static_cast<int>(n), static_cast<int>(m)) >= 0) {
    const at::Tensor out = run_pairs(x, values, mask, bias, shape, rows, cols, n, m);
    if (out.defined()) return out;
  }
  at::Tensor y = init_y(B, rows, bias);
  if (B == 0 || rows == 0) return y.to(x.scalar_type());

  // Many rows of x take the batched path (x86 SIMD kernels only), which reads x as transposed
  // panels: fp32 x with unit column stride is staged into them directly, without the fp32 copy.
  const int64_t ldx = std::max<int64_t>(16, (cols + 15) / 16 * 16);
  // bf16 dot products (ISA avx512bf16 only): the panel path forced by PATH_PANELS, else from
  // kDotMinBatch rows; the GEMV forced by PATH_GEMV, else below kDotMinBatch rows.
  const bool dot_ok = fn == nm_gemm_avx512bf16 && shape.vtype == ValueType::kBFloat16 &&
                      bf16dot_supports(static_cast<int>(n), static_cast<int>(m));
  if (path == kPathGemv && !dot_ok) path = 0;  // not this ISA, dtype or pattern: the ISA's pick
  const bool pairs_ok = fn == nm_gemm_avx512bf16 && shape.vtype == ValueType::kBFloat16 &&
                        bf16pairs_kind(static_cast<int>(n), static_cast<int>(m)) >= 0;
  if (path == kPathPairs && !pairs_ok) path = 0;  // as PATH_GEMV
  const bool pairs = path == kPathPairs;
  const bool gemv = dot_ok && (path == kPathGemv || (path == 0 && B < kDotMinBatch));
  const bool dot = dot_ok && !gemv && (path == kPathPanels || (path == 0 && B >= kDotMinBatch));
  const bool panels = !dot && !gemv && fn != nm_gemm_portable &&
                      (path == kPathPanels || (path == 0 && B >= kPanelMinBatch));
  const bool direct = panels && x.scalar_type() == at::kFloat && x.stride(1) == 1;
  const ValueTail vt = value_tail(values, rows, shape.kept);
  NMProblem p = weight_problem(values, mask, shape, vt, rows, n, m);
  p.ldx = ldx;
  if (dot || gemv) {  // columns of staged x: whole vectors of 32 kept values (64-256 columns)
    const int64_t span = 64 * (32 / (64 / m * n));
    p.ldxb = (cols + span - 1) / span * span;
  }
  p.select = path == kPathExpand   ? SelectMode::kNever
             : path == kPathSelect ? SelectMode::kAlways
                                   : SelectMode::kAuto;
  // x is staged a block of rows at a time, so the staging stays in the kept per-thread scratch
  // (a whole 512x4096 x staged at once had left 8-16 MB resident per slot after the call).
  const int64_t per_row =
      pairs         ? p.KB * 8 * 2
      : dot || gemv ? p.ldxb * 2
                    : (direct ? 0 : ldx * 4) + (panels ? panel_cols(ldx) * 4 : 0);
  // Blocks of equal size (a last block of a few rows would cost a pass over W for little).
  const int64_t unit = panels ? kPanelBatch : pairs ? kBf16PairsLanes : 1;
  const int64_t most = std::max(unit, static_cast<int64_t>(kScratchKeepBytes) / per_row / unit * unit);
  const int64_t nblk = (B + most - 1) / most;
  const int64_t block = std::min(most, ((B + nblk - 1) / nblk + unit - 1) / unit * unit);
  for (int64_t b0 = 0; b0 < B; b0 += block) {
    const int64_t bs = std::min(block, B - b0);
    const at::Tensor xs = bs >= B ? x : x.narrow(0, b0, bs);
    if (pairs) {
      run_rows_pairs(p, xs, cols, y.data_ptr<float>() + b0 * rows);
    } else if (dot || gemv) {
      run_rows_dot(gemv ? nm_gemv_avx512bf16 : fn, p, xs, cols, y.data_ptr<float>() + b0 * rows);
    } else {
      run_rows(fn, p, xs, cols, panels, direct, y.data_ptr<float>() + b0 * rows);
    }
  }
  return to_dtype(y, x.scalar_type());
}

// Several packed weights against the same rows of x on the bf16 GEMV (a decoder's q/k/v or
// gate/up projections at decode): x staged once, and every member's chunks of rows (the chunks
// run_threads would make for it alone, so each output is bit-identical to the member's own call)
// taken from one shared counter in one parallel region: one fork and join instead of one per
// member, and the small k/v projections' chunks fill the threads beside q's.
void run_group_dot(std::vector<NMProblem>& ps, const at::Tensor& x, int64_t cols) {
  const int64_t B = x.size(0);
  const int64_t ldxb = ps.front().ldxb;
  at::Tensor xhold;
  uint16_t* xd = static_cast<uint16_t*>(
      scratch_bytes(kScratchX, static_cast<size_t>(B * ldxb) * sizeof(uint16_t), xhold));
  stage_x_bf16(x, cols, ldxb, xd);
  const int64_t nthreads = at::get_num_threads();
  std::vector<int64_t> first(ps.size() + 1, 0), chunk(ps.size());
  int64_t macs = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    NMProblem& p = ps[i];
    p.xbf16 = xd;
    p.B = B;
    const int64_t per = (p.R + nthreads * 8 - 1) / (nthreads * 8);  // as run_threads
    chunk[i] = std::max<int64_t>(8, (per + 7) / 8 * 8);
    first[i + 1] = first[i] + (p.R + chunk[i] - 1) / chunk[i];
    macs += p.R * cols * B;
  }
  if (nthreads <= 1 || macs < (int64_t{1} << 16)) {
    for (const NMProblem& p : ps) nm_gemv_avx512bf16(p, 0, p.R);
  } else {
    parallel_items(first.back(), nthreads, [&](int64_t item) {
      const size_t i = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
      const int64_t r0 = (item - first[i]) * chunk[i];
      nm_gemv_avx512bf16(ps[i], r0, std::min(ps[i].R, r0 + chunk[i]));
    });
  }
  for (const NMProblem& p : ps) propagate_nonfinite(xd, ldxb, B, cols, p.mask, p.KB, p.R, p.y);
}

// nm_gemm of several bias-free packed weights [rows[i], cols] on the same x, as one call where
// they all run the bf16 GEMV at this many rows of x (run_group_dot); otherwise nm_gemm per member
// (the same outputs, without the sharing).
std::vector<at::Tensor> nm_gemm_group(const at::Tensor& x, at::TensorList values,
                                      at::TensorList masks, at::IntArrayRef rows, int64_t cols,
                                      int64_t n, int64_t m, int64_t isa) {
  TORCH_CHECK(!values.empty() && values.size() == masks.size() && values.size() == rows.size(),
              "nmfx: nm_gemm_group needs as many values, masks and rows (at least one), got ",
              values.size(), ", ", masks.size(), ", ", rows.size());
  const int64_t path = isa & ~kIsaMask;
  const int64_t B = x.dim() == 2 ? x.size(0) : 0;
  const int64_t span = 64 * (32 / std::max<int64_t>(1, 64 / std::max<int64_t>(m, 1) * n));
  const int64_t ldxb = (cols + span - 1) / span * span;
  bool fused = B > 0 && select_kernel(isa & kIsaMask) == nm_gemm_avx512bf16 &&
               bf16dot_supports(static_cast<int>(n), static_cast<int>(m)) &&
               (path == kPathGemv || (path == 0 && B < kDotMinBatch)) &&
               static_cast<size_t>(B * ldxb) * sizeof(uint16_t) <= kScratchKeepBytes;
  std::vector<PackedShape> shapes;
  for (size_t i = 0; i < values.size(); ++i) {
    shapes.push_back(check_packed(x, values[i], masks[i], std::nullopt, rows[i], cols, n, m));
    fused = fused && shapes.back().vtype == ValueType::kBFloat16 && rows[i] > 0;
  }
  std::vector<at::Tensor> out;
  if (!fused) {
    for (size_t i = 0; i < values.size(); ++i) {
      out.push_back(nm_gemm(x, values[i], masks[i], std::nullopt, rows[i], cols, n, m, isa));
    }
    return out;
  }
  std::vector<ValueTail> tails;  // outlive the problems (tail_values points into them)
  std::vector<NMProblem> ps;
  for (size_t i = 0; i < values.size(); ++i) {
    tails.push_back(value_tail(values[i], rows[i], shapes[i].kept));
    NMProblem p = weight_problem(values[i], masks[i], shapes[i], tails.back(), rows[i], n, m);
    p.ldx = std::max<int64_t>(16, (cols + 15) / 16 * 16);
    p.ldxb = ldxb;
    p.select = SelectMode::kAuto;
    out.push_back(init_y(B, rows[i], std::nullopt));
    p.y = out.back().data_ptr<float>();
    ps.push_back(p);
  }
  run_group_dot(ps, x, cols);
  for (at::Tensor& y : out) y = to_dtype(y, x.scalar_type());
  return out;
}

// [stalls, serial calls, late starts, the last window on one thread (ns), ns left of it,
// stalls and late starts that opened no window (one-offs), parallel calls] (nm_parallel.h):
// what the contention guard has seen in this process.
std::vector<int64_t> parallel_guard_stats() {
  const ParallelCounters& c = parallel_counters();
  return {c.stalls.load(), c.serial_calls.load(), c.late_starts.load(), c.window_ns.load(),
          std::max<int64_t>(0, c.serial_until_ns.load() - steady_ns()), c.one_offs.load(),
          c.parallel_calls.load()};
}

// The guard's event log since the last clearing read (the newest kEventSlots at most), as
// kEventFields values per call (nm_parallel.h's log_event), oldest first.
std::vector<int64_t> parallel_guard_events(bool clear) {
  ParallelCounters& c = parallel_counters();
  const int64_t written = c.events_written.load();
  const int64_t first = std::max(c.events_read.load(), written - kEventSlots);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>((written - first) * kEventFields));
  for (int64_t e = first; e < written; ++e) {
    for (int f = 0; f < kEventFields; ++f) out.push_back(c.events[e % kEventSlots][f].load());
  }
  if (clear) c.events_read.store(written);
  return out;
}

// Whether the guard acts on its evidence (default) or only logs it (benchmarks comparing the
// two); returns the previous setting.
bool set_guard_active(bool active) { return parallel_counters().active.exchange(active); }

// The rule (guard_step) replayed from a fresh state over evidence at the given times (ns),
// under `rule` ([serial, serial max, confirm] ns; empty: the kernels' rule): the window each
// piece of evidence opened (0: a one-off). For tests, without real stalls.
std::vector<int64_t> guard_replay(c10::ArrayRef<int64_t> times, c10::ArrayRef<int64_t> rule) {
  TORCH_CHECK(rule.empty() || rule.size() == 3,
              "nmfx: guard_replay's rule is [serial, serial max, confirm] ns or empty; got ",
              rule.size(), " values");
  GuardRule r;
  if (!rule.empty()) r = GuardRule{rule[0], rule[1], rule[2]};
  GuardState s;
  std::vector<int64_t> windows;
  for (const int64_t now : times) windows.push_back(guard_step(s, r, now));
  return windows;
}

// A synthetic parallel_items call for the guard's tests: `items` items of `item_us` of spinning
// each; a thread other than the caller first sleeps `other_delay_us` inside its first item (as
// if preempted there). Returns [items run by the caller, items run by other threads].
std::vector<int64_t> parallel_probe(int64_t items, double item_us, double other_delay_us) {
  TORCH_CHECK(items >= 0 && item_us >= 0 && other_delay_us >= 0,
              "nmfx: parallel_probe needs items, item_us and other_delay_us >= 0; got ", items,
              ", ", item_us, ", ", other_delay_us);
  std::atomic<int64_t> by_caller{0}, by_others{0};
  std::atomic<bool> delayed{false};
  parallel_items(items, at::get_num_threads(), [&](int64_t) {
    const bool caller = at::get_thread_num() == 0;
    if (!caller && !delayed.exchange(true)) {
      std::this_thread::sleep_for(std::chrono::nanoseconds(static_cast<int64_t>(other_delay_us * 1e3)));
    }
    const int64_t until = steady_ns() + static_cast<int64_t>(item_us * 1e3);
    while (steady_ns() < until) {
    }
    (caller ? by_caller : by_others).fetch_add(1);
  });
  return {by_caller.load(), by_others.load()};
}

// contention_kind of one call's timing (ns), for the guard's tests: 0 none, 1 stall, 2 late start.
int64_t contention_kind_of(int64_t fork, int64_t caller_start, int64_t caller_done,
                           int64_t caller_items, int64_t other_start, int64_t idle, int64_t now) {
  CallTiming t;
  t.fork = fork;
  t.caller_start = caller_start;
  t.caller_done = caller_done;
  t.caller_items = caller_items;
  t.other_start = other_start;
  t.idle = idle;
  return contention_kind(t, now);
}

}  // namespace
}  // namespace nmfx

TORCH_LIBRARY(nmfx_cpu, lib) {
  lib.def(
      "nm_gemm(Tensor x, Tensor values, Tensor mask, Tensor? bias, int rows, int cols, int n, "
      "int m, int isa) -> Tensor",
      &nmfx::nm_gemm);
  lib.def(
      "nm_gemm_group(Tensor x, Tensor[] values, Tensor[] masks, int[] rows, int cols, int n, "
      "int m, int isa) -> Tensor[]",
      &nmfx::nm_gemm_group);
  lib.def("isa_support() -> int", &nmfx::isa_support);
  lib.def("set_isa_cap(int cap) -> int", &nmfx::set_isa_cap);
  lib.def("parallel_guard_stats() -> int[]", &nmfx::parallel_guard_stats);
  lib.def("parallel_guard_events(bool clear=False) -> int[]", &nmfx::parallel_guard_events);
  lib.def("set_guard_active(bool active) -> bool", &nmfx::set_guard_active);
  lib.def("guard_replay(int[] times, int[] rule=[]) -> int[]", &nmfx::guard_replay);
  lib.def("parallel_probe(int items, float item_us, float other_delay_us) -> int[]",
          &nmfx::parallel_probe);
  lib.def(
      "contention_kind_of(int fork, int caller_start, int caller_done, int caller_items, "
      "int other_start, int idle, int now) -> int",
      &nmfx::contention_kind_of);
}
