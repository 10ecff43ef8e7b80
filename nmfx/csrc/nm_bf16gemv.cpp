// bf16 N:M GEMV on AVX512-BF16 dot products, for one to a few rows of x (decoding).
//
// The dot-product path of nm_bf16dot.cpp decodes a panel of weight rows into a scratch first,
// which pays off once many rows of x reuse it; at one row of x it only adds a second pass over
// the weight. Here every 32 kept values of a weight row (one 64-byte load) are used straight
// from the packed row: their gather indices come from the row's mask bits in registers (one
// vpcompressb of the column numbers per 64 columns, widened to words), x is gathered at those
// columns from a 64-column table of x (one vpermt2w) and one vdpbf16ps does 32 multiply-adds
// (the AVX2 kernel widens bf16 to fp32 and does 8 per FMA). kWR weight rows are in flight at
// once, and the same columns of the next tile of rows are prefetched into L2: a tile's rows are
// short interleaved streams the hardware prefetcher barely ramps up on.
//
// Patterns: those of bf16dot_supports (M divides 32; 64 columns keep 8, 16 or 32 values). With
// 16 or 8 kept per 64 columns, one vector of 32 kept values spans 2 or 4 chunks of 64 columns,
// each gathered from its own table and blended. Sums are fp32; vdpbf16ps treats subnormal inputs
// and outputs as zero (as oneDNN's bf16 GEMM on the same instruction does).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "nm_kernels.h"  // before the target pragma: its inline functions stay baseline x86-64

#pragma GCC target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512bf16,fma,f16c,popcnt")

#include "nm_bf16dot.h"  // after the target pragma: compiled for AVX512-BF16 here

namespace nmfx {
namespace {

// Weight rows in flight, and how many tiles ahead their values and mask are prefetched (into
// L2). Measured on Zen 4 at one row of x, one thread: 2 rows or 8 in flight, or prefetching one
// tile ahead, read 10-25% slower; prefetching into L1 (T0) slower still.
constexpr int kWR = 4;
constexpr int kPrefetchTiles = 2;

// Mask bits of columns [64 * chunk, 64 * chunk + 64): one load where the row has them all (kTail
// false), else mask64's bounded read.
template <bool kTail>
inline uint64_t chunk_bits(const uint8_t* mrow, int64_t chunk, int64_t KB) {
  if constexpr (kTail) {
    return mask64(mrow, chunk, KB);
  } else {
    uint64_t bits;
    std::memcpy(&bits, mrow + chunk * 8, 8);
    return bits;
  }
}

// Word indices (column within each chunk's 64-column table) of the 32 kept values of vector v of
// one row: chunk ch of the vector owns lanes [ch*c, (ch+1)*c). Whatever the mask holds, every
// index is in [0, 64): lanes a mask leaves unfilled point at column 63 of their chunk, which is
// zero past the last column (x is zero padded to whole vectors).
template <int G, bool kTail>
inline __attribute__((always_inline)) __m512i gather_index(const uint8_t* mrow, int64_t v,
                                                           int64_t KB, __m512i iota,
                                                           __m512i fill) {
  constexpr int C = 32 / G;
  if constexpr (G == 1) {
    const __m512i kept =
        _mm512_mask_compress_epi8(fill, chunk_bits<kTail>(mrow, v, KB), iota);
    return _mm512_cvtepu8_epi16(_mm512_castsi512_si256(kept));
  } else {
    __m512i iv = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(fill));
#pragma GCC unroll 4
    for (int ch = 0; ch < G; ++ch) {
      const __m512i kept =
          _mm512_mask_compress_epi8(fill, chunk_bits<kTail>(mrow, v * G + ch, KB), iota);
      const __mmask32 lanes = ((1u << C) - 1u) << (ch * C);
      iv = _mm512_mask_expand_epi16(iv, lanes, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(kept)));
    }
    return iv;
  }
}

// x (bf16, one row) at the kept columns of vector v: chunk ch's lanes from its 64 columns.
template <int G>
inline __attribute__((always_inline)) __m512bh gather_x(const uint16_t* xr, int64_t v,
                                                        __m512i iv) {
  constexpr int C = 32 / G;
  __m512i t = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int ch = 0; ch < G; ++ch) {
    const uint16_t* xc = xr + (v * G + ch) * 64;
    const __m512i g =
        _mm512_permutex2var_epi16(_mm512_loadu_si512(xc), iv, _mm512_loadu_si512(xc + 32));
    if constexpr (G == 1) {
      t = g;
    } else {
      const __mmask32 lanes = ((1ull << C) - 1ull) << (ch * C);
      t = _mm512_mask_mov_epi16(t, lanes, g);
    }
  }
  return reinterpret_cast<__m512bh>(t);
}

// The rows' tile state: their values and mask, the next tile's rows (prefetched), accumulators.
template <int WR, int XB>
struct Tile {
  const uint16_t* vrow[WR];
  const uint8_t* mrow[WR];
  const char* next[WR];  // past the last row: the row itself (a harmless prefetch)
  const uint8_t* mnext[WR];
  __m512 acc[WR][XB];
};

// Vector v of every row of the tile against rows [b, b + XB) of x. kTail: the row's last
// vector, whose values and mask bytes may end early (masked loads, bounded mask reads).
template <int WR, int XB, int G, bool kTail>
inline __attribute__((always_inline)) void step(const NMProblem& p, Tile<WR, XB>& t, int64_t v,
                                                int64_t b, __m512i iota, __m512i fill) {
  __m512i iv[WR];
  __m512bh wv[WR];
  const int64_t left = p.kept - v * 32;
  const __mmask32 have = kTail && left < 32 ? (__mmask32{1} << left) - 1u : ~__mmask32{0};
#pragma GCC unroll 8
  for (int i = 0; i < WR; ++i) {
    _mm_prefetch(t.next[i] + v * 64, _MM_HINT_T1);
    if (((v * G) & 7) == 0) {  // a new 64-byte line of mask
      _mm_prefetch(reinterpret_cast<const char*>(t.mnext[i] + v * 8 * G), _MM_HINT_T1);
    }
    iv[i] = gather_index<G, kTail>(t.mrow[i], v, p.KB, iota, fill);
    wv[i] = reinterpret_cast<__m512bh>(
        kTail ? _mm512_maskz_loadu_epi16(have, t.vrow[i] + v * 32)
              : _mm512_loadu_si512(t.vrow[i] + v * 32));
  }
#pragma GCC unroll 4
  for (int j = 0; j < XB; ++j) {
    const uint16_t* xr = p.xbf16 + (b + j) * p.ldxb;
#pragma GCC unroll 8
    for (int i = 0; i < WR; ++i) {
      t.acc[i][j] = _mm512_dpbf16_ps(t.acc[i][j], wv[i], gather_x<G>(xr, v, iv[i]));
    }
  }
}

// y[b + j, r + i] += row r + i of W . row b + j of x, for WR weight rows and XB rows of x.
template <int WR, int XB, int G>
void tile(const NMProblem& p, int64_t nvec, int64_t r, int64_t b) {
  Tile<WR, XB> t;
  const int64_t ahead = kPrefetchTiles * WR;
  for (int i = 0; i < WR; ++i) {
    t.vrow[i] = static_cast<const uint16_t*>(row_values(p, r + i, 2));
    t.mrow[i] = p.mask + (r + i) * p.KB;
    const int64_t rn = r + ahead + i < p.R ? r + ahead + i : r + i;
    t.next[i] = static_cast<const char*>(row_values(p, rn, 2));
    t.mnext[i] = p.mask + rn * p.KB;
    for (int j = 0; j < XB; ++j) t.acc[i][j] = _mm512_setzero_ps();
  }
  alignas(64) uint8_t iota_b[64];
  for (int i = 0; i < 64; ++i) iota_b[i] = static_cast<uint8_t>(i);
  const __m512i iota = _mm512_load_si512(iota_b);
  const __m512i fill = _mm512_set1_epi8(63);
  // Vectors whose 32 values and 8*G mask bytes all lie inside the row: plain loads.
  const int64_t whole = std::min(p.kept / 32, p.KB / (8 * G));
  int64_t v = 0;
  for (; v < whole; ++v) step<WR, XB, G, false>(p, t, v, b, iota, fill);
  for (; v < nvec; ++v) step<WR, XB, G, true>(p, t, v, b, iota, fill);
  if constexpr (WR * XB == 16) {
    alignas(64) float s[16];
    _mm512_store_ps(s, hsum16(&t.acc[0][0]));
    for (int j = 0; j < XB; ++j) {
      float* yrow = p.y + (b + j) * p.R + r;
      for (int i = 0; i < WR; ++i) yrow[i] += s[i * XB + j];
    }
  } else {
    for (int j = 0; j < XB; ++j) {
      float* yrow = p.y + (b + j) * p.R + r;
      for (int i = 0; i < WR; ++i) yrow[i] += _mm512_reduce_add_ps(t.acc[i][j]);
    }
  }
}

// Rows [r0, r1) of W against rows [b, b + XB) of x.
template <int XB, int G>
void rows_of_w(const NMProblem& p, int64_t nvec, int64_t r0, int64_t r1, int64_t b) {
  int64_t r = r0;
  for (; r + kWR <= r1; r += kWR) tile<kWR, XB, G>(p, nvec, r, b);
  for (; r < r1; ++r) tile<1, XB, G>(p, nvec, r, b);
}

// Every row of x, in tiles of up to 4 (each tile reads the weight rows once).
template <int G>
void run_gemv(const NMProblem& p, int64_t nvec, int64_t r0, int64_t r1) {
  int64_t b = 0;
  for (; b + 4 <= p.B; b += 4) rows_of_w<4, G>(p, nvec, r0, r1, b);
  switch (p.B - b) {
    case 3:
      return rows_of_w<3, G>(p, nvec, r0, r1, b);
    case 2:
      return rows_of_w<2, G>(p, nvec, r0, r1, b);
    case 1:
      return rows_of_w<1, G>(p, nvec, r0, r1, b);
    default:
      return;
  }
}

}  // namespace

void nm_gemv_avx512bf16(const NMProblem& p, int64_t r0, int64_t r1) {
  if (p.xbf16 == nullptr) return nm_gemm_avx512(p, r0, r1);  // not a dot-product problem
  const Geometry geo = geometry(p);
  switch (geo.g) {
    case 1:
      return run_gemv<1>(p, geo.nvec, r0, r1);
    case 2:
      return run_gemv<2>(p, geo.nvec, r0, r1);
    default:
      return run_gemv<4>(p, geo.nvec, r0, r1);
  }
}

}  // namespace nmfx

#else  // not x86: never selected (cpu_has_* report false); keeps the build portable.

#include "nm_kernels.h"

namespace nmfx {
void nm_gemv_avx512bf16(const NMProblem& p, int64_t r0, int64_t r1) {
  nm_gemm_portable(p, r0, r1);
}
}  // namespace nmfx

#endif
