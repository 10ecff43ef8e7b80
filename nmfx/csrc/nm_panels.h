// The batched path (32+ rows of x) and the SIMD helpers it shares with the AVX2 kernel.
//
// Included by nm_avx2.cpp (AVX2 vectors) and nm_avx512.cpp (AVX-512 vectors) after their
// `#pragma GCC target`, so each gets its own copy compiled for its ISA: everything here has
// internal linkage (an anonymous namespace), never one instantiation shared across the two
// (the linker could otherwise hand AVX-512 code to an AVX2-only CPU).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "nm_kernels.h"

namespace nmfx {
namespace {

enum class Kind { kF32Shuf, kF32Perm, kBF16, kF16 };

template <Kind K>
constexpr int kElemBytes = K == Kind::kF32Shuf || K == Kind::kF32Perm ? 4 : 2;

inline __m256i load_si256(const void* p) {
  return _mm256_load_si256(static_cast<const __m256i*>(p));
}

// 8 consecutive kept values as fp32.
template <Kind K>
inline __m256 load8(const char* vp) {
  if constexpr (K == Kind::kBF16) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  } else if constexpr (K == Kind::kF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp)));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(vp));
  }
}

template <Kind K>
inline float load1(const char* vp) {
  if constexpr (K == Kind::kF32Shuf) {
    float f;
    std::memcpy(&f, vp, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, vp, 2);
    if constexpr (K == Kind::kF16) return _cvtsh_ss(h);
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}


// ---- Batched path: only the kept multiply-adds ----
// Expanding W does M/N times the useful multiply-adds, which is free while the weight stream
// bounds the time (a few rows of x) but not once many rows of x make the problem compute-bound.
// Here x is staged transposed in panels of 32 rows (panel[k][0..31] = x[0..31, k]) and every kept
// value w at column k does y^T[r, 0..31] += w * panel[k]: one broadcast, four 8-wide loads and
// four FMAs, so only the kept multiply-adds run (benchmarks/kernel_paths.py, fp32 at 256 rows
// of x: 1.64-1.92x faster than the expanding path at 2:4 and 4:8, 3.15-5.75x at 1:4 and 1:8).
//
// Per pass over kPanelKC columns, the kept columns of the rows' mask bytes are decoded once into
// panel offsets (and bf16/fp16 values into fp32) and reused by every panel; then panel by panel
// (its 16 KB slice of kPanelKC columns stays in L1) tiles of Vec::kRW rows accumulate into y^T
// [rows, 256 x rows] (L2). Up to 256 rows of x per pass keep y^T and the slices in L2.
constexpr int64_t kPanelSuper = 256;

// The vector width of a panel tile: a panel row (32 floats) is 4 AVX2 or 2 AVX-512 vectors.
// kRW rows x (32 / W) vectors of accumulators per tile; a last panel of at most 16 rows of x
// computes only those 16 columns, with kRWShort rows. AVX2: 3 rows (12 accumulators; 2 and 4
// rows measured slower); AVX-512 (32 registers): 6 rows.
struct V256 {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr int kRW = 3;
  static constexpr int kRWShort = 6;
  static T load(const float* p) { return _mm256_load_ps(p); }
  static T loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};

#if defined(NMFX_PANELS_AVX512)  // defined by nm_avx512.cpp
struct V512 {
  using T = __m512;
  static constexpr int W = 16;
  static constexpr int kRW = 6;
  static constexpr int kRWShort = 12;
  static T load(const float* p) { return _mm512_load_ps(p); }
  static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};
#endif

struct alignas(32) PanelOffsets {
  int32_t off[256][8];  // kept positions of mask byte m, times kPanelBatch (a panel row)
};

constexpr PanelOffsets make_panel_offsets() {
  PanelOffsets t{};
  for (int m = 0; m < 256; ++m) {
    int c = 0;
    for (int i = 0; i < 8; ++i) {
      if ((m >> i) & 1) t.off[m][c++] = i * static_cast<int32_t>(kPanelBatch);
    }
  }
  return t;
}

constexpr PanelOffsets kPanelOffsets = make_panel_offsets();

// Panel offsets of the kept columns of mask bytes [kb0, kb1) relative to column 8*kb0, for the
// pass's nnz kept values; writes up to 8 entries past entry nnz. Invariants, whatever the mask
// holds (a corrupt one has more or fewer set bits than the pattern keeps): nothing is written
// past out + nnz + 8, and every entry ever written is the offset of a column of this pass, so
// the panel reads stay inside the pass's slice (entries the mask leaves unwritten hold
// offsets from an earlier pass or zero).
inline void decode_offsets(const uint8_t* mrow, int64_t kb0, int64_t kb1, int64_t nnz,
                           int32_t* out) {
  __m256i base = _mm256_setzero_si256();
  const __m256i step = _mm256_set1_epi32(8 * static_cast<int32_t>(kPanelBatch));
  int64_t pos = 0;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const unsigned m = mrow[kb];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + pos),
                        _mm256_add_epi32(load_si256(kPanelOffsets.off[m]), base));
    base = _mm256_add_epi32(base, step);
    pos = std::min<int64_t>(pos + _mm_popcnt_u32(m), nnz);
  }
}

// y^T rows i (stride ldy), W*NV columns: += sum_j vals[i][j] * panel[offs[i][j] .. + W*NV].
template <class Vec, int RW, int NV>
inline void panel_tile(const float* panel, const float* const* vals, const int32_t* const* offs,
                       int64_t nnz, float* yt, int64_t ldy) {
  constexpr int W = Vec::W;
  typename Vec::T acc[RW][NV];
#pragma GCC unroll 16
  for (int i = 0; i < RW; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec::loadu(yt + i * ldy + W * v);
  }
  for (int64_t j = 0; j < nnz; ++j) {
#pragma GCC unroll 16
    for (int i = 0; i < RW; ++i) {
      const float* px = panel + offs[i][j];
      const typename Vec::T w = Vec::bcast(vals[i] + j);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = Vec::fma(w, Vec::load(px + W * v), acc[i][v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < RW; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Vec::storeu(yt + i * ldy + W * v, acc[i][v]);
  }
}

// Tiles of RW rows (then single rows) of the pass over one panel, W*NV of its 32 columns.
template <class Vec, int RW, int NV, typename ValsOf>
inline void panel_rows(const float* panel, ValsOf&& vals_of, const int32_t* offs,
                       int64_t ostride, int64_t nr, int64_t nnz, float* ycol, int64_t ldy) {
  int64_t i = 0;
  for (; i + RW <= nr; i += RW) {
    const float* v[RW];
    const int32_t* o[RW];
    for (int t = 0; t < RW; ++t) {
      v[t] = vals_of(i + t);
      o[t] = offs + (i + t) * ostride;
    }
    panel_tile<Vec, RW, NV>(panel, v, o, nnz, ycol + i * ldy, ldy);
  }
  for (; i < nr; ++i) {
    const float* v[1] = {vals_of(i)};
    const int32_t* o[1] = {offs + i * ostride};
    panel_tile<Vec, 1, NV>(panel, v, o, nnz, ycol + i * ldy, ldy);
  }
}

// Kept values [v0, v0 + nnz) of a row as fp32 (fp32 rows are read in place).
template <Kind K>
inline void widen_values(const char* row, int64_t v0, int64_t nnz, float* out) {
  constexpr int E = kElemBytes<K>;
  const char* vp = row + v0 * E;
  int64_t j = 0;
  for (; j + 8 <= nnz; j += 8) _mm256_storeu_ps(out + j, load8<K>(vp + j * E));
  for (; j < nnz; ++j) out[j] = load1<K>(vp + j * E);
}

template <class Vec, Kind K>
void run_panels(const NMProblem& p, int64_t r0, int64_t r1) {
  constexpr int E = kElemBytes<K>;
  constexpr bool kInPlace = K == Kind::kF32Shuf;
  const int64_t nr = r1 - r0;
  const int64_t cols = p.kept / p.n * p.m;
  const int64_t kc_kept = kPanelKC / p.m * p.n;  // kept values per row per pass
  const int64_t ostride = kc_kept + 8;
  const int64_t sup = std::min(p.pb1 - p.pb0, kPanelSuper);
  // Per-thread buffers reused across calls (fresh ones of a few hundred KB page-fault each call).
  static thread_local KeptVector<float> yt;
  static thread_local KeptVector<int32_t> offs;
  static thread_local KeptVector<float> wide;
  static thread_local KeptVector<const char*> rows;
  if (yt.size() < static_cast<size_t>(nr * sup)) yt.resize(nr * sup);
  if (offs.size() < static_cast<size_t>(nr * ostride)) offs.resize(nr * ostride);
  if (!kInPlace && wide.size() < static_cast<size_t>(nr * kc_kept)) wide.resize(nr * kc_kept);
  if (rows.size() < static_cast<size_t>(nr)) rows.resize(nr);
  for (int64_t r = r0; r < r1; ++r) rows[r - r0] = static_cast<const char*>(row_values(p, r, E));
  for (int64_t b0 = p.pb0; b0 < p.pb1; b0 += sup) {
    const int64_t bs = std::min(sup, p.pb1 - b0);
    std::fill(yt.begin(), yt.begin() + nr * sup, 0.f);
    for (int64_t k0 = 0; k0 < cols; k0 += kPanelKC) {
      const int64_t k1 = std::min(cols, k0 + kPanelKC);
      const int64_t nnz = (k1 - k0) / p.m * p.n;  // every group of M keeps exactly N
      const int64_t v0 = k0 / p.m * p.n;
      for (int64_t i = 0; i < nr; ++i) {
        decode_offsets(p.mask + (r0 + i) * p.KB, k0 / 8, (k1 + 7) / 8, nnz,
                       offs.data() + i * ostride);
        if constexpr (!kInPlace) widen_values<K>(rows[i], v0, nnz, wide.data() + i * kc_kept);
      }
      auto vals_of = [&](int64_t i) -> const float* {
        if constexpr (kInPlace) {
          return reinterpret_cast<const float*>(rows[i]) + v0;
        } else {
          return wide.data() + i * kc_kept;
        }
      };
      for (int64_t b = b0; b < b0 + bs; b += kPanelBatch) {
        const float* panel = p.xpanel + panel_index(b, k0, p.nbp);
        // A last panel holding at most 16 rows of x computes only those 16 columns.
        constexpr int kNV = static_cast<int>(kPanelBatch) / Vec::W;
        if (p.B - b <= 16) {
          panel_rows<Vec, Vec::kRWShort, kNV / 2>(panel, vals_of, offs.data(), ostride, nr, nnz,
                                                  yt.data() + (b - b0), sup);
        } else {
          panel_rows<Vec, Vec::kRW, kNV>(panel, vals_of, offs.data(), ostride, nr, nnz,
                                         yt.data() + (b - b0), sup);
        }
      }
    }
    // y[b, r] += y^T[r, b], 16 rows at a time (16 floats of a y row are one cache line).
    const int64_t bend = std::min(p.B, b0 + bs);
    for (int64_t i0 = 0; i0 < nr; i0 += 16) {
      const int64_t i1 = std::min(nr, i0 + 16);
      for (int64_t b = b0; b < bend; ++b) {
        float* yrow = p.y + b * p.R + r0;
        for (int64_t i = i0; i < i1; ++i) yrow[i] += yt[i * sup + (b - b0)];
      }
    }
  }
}

template <class Vec>
void run_panels_any(const NMProblem& p, int64_t r0, int64_t r1) {
  switch (p.vtype) {
    case ValueType::kFloat32:
      return run_panels<Vec, Kind::kF32Shuf>(p, r0, r1);
    case ValueType::kBFloat16:
      return run_panels<Vec, Kind::kBF16>(p, r0, r1);
    case ValueType::kFloat16:
      return run_panels<Vec, Kind::kF16>(p, r0, r1);
  }
}

}  // namespace
}  // namespace nmfx
