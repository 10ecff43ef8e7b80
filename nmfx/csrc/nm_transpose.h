// 16 x 16 transpose of 32-bit lanes in AVX-512 registers, shared by the bf16 GEMMs that keep
// y^T or x^T in vector lanes (nm_bf16vnni.cpp, nm_bf16pairs.cpp).
//
// Include it only where AVX-512F code may run: after a `#pragma GCC target` that enables
// AVX-512F, or between `#pragma GCC push_options` / `target` / `pop_options`. Everything here
// has internal linkage, so each file gets its own copy compiled for its own target.
#pragma once

#include <immintrin.h>

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

}  // namespace
}  // namespace nmfx
