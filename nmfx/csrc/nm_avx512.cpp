// AVX-512 N:M kernel: one expand-load (vexpandps / vpexpandw) rebuilds 16 dense weights from the
// kept values and a 16-bit slice of the mask. Compiled with target pragmas so it builds on any
// x86-64 compiler; it only runs where the CPU reports avx512f/bw/vl/vbmi2 (checked in nm_ops.cpp).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "nm_kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,fma,f16c,popcnt")

#define NMFX_PANELS_AVX512
#include "nm_panels.h"  // the batched path, compiled here with 16-wide vectors

namespace nmfx {
namespace {

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

template <typename T>
inline __m512 expand16(const T* p, __mmask16 m);

template <>
inline __m512 expand16<float>(const float* p, __mmask16 m) {
  return _mm512_maskz_expandloadu_ps(m, p);
}

template <>
inline __m512 expand16<BF16>(const BF16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_expandloadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <>
inline __m512 expand16<F16>(const F16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_expandloadu_epi16(m, p));
}

inline unsigned mask16(const uint8_t* mrow, int64_t kb2, int64_t KB) {
  const int64_t lo = 2 * kb2;
  return mrow[lo] | (lo + 1 < KB ? static_cast<unsigned>(mrow[lo + 1]) << 8 : 0u);
}

// Software prefetch of the next tile of rows into L2, as in the AVX2 kernel (where it took a
// batch-1 4096x4096 2:4 fp32 GEMV on one thread from 2.83 to 1.8 ms): a tile's rows are WR short
// interleaved streams the hardware prefetcher barely ramps up on. Prefetches never fault, so
// results cannot change; whether this path or another wins on a host is measured there by the
// autotuner (nmfx/kernels/_autotune.py).
template <typename T, int WR, int XB>
void micro(const NMProblem& p, int64_t r, int64_t b) {
  const T* vp[WR];
  const uint8_t* mp[WR];
  const char* next[WR];  // the same columns WR rows down (null past the last row)
  for (int i = 0; i < WR; ++i) {
    vp[i] = static_cast<const T*>(row_values(p, r + i, sizeof(T)));
    mp[i] = p.mask + (r + i) * p.KB;
    next[i] = r + WR + i < p.R ? static_cast<const char*>(row_values(p, r + WR + i, sizeof(T)))
                               : nullptr;
  }
  const T* row0[WR];
  for (int i = 0; i < WR; ++i) row0[i] = vp[i];
  __m512 acc[WR][XB];
  for (int i = 0; i < WR; ++i) {
    for (int j = 0; j < XB; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  const float* xb = p.x + b * p.ldx;
  const int64_t blocks = (p.KB + 1) / 2;  // ldx is a multiple of 16, so x reads stay in bounds
  // Kept values per 16 columns (M divides 16): each block advances by this constant, not by its
  // mask's popcount (equal for a valid mask), so a corrupt mask never walks the reads past a
  // row's end; an expand-load there reads at most 16 values into the slack (kValuePad).
  const int64_t per16 = 16 / p.m * p.n;
  for (int64_t kb2 = 0; kb2 < blocks; ++kb2) {
    if ((kb2 & 3) == 0) {  // every 64 columns
      for (int i = 0; i < WR; ++i) {
        if (next[i] == nullptr) continue;
        const char* at = next[i] + (vp[i] - row0[i]) * static_cast<int64_t>(sizeof(T));
        _mm_prefetch(at, _MM_HINT_T1);
        _mm_prefetch(at + 64, _MM_HINT_T1);
        if ((kb2 & 31) == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(p.mask + (r + WR + i) * p.KB + 2 * kb2),
                       _MM_HINT_T1);
        }
      }
    }
    __m512 w[WR];
    for (int i = 0; i < WR; ++i) {
      const unsigned m = mask16(mp[i], kb2, p.KB);
      w[i] = expand16(vp[i], static_cast<__mmask16>(m));
      vp[i] += per16;
    }
    for (int j = 0; j < XB; ++j) {
      const __m512 xv = _mm512_loadu_ps(xb + j * p.ldx + kb2 * 16);
      for (int i = 0; i < WR; ++i) acc[i][j] = _mm512_fmadd_ps(w[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < WR; ++i) {
    for (int j = 0; j < XB; ++j) p.y[(b + j) * p.R + r + i] += _mm512_reduce_add_ps(acc[i][j]);
  }
}

// Every row of x in tiles of 4, then one tile of the 1-3 left: each tile reads the weight rows
// once (2 rows of x had taken two single-row passes, reading W twice: 4096x4096 fp32 2:4 ran
// 1.94 ms at 2 rows against 0.89 at 1 on an AVX-512 host).
template <typename T, int WR>
void all_x_rows(const NMProblem& p, int64_t r) {
  int64_t b = 0;
  for (; b + 4 <= p.B; b += 4) micro<T, WR, 4>(p, r, b);
  switch (p.B - b) {
    case 3:
      return micro<T, WR, 3>(p, r, b);
    case 2:
      return micro<T, WR, 2>(p, r, b);
    case 1:
      return micro<T, WR, 1>(p, r, b);
    default:
      return;
  }
}

template <typename T>
void run(const NMProblem& p, int64_t r0, int64_t r1) {
  int64_t r = r0;
  if (p.B == 1) {
    for (; r + 4 <= r1; r += 4) micro<T, 4, 1>(p, r, 0);
  } else {
    for (; r + 4 <= r1; r += 4) all_x_rows<T, 4>(p, r);
  }
  for (; r < r1; ++r) all_x_rows<T, 1>(p, r);
}

// Rows of W, dense, 16 columns per expand-load; advances by the pattern's constant kept count
// per 16 columns (so reads stay within a row plus its kValuePad slack, as in micro above).
template <typename T>
void expand_rows_t(const NMProblem& p, int64_t r0, int64_t r1, T* out, int64_t ldo) {
  const int64_t blocks = (p.KB + 1) / 2;
  const int64_t per16 = 16 / p.m * p.n;
  for (int64_t r = r0; r < r1; ++r) {
    const T* vp = static_cast<const T*>(row_values(p, r, sizeof(T)));
    const uint8_t* mrow = p.mask + r * p.KB;
    T* o = out + (r - r0) * ldo;
    for (int64_t kb2 = 0; kb2 < blocks; ++kb2) {
      const __mmask16 m = static_cast<__mmask16>(mask16(mrow, kb2, p.KB));
      if constexpr (sizeof(T) == 4) {
        _mm512_storeu_si512(o + kb2 * 16, _mm512_maskz_expandloadu_epi32(m, vp));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + kb2 * 16),
                            _mm256_maskz_expandloadu_epi16(m, vp));
      }
      vp += per16;
    }
    // Columns past the last 16-column block up to ldo: zero (GEMMs read only cols of them).
    for (int64_t k = blocks * 16; k < ldo; ++k) o[k] = 0;
  }
}

}  // namespace

void expand_rows_avx512(const NMProblem& p, int64_t r0, int64_t r1, void* out, int64_t ldo) {
  if (p.vtype == ValueType::kFloat32) {
    expand_rows_t(p, r0, r1, static_cast<uint32_t*>(out), ldo);
  } else {
    expand_rows_t(p, r0, r1, static_cast<uint16_t*>(out), ldo);
  }
}

void nm_gemm_avx512(const NMProblem& p, int64_t r0, int64_t r1) {
  // Many rows of x: the batched path (only the kept multiply-adds; nm_panels.h), 16 wide.
  if (p.xpanel != nullptr) return run_panels_any<V512>(p, r0, r1);
  // Batch-1 1:4 / 1:8 by default, and every selecting pattern when forced: the AVX2 selecting
  // GEMV (one FMA per 8 kept values), which expanding 16 dense weights per instruction cannot
  // beat at 1:4 / 1:8: it does 2 (1:8) to 4 (1:4) times more FMAs.
  if (p.select == SelectMode::kAlways ||
      (p.select == SelectMode::kAuto && p.xsel != nullptr && xsel_chunk(p.B, p.n, p.m) > 0)) {
    return nm_gemm_avx2(p, r0, r1);
  }
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

#else  // not x86: never selected (cpu_has_* report false); keeps the build portable.

#include "nm_kernels.h"

namespace nmfx {
void nm_gemm_avx512(const NMProblem& p, int64_t r0, int64_t r1) { nm_gemm_portable(p, r0, r1); }
void expand_rows_avx512(const NMProblem& p, int64_t r0, int64_t r1, void* out, int64_t ldo) {
  expand_rows_portable(p, r0, r1, out, ldo);
}
}  // namespace nmfx

#endif
