// 16 x 16 transpose of 32-bit lanes in AVX-512 registers, shared by the bf16 GEMMs that keep
// y^T or x^T in vector lanes (nm_bf16vnni.cpp, nm_bf16pairs.cpp), and the store of such a y^T
// into a bf16 output (bias added; needs AVX512-BF16 as well).
//
// Include it only where AVX-512F code may run: after a `#pragma GCC target` that enables
// AVX-512F, or between `#pragma GCC push_options` / `target` / `pop_options`. Everything here
// has internal linkage, so each file gets its own copy compiled for its own target.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace nmfx {
namespace {

// In place: r[j] lane i <- r[i] lane j (32-bit lanes).
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 4; ++k) {
      t[8 * h + k] = _mm512_shuffle_i32x4(r[8 * h + k], r[8 * h + k + 4], 0x88);
      t[8 * h + k + 4] = _mm512_shuffle_i32x4(r[8 * h + k], r[8 * h + k + 4], 0xdd);
    }
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
  }
}

// The same for fp32 lanes (bit moves only: the values are not touched).
inline void transpose16(__m512* r) {
  __m512i v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_castps_si512(r[i]);
  transpose16(v);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(v[i]);
}

// fp32 -> bf16 bits, round to nearest even, NaN kept quiet (as torch's conversion).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// out[b, r] = bf16(yt[r, b] + bias[r]) for r < nr, b < B (out row stride ldo; bias may be
// null): 16 x 16 blocks through a transpose and vcvtneps2bf16, the edges one by one.
inline void store_transposed(const float* yt, int64_t ldyt, int64_t nr, int64_t B,
                                       const float* bias, uint16_t* out, int64_t ldo) {
  const int64_t nr16 = nr / 16 * 16, B16 = B / 16 * 16;
  for (int64_t r0 = 0; r0 < nr16; r0 += 16) {
    const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias + r0) : _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < B16; b0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_castps_si512(_mm512_loadu_ps(yt + (r0 + i) * ldyt + b0));
      transpose16(v);
      for (int j = 0; j < 16; ++j) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_castsi512_ps(v[j]), bv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (b0 + j) * ldo + r0),
                            reinterpret_cast<__m256i>(h));
      }
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t r = b < B16 ? nr16 : 0; r < nr; ++r) {
      out[b * ldo + r] = to_bf16(yt[r * ldyt + b] + (bias != nullptr ? bias[r] : 0.f));
    }
  }
}

}  // namespace
}  // namespace nmfx
