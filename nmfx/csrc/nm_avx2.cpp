// AVX2 + FMA N:M kernel (x86-64 without AVX-512).
//
// For every 8 dense columns of a weight row, the mask byte selects an entry of a 256-entry
// permutation table: lane i takes the c-th of the next kept values (c = set bits below i), or is
// zeroed when bit i is clear (the table entry has its sign bit set, which vblendvps reads). The
// expanded 8-wide vector is FMA'd against x in registers, so the dense weight never exists in
// memory. Several weight rows are processed together so each x load serves all of them, and for
// batch > 1 each expanded vector serves up to four rows of x.
#include <immintrin.h>

#include "nm_kernels.h"

#pragma GCC target("avx2,fma,f16c,popcnt")

namespace nmfx {
namespace {

struct alignas(32) PermLut {
  int32_t idx[256][8];
};

constexpr PermLut make_perm_lut() {
  PermLut lut{};
  for (int m = 0; m < 256; ++m) {
    int c = 0;
    for (int i = 0; i < 8; ++i) {
      lut.idx[m][i] = ((m >> i) & 1) ? c++ : static_cast<int32_t>(0x80000000u);
    }
  }
  return lut;
}

constexpr PermLut kPermLut = make_perm_lut();

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

template <typename T>
inline __m256 load8(const T* p);

template <>
inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
inline __m256 load8<BF16>(const BF16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <>
inline __m256 load8<F16>(const F16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Expand the next 8 dense columns of one weight row; advances the values pointer.
template <typename T>
inline __m256 expand8(const T*& vp, unsigned m) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPermLut.idx[m]));
  const __m256 v = _mm256_permutevar8x32_ps(load8(vp), idx);
  vp += _mm_popcnt_u32(m);
  return _mm256_blendv_ps(v, _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}

// WR weight rows starting at r times XB x rows starting at b, over all K.
template <typename T, int WR, int XB>
void micro(const NMProblem& p, int64_t r, int64_t b) {
  const T* vp[WR];
  const uint8_t* mp[WR];
  for (int i = 0; i < WR; ++i) {
    vp[i] = static_cast<const T*>(row_values(p, r + i, sizeof(T)));
    mp[i] = p.mask + (r + i) * p.KB;
  }
  __m256 acc[WR][XB];
  for (int i = 0; i < WR; ++i) {
    for (int j = 0; j < XB; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  const float* xb = p.x + b * p.ldx;
  for (int64_t kb = 0; kb < p.KB; ++kb) {
    __m256 w[WR];
#pragma GCC unroll 8
    for (int i = 0; i < WR; ++i) w[i] = expand8(vp[i], mp[i][kb]);
#pragma GCC unroll 4
    for (int j = 0; j < XB; ++j) {
      const __m256 xv = _mm256_loadu_ps(xb + j * p.ldx + kb * 8);
#pragma GCC unroll 8
      for (int i = 0; i < WR; ++i) acc[i][j] = _mm256_fmadd_ps(w[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < WR; ++i) {
    for (int j = 0; j < XB; ++j) p.y[(b + j) * p.R + r + i] += hsum(acc[i][j]);
  }
}

template <typename T, int WR>
void all_x_rows(const NMProblem& p, int64_t r) {
  int64_t b = 0;
  for (; b + 4 <= p.B; b += 4) micro<T, WR, 4>(p, r, b);
  switch (p.B - b) {
    case 3:
      micro<T, WR, 3>(p, r, b);
      break;
    case 2:
      micro<T, WR, 2>(p, r, b);
      break;
    case 1:
      micro<T, WR, 1>(p, r, b);
      break;
    default:
      break;
  }
}

template <typename T>
void run(const NMProblem& p, int64_t r0, int64_t r1) {
  int64_t r = r0;
  if (p.B == 1) {
    for (; r + 4 <= r1; r += 4) micro<T, 4, 1>(p, r, 0);
  } else {
    for (; r + 2 <= r1; r += 2) all_x_rows<T, 2>(p, r);
  }
  for (; r < r1; ++r) all_x_rows<T, 1>(p, r);
}

}  // namespace

void nm_gemm_avx2(const NMProblem& p, int64_t r0, int64_t r1) {
  switch (p.vtype) {
    case ValueType::kFloat32:
      run<float>(p, r0, r1);
      break;
    case ValueType::kBFloat16:
      run<BF16>(p, r0, r1);
      break;
    case ValueType::kFloat16:
      run<F16>(p, r0, r1);
      break;
  }
}

}  // namespace nmfx
