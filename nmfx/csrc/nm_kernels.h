// Shared declarations for nmfx's N:M sparse linear kernels.
//
// Packed layout (see nmfx/packed.py, format version 1): for a weight [R, K] with pattern N:M
//   values [R, K*N/M]  kept values of each row in column order (fp32, bf16 or fp16)
//   mask   [R, KB]     uint8, KB = ceil(K/8); bit j of byte b <=> dense column 8*b + j is kept.
//                      Bits past column K are zero.
// Every kernel computes y[b, r] = init[b, r] + sum_k W[r, k] * x[b, k] in fp32, where x is an fp32
// buffer [B, ldx] whose columns K..ldx-1 are zero (ldx is a multiple of 16).
#pragma once

#include <algorithm>
#include <cstdint>

#include "nm_thread_buffer.h"
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace nmfx {

enum class ValueType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class SelectMode : int { kAuto = 0, kNever = 1, kAlways = 2 };

// Patterns with a batch-1 selecting GEMV: one kept value per group (1:4, 1:8) or four per 8
// columns (2:4, 4:8).
inline bool has_select_gemv(int n, int m) {
  return (n == 1 && (m == 4 || m == 8)) || (n == 2 && m == 4) || (n == 4 && m == 8);
}

// Patterns of the AVX512-BF16 dot-product path (nm_bf16dot.cpp): M divides 32 and every 64
// columns keep 8, 16 or 32 values (N/M = 1/8, 1/4 or 1/2: 2:4, 4:8, 8:16, 1:4, 2:8, 1:8, ...).
inline bool bf16dot_supports(int n, int m) {
  if (m <= 0 || n <= 0 || 32 % m != 0) return false;
  const int kept64 = 64 / m * n;
  return kept64 == 8 || kept64 == 16 || kept64 == 32;
}

struct NMProblem {
  const float* x;          // [B, ldx], zero padded past K
  int64_t B;
  int64_t ldx;
  const void* values;      // [R, kept] row-major
  int64_t kept;            // kept values per row (K*N/M)
  const uint8_t* mask;     // [R, KB]
  int64_t KB;              // mask bytes per row
  int64_t R;
  int n;                   // pattern N:M
  int m;
  ValueType vtype;
  // Rows >= safe_rows read their values from `tail_values` (a copy of the last rows followed by
  // zero padding) so that 8- or 16-wide loads never run past the end of `values`. Rows on one
  // side of safe_rows are contiguous with stride `kept`; kernels never tile across it.
  int64_t safe_rows;
  const void* tail_values;
  float* y;                // [B, R] fp32, pre-initialised (bias or zero); kernels accumulate
  // Optional (may be null): for B == 1 and N == 1, M in {4, 8}, x regrouped for the selecting
  // GEMV: per chunk of 8*M columns, xsel[c*8M + j*8 + i] = x[c*8M + i*M + j] (see stage_xsel).
  const float* xsel;
  // Optional (may be null): x transposed in panels of kPanelBatch rows for the batched path
  // (nm_avx2.cpp, run_panels), cut into slices of kPanelKC columns; see panel_index.
  // nbp is B rounded up to a multiple of kPanelBatch.
  const float* xpanel;
  int64_t nbp;
  // The batched path computes rows of x [pb0, pb1) only (multiples of kPanelBatch within
  // [0, nbp)), so threads can split a weight with few rows along x instead.
  int64_t pb0;
  int64_t pb1;
  // The batch-1 selecting GEMV (x86 kernels; patterns 1:4, 1:8, 2:4, 4:8 only): kAuto lets each
  // ISA's kernel pick, kNever expands W (nm_gemm's PATH_EXPAND bit), kAlways selects
  // (PATH_SELECT; nm_gemm checks B == 1 and the pattern first).
  SelectMode select;
  // Optional (may be null): x as bf16 [B, ldxb], zero past K, for the AVX512-BF16 dot-product
  // path (nm_bf16dot.cpp); set only for bf16 values, a pattern of bf16dot_supports and a CPU
  // with avx512_bf16. ldxb (a multiple of 64) covers every column the path reads.
  const uint16_t* xbf16;
  int64_t ldxb;
  // Optional (may be null): x staged for the AVX512-BF16 pair path (nm_bf16pairs.cpp,
  // bf16pairs_stage).
  const void* xpairs;
};

// Rows of x per panel, and columns per slice of a panel, of the batched path.
constexpr int64_t kPanelBatch = 32;
constexpr int64_t kPanelKC = 128;  // multiple of 16, so a slice holds whole groups of M

// Panel slices are stored slice-column-major: the slices of all panels for columns
// [c * kPanelKC, (c + 1) * kPanelKC) are contiguous, so one pass over those columns reads one
// contiguous block. (Panels of a whole ldx each put the slices a pass reads a power of two
// apart, e.g. 512 KB at 4096 columns, onto the same cache sets: 256 rows of x ran 6x slower
// than 128 at 64x1024.)
inline int64_t panel_index(int64_t b, int64_t k, int64_t nbp) {
  return ((k / kPanelKC) * (nbp / kPanelBatch) + b / kPanelBatch) * (kPanelKC * kPanelBatch) +
         (k % kPanelKC) * kPanelBatch + b % kPanelBatch;
}

// Columns of the staged panels (ldx rounded up to whole slices), and their elements.
inline int64_t panel_cols(int64_t ldx) { return (ldx + kPanelKC - 1) / kPanelKC * kPanelKC; }
inline int64_t panel_numel(int64_t nbp, int64_t ldx) { return panel_cols(ldx) * nbp; }

// Panels [b0 / 32, b1 / 32) of x (B rows of `cols` floats, row stride ldsrc), transposed, zero
// past B and past cols up to the last whole slice of ldx columns. 4x4 blocks go through SSE
// registers (baseline x86-64): one 16-byte store per 4 elements instead of four scalar ones,
// which had made staging a third of a 64x4096 weight's time at 192 rows of x.
inline void stage_panels(const float* x, int64_t ldsrc, int64_t cols, int64_t B, int64_t ldx,
                         int64_t nbp, int64_t b0, int64_t b1, float* out) {
  const int64_t kpad = panel_cols(ldx);
  for (int64_t blk = b0; blk < b1; blk += kPanelBatch) {
    const int64_t rows = std::min<int64_t>(kPanelBatch, std::max<int64_t>(B - blk, 0));
    for (int64_t k0 = 0; k0 < kpad; k0 += kPanelKC) {
      float* slice = out + panel_index(blk, k0, nbp);  // [kPanelKC][kPanelBatch]
      const int64_t kend = std::clamp<int64_t>(cols - k0, 0, kPanelKC);
      int64_t i = 0;
#if defined(__SSE__)
      const int64_t kend4 = kend / 4 * 4;
      for (; i + 4 <= rows; i += 4) {
        const float* src = x + (blk + i) * ldsrc + k0;
        for (int64_t k = 0; k < kend4; k += 4) {
          __m128 r0 = _mm_loadu_ps(src + k);
          __m128 r1 = _mm_loadu_ps(src + ldsrc + k);
          __m128 r2 = _mm_loadu_ps(src + 2 * ldsrc + k);
          __m128 r3 = _mm_loadu_ps(src + 3 * ldsrc + k);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          float* dst = slice + k * kPanelBatch + i;
          _mm_storeu_ps(dst, r0);
          _mm_storeu_ps(dst + kPanelBatch, r1);
          _mm_storeu_ps(dst + 2 * kPanelBatch, r2);
          _mm_storeu_ps(dst + 3 * kPanelBatch, r3);
        }
        for (int64_t k = kend4; k < kend; ++k) {
          for (int64_t j = 0; j < 4; ++j) slice[k * kPanelBatch + i + j] = src[j * ldsrc + k];
        }
      }
#endif
      for (; i < rows; ++i) {
        const float* src = x + (blk + i) * ldsrc + k0;
        for (int64_t k = 0; k < kend; ++k) slice[k * kPanelBatch + i] = src[k];
      }
      // Rows of x past B and columns past cols: zero.
      for (int64_t k = 0; k < kPanelKC; ++k) {
        float* line = slice + k * kPanelBatch;
        if (k >= kend) {
          std::fill(line, line + kPanelBatch, 0.f);
        } else if (rows < kPanelBatch) {
          std::fill(line + rows, line + kPanelBatch, 0.f);
        }
      }
    }
  }
}

// Columns per chunk of the selecting GEMV for one kept value per group (eight groups of M), 0
// when it does not apply (2:4 and 4:8 select from x as it is).
inline int64_t xsel_chunk(int64_t B, int n, int m) {
  return B == 1 && n == 1 && (m == 4 || m == 8) ? 8 * m : 0;
}

// out[c*8M + j*8 + i] = x[c*8M + i*M + j] for every whole chunk of 8*M columns of x[0, K).
inline void stage_xsel(const float* x, int64_t K, int m, float* out) {
  const int64_t chunk = 8 * m;
  for (int64_t c0 = 0; c0 + chunk <= K; c0 += chunk) {
    for (int j = 0; j < m; ++j) {
      for (int i = 0; i < 8; ++i) out[c0 + j * 8 + i] = x[c0 + i * m + j];
    }
  }
}

inline const void* row_values(const NMProblem& p, int64_t r, int elem_size) {
  const char* base = r < p.safe_rows ? static_cast<const char*>(p.values)
                                     : static_cast<const char*>(p.tail_values);
  const int64_t rr = r < p.safe_rows ? r : r - p.safe_rows;
  return base + rr * p.kept * elem_size;
}


// Each kernel handles W rows [r0, r1) for every x row; safe to call concurrently on disjoint rows.
void nm_gemm_portable(const NMProblem& p, int64_t r0, int64_t r1);
void nm_gemm_avx2(const NMProblem& p, int64_t r0, int64_t r1);
void nm_gemm_avx512(const NMProblem& p, int64_t r0, int64_t r1);
// The AVX-512 kernel with bf16 dot products: the dot-product path where p.xbf16 is set,
// nm_gemm_avx512 otherwise.
void nm_gemm_avx512bf16(const NMProblem& p, int64_t r0, int64_t r1);
// The bf16 dot-product GEMV for one to a few rows of x (nm_bf16gemv.cpp): no panel scratch, the
// packed rows read once per 4 rows of x. Needs p.xbf16 (nm_gemm_avx512 otherwise).
void nm_gemv_avx512bf16(const NMProblem& p, int64_t r0, int64_t r1);
// The bf16 pair-dot-product GEMM for many rows of x (nm_bf16pairs.cpp), patterns 2:4, 4:8, 1:4
// and 1:8 (bf16pairs_kind >= 0). Needs p.xpairs: x staged by bf16pairs_stage with ldc = KB * 8
// (ceil(B / kBf16PairsLanes) * ldc * kBf16PairsLanes words, 64-byte aligned).
constexpr int64_t kBf16PairsLanes = 32;
int bf16pairs_kind(int n, int m);
// bf16pairs_stage returns whether any staged value is NaN or Inf.
bool bf16pairs_stage(const uint16_t* x, int64_t sb, int64_t sk, int64_t B, int64_t cols,
                     int64_t ldc, int64_t c0, int64_t c1, uint16_t* xt);
void nm_gemm_bf16pairs(const NMProblem& p, int64_t r0, int64_t r1);
// The same, but rows [r0, r1) of `out` (bf16 bits [p.B, p.R]) = bf16(x W^T + bias) (bias fp32
// [p.R] or null); p.y is not used. Only where bf16pairs_stage found no NaN or Inf in x (the
// pruned positions' zeros are not multiplied, so those would not propagate as in F.linear).
void nm_gemm_bf16pairs_out(const NMProblem& p, int64_t r0, int64_t r1, const float* bias,
                           uint16_t* out);
// The bf16 GEMM on W expanded into L2 slabs (nm_bf16vnni.cpp), patterns whose M divides 32
// (bf16vnni_supports), any rows of x (made for 16+): out [p.B, p.R] bf16 = x W^T + bias (fp32,
// may be null). x: p.B rows of bf16 bits, row stride sb, unit column stride; staging:
// bf16vnni_staged_words(p.B, cols) 32-bit words, 64-byte aligned. p.y is not used.
bool bf16vnni_supports(int n, int m);
int64_t bf16vnni_staged_words(int64_t B, int64_t cols);
void nm_gemm_bf16vnni(const NMProblem& p, const uint16_t* x, int64_t sb, int64_t cols,
                      const float* bias, uint16_t* out, uint32_t* staging);
// The batched path on x panels (p.xpanel set), AVX2 + FMA (nm_panels.h; nm_gemm_avx512 runs
// the same code with AVX-512 vectors).
void nm_gemm_avx2_panels(const NMProblem& p, int64_t r0, int64_t r1);

// Rows [r0, r1) of W as dense rows in the values' own dtype, bit for bit (pruned positions +0),
// into out (row i at out + i * ldo elements, ldo >= cols rounded up to 16; columns past cols are
// scratch). Never reads or writes out of bounds whatever the mask holds.
void expand_rows_portable(const NMProblem& p, int64_t r0, int64_t r1, void* out, int64_t ldo);
void expand_rows_avx512(const NMProblem& p, int64_t r0, int64_t r1, void* out, int64_t ldo);

// What cpuid reports, capped by NMFX_ISA_CAP / set_isa_cap (nm_ops.cpp).
int64_t isa_cap();
bool cpu_has_avx2();
bool cpu_has_avx512();
bool cpu_has_avx512bf16();

}  // namespace nmfx
