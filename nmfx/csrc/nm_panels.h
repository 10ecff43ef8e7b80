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
// Work goes chunk by chunk of kChunkCols columns: per chunk, tile by tile of Vec::kRW weight
// rows, the kept columns of the tile's mask bytes are decoded once into panel offsets (and
// bf16/fp16 values widened to fp32) and reused by every panel of x; the tile's accumulators stay
// in registers over the chunk's kept values (y^T [rows, rows of x] is loaded and stored once per
// chunk). The chunk's panels (at most kChunkPanelBytes) stay in L2 while every tile reads them.
// Against 128-column passes over all the thread's rows (session 10), fp32 2:4 on one Zen 4
// thread ran 1.25-1.5x faster at 16-32 rows of x (out/pb microbenchmark: 2048x2048, 32 rows:
// 45 -> 63 GFLOP/s of kept products) and no slower at 64-256: the offsets' decoding (a
// popcount-carried loop, now a fixed stride where every mask byte keeps the same count) and
// the per-pass reloading of y^T had cost as much as a third of the multiply-adds at 32 rows.
constexpr int64_t kChunkCols = 1024;  // multiple of kPanelKC: a chunk is whole panel slices
constexpr int64_t kOffStride = kChunkCols + 8;  // decoded offsets per tile row (+8: slack)
// Bytes of panels a chunk may span: many rows of x narrow the chunk (to 128 columns at 512 rows
// of x), so that what every tile re-reads stays in L2.
constexpr int64_t kChunkPanelBytes = 256 << 10;

// The vector width of a panel tile: a panel row (32 floats) is 4 AVX2 or 2 AVX-512 vectors.
// kRW rows x (32 / W) vectors of accumulators per tile (a last panel of at most 16 rows of x
// computes only those 16 columns). AVX2: 3 rows (12 accumulators); AVX-512: 6 rows (12 zmm;
// 4 and 8 measured slower at 32 rows of x).
struct V256 {
  using T = __m256;
  static constexpr int W = 8;
  static constexpr int kRW = 3;
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

// Panel offsets of the kept columns of mask bytes [kb0, kb1) (a chunk's, kb0 at a slice start),
// relative to the chunk's first column in its first panel; every kPanelKC columns the slices of
// the other panels (slice_jump elements) lie between. `fixed` > 0: every byte of a valid mask
// keeps that many (M divides 8), so byte b's offsets go to out + b * fixed, no popcount carried
// from byte to byte; otherwise at the running popcount, clamped to nnz. Invariants, whatever the
// mask holds (a corrupt one has more or fewer set bits than the pattern keeps): nothing is
// written past out + nnz + 8, and entries [0, nnz) all hold offsets of columns of this chunk's
// staged slices (a mask keeping too few leaves the rest at the chunk's first column), so the
// panel reads stay inside the staged panels.
inline void decode_offsets(const uint8_t* mrow, int64_t kb0, int64_t kb1, int64_t nnz, int fixed,
                           int64_t slice_jump, int32_t* out) {
  __m256i base = _mm256_setzero_si256();
  const __m256i step = _mm256_set1_epi32(8 * static_cast<int32_t>(kPanelBatch));
  const __m256i jump = _mm256_set1_epi32(static_cast<int32_t>(slice_jump));
  constexpr int64_t kBytesPerSlice = kPanelKC / 8;
  int64_t pos = 0;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const unsigned m = mrow[kb];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + pos),
                        _mm256_add_epi32(load_si256(kPanelOffsets.off[m]), base));
    base = _mm256_add_epi32(base, step);
    if ((kb - kb0) % kBytesPerSlice == kBytesPerSlice - 1) base = _mm256_add_epi32(base, jump);
    pos = fixed > 0 ? pos + fixed : std::min<int64_t>(pos + _mm_popcnt_u32(m), nnz);
  }
  if (fixed == 0) std::fill(out + pos, out + nnz, 0);  // a mask keeping too few (corrupt)
}

// y^T rows i (stride ldy), W*NV columns: += sum_j vals[i][j] * panel[offs[i * kOffStride + j]
// .. + W*NV] (offsets at a compile-time stride: one pointer addresses every row's).
template <class Vec, int RW, int NV>
inline void panel_tile(const float* panel, const float* const* vals, const int32_t* offs,
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
      const float* px = panel + offs[i * kOffStride + j];
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

// Kept values [v0, v0 + nnz) of a row as fp32 (fp32 rows are read in place).
template <Kind K>
inline void widen_values(const char* row, int64_t v0, int64_t nnz, float* out) {
  constexpr int E = kElemBytes<K>;
  const char* vp = row + v0 * E;
  int64_t j = 0;
  for (; j + 8 <= nnz; j += 8) _mm256_storeu_ps(out + j, load8<K>(vp + j * E));
  for (; j < nnz; ++j) out[j] = load1<K>(vp + j * E);
}

// Weight rows [r, r + RW) over columns [k0, k1) (one chunk) for every panel of [pb0, pb1):
// y^T row i at yt + i * ldy, column b - pb0.
template <class Vec, Kind K, int RW>
void panel_chunk_rows(const NMProblem& p, int64_t r, int64_t k0, int64_t k1, int32_t* offs,
                      float* wide, float* yt, int64_t ldy) {
  constexpr int E = kElemBytes<K>;
  const int64_t nnz = (k1 - k0) / p.m * p.n;  // every group of M keeps exactly N
  const int64_t v0 = k0 / p.m * p.n;
  const int64_t slice_jump = (p.nbp / kPanelBatch - 1) * kPanelKC * kPanelBatch;
  const int fixed = 8 % p.m == 0 ? 8 / p.m * p.n : 0;
  const float* vals[RW];
  for (int i = 0; i < RW; ++i) {
    const char* row = static_cast<const char*>(row_values(p, r + i, E));
    decode_offsets(p.mask + (r + i) * p.KB, k0 / 8, (k1 + 7) / 8, nnz, fixed, slice_jump,
                   offs + i * kOffStride);
    if constexpr (K == Kind::kF32Shuf) {
      vals[i] = reinterpret_cast<const float*>(row) + v0;
    } else {
      widen_values<K>(row, v0, nnz, wide + i * kChunkCols);
      vals[i] = wide + i * kChunkCols;
    }
  }
  constexpr int kNV = static_cast<int>(kPanelBatch) / Vec::W;
  for (int64_t b = p.pb0; b < p.pb1; b += kPanelBatch) {
    const float* panel = p.xpanel + panel_index(b, k0, p.nbp);
    float* ycol = yt + (b - p.pb0);
    if (p.B - b <= 16) {  // a last panel holding at most 16 rows of x: only those 16 columns
      panel_tile<Vec, RW, kNV / 2>(panel, vals, offs, nnz, ycol, ldy);
    } else {
      panel_tile<Vec, RW, kNV>(panel, vals, offs, nnz, ycol, ldy);
    }
  }
}

template <class Vec, Kind K>
void run_panels(const NMProblem& p, int64_t r0, int64_t r1) {
  constexpr int RW = Vec::kRW;
  const int64_t nr = r1 - r0;
  const int64_t cols = p.kept / p.n * p.m;
  const int64_t ldy = p.pb1 - p.pb0;  // y^T [nr, rows of x of this call]
  // Per-thread buffers reused across calls (fresh ones of a few hundred KB page-fault each call).
  static thread_local KeptVector<float> yt;
  static thread_local KeptVector<int32_t> offs;
  static thread_local KeptVector<float> wide;
  if (yt.size() < static_cast<size_t>(nr * ldy)) yt.resize(nr * ldy);
  if (offs.size() < static_cast<size_t>(RW * kOffStride)) offs.resize(RW * kOffStride);
  if (K != Kind::kF32Shuf && wide.size() < static_cast<size_t>(RW * kChunkCols)) {
    wide.resize(RW * kChunkCols);
  }
  std::fill(yt.begin(), yt.begin() + nr * ldy, 0.f);
  const int64_t fit = kChunkPanelBytes / (ldy * static_cast<int64_t>(sizeof(float)));
  const int64_t chunk = std::clamp<int64_t>(fit / kPanelKC * kPanelKC, kPanelKC, kChunkCols);
  for (int64_t k0 = 0; k0 < cols; k0 += chunk) {
    const int64_t k1 = std::min(cols, k0 + chunk);
    int64_t r = r0;
    for (; r + RW <= r1; r += RW) {
      panel_chunk_rows<Vec, K, RW>(p, r, k0, k1, offs.data(), wide.data(),
                                   yt.data() + (r - r0) * ldy, ldy);
    }
    for (; r < r1; ++r) {
      panel_chunk_rows<Vec, K, 1>(p, r, k0, k1, offs.data(), wide.data(),
                                  yt.data() + (r - r0) * ldy, ldy);
    }
  }
  // y[b, r] += y^T[r, b], 16 rows at a time (16 floats of a y row are one cache line).
  const int64_t bend = std::min(p.B, p.pb1);
  for (int64_t i0 = 0; i0 < nr; i0 += 16) {
    const int64_t i1 = std::min(nr, i0 + 16);
    for (int64_t b = p.pb0; b < bend; ++b) {
      float* yrow = p.y + b * p.R + r0;
      for (int64_t i = i0; i < i1; ++i) yrow[i] += yt[i * ldy + (b - p.pb0)];
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
