// Helpers shared by the AVX512-BF16 kernels (nm_bf16dot.cpp: many rows of x; nm_bf16gemv.cpp:
// one to a few rows). Included after each file's `#pragma GCC target` (AVX512-BF16), so every
// function here has internal linkage and is compiled for that ISA in each file; never included
// from baseline code.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "nm_kernels.h"

namespace nmfx {
namespace {

// Layout of one weight row: `nvec` vectors of 32 kept values, each covering `g` chunks of 64
// columns that keep `c` values each (c * g == 32).
struct Geometry {
  int c;
  int g;
  int64_t nvec;
};

inline Geometry geometry(const NMProblem& p) {
  Geometry geo{};
  geo.c = 64 / p.m * p.n;
  geo.g = 32 / geo.c;
  const int64_t cols = p.kept / p.n * p.m;
  geo.nvec = (cols + 64 * geo.g - 1) / (64 * geo.g);
  return geo;
}

// Mask bits of columns [64 * chunk, 64 * chunk + 64) of one row; bytes past KB read as zero.
inline uint64_t mask64(const uint8_t* mrow, int64_t chunk, int64_t KB) {
  const int64_t b0 = chunk * 8;
  uint64_t bits = 0;
  if (b0 + 8 <= KB) {
    std::memcpy(&bits, mrow + b0, 8);  // one load (a variable-length copy was a libc call)
  } else {
    for (int64_t b = b0; b < KB; ++b) bits |= static_cast<uint64_t>(mrow[b]) << (8 * (b - b0));
  }
  return bits;
}

// 16 vectors -> one vector of their horizontal sums, lane j = sum of a[j].
inline __m512 hsum16(const __m512* a) {
  __m512 v[8];
  for (int i = 0; i < 8; ++i) {  // each 256-bit half: 8 partial sums of one vector
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  }
  __m512 w[4];
  for (int i = 0; i < 4; ++i) {  // quad q of w[i]: 4 partial sums of a[4i + q]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
  const __m512d d01 = _mm512_castps_pd(s01);
  const __m512d d23 = _mm512_castps_pd(s23);
  // lane 4q + i: the sum of a[4i + q]
  const __m512 r = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
  const __m512i perm =
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(perm, r);
}

}  // namespace
}  // namespace nmfx
