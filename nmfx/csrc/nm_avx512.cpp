// AVX-512 N:M kernel: one expand-load (vexpandps / vpexpandw) rebuilds 16 dense weights from the
// kept values and a 16-bit slice of the mask. Compiled with target pragmas so it builds on any
// x86-64 compiler; it only runs where the CPU reports avx512f/bw/vl/vbmi2 (checked in nm_ops.cpp).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstring>

#include "nm_kernels.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,fma,f16c,popcnt")

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


// Batch-1 selecting GEMV for fp32 weights keeping 8 of every 16 columns (2:4, 4:8). Per 64
// columns, x sits in 4 zmm shared by 4 weight rows; per row, two vpermt2ps pick x at the 32 kept
// columns (dword indices, low 5 bits: kept values 0-15 lie in columns 0-31, 16-31 in 32-63) and
// two FMAs multiply them by the next 32 kept values. What costs is building the indices from the
// mask bits (vpcompressb/d with a varying mask ran ~10 cycles each on Zen 4, slower than the AVX2
// selecting GEMV altogether):
//   * 2:4: kept value j of a 32-column half is the (j % 2)-th kept column of group j / 2. One
//     vpmultishiftqb pulls each lane's mask nibble into its low byte, a vpternlogd keeps the
//     nibble and adds (j % 2) << 4, a vpermb looks the position up in a 32-entry table and a
//     vpaddd adds the group's first column: 4 vector instructions per 16 kept values, no loads.
//   * 4:8: four 16-byte entries of a 256-entry table (the positions of a mask byte's first four
//     kept columns) joined into one zmm, plus each byte's first column.
// At one thread on cache-resident weights (256x2048, 1024x1024, Zen 4) the AVX2 selecting GEMV
// was instruction-bound at ~8 instructions per 8 kept values.
// A corrupt mask (a group keeping other than the pattern's count) makes wrong sums but reads only
// x's 64 columns and the row's values, which advance by the pattern's constant count.
struct alignas(64) Select16Tables {
  uint8_t shift[2][64];  // vpmultishiftqb controls: lane j reads nibble 8h + j / 2 (half h)
  uint8_t nib_pos[64];   // [(s << 4) | nibble] -> position of the nibble's s-th set bit (0..3)
  int32_t second[16];    // (j % 2) << 4
  int32_t group[16];     // 4 * (j / 2): the group's first column within the half
  int32_t byte_base[16]; // 8 * (j / 4): the mask byte's first column within 32 columns
  int32_t pos4[256][4];  // positions (0..7) of the first four set bits of a byte
};

constexpr Select16Tables make_select16_tables() {
  Select16Tables t{};
  for (int h = 0; h < 2; ++h) {
    for (int b = 0; b < 64; ++b) t.shift[h][b] = static_cast<uint8_t>(4 * (8 * h + b / 8));
  }
  for (int i = 0; i < 64; ++i) {
    const int n = i & 15, s = (i >> 4) & 1;
    for (int b = 0, c = 0; b < 4; ++b) {
      if ((n >> b) & 1) {
        if (c == s) t.nib_pos[i] = static_cast<uint8_t>(b);
        ++c;
      }
    }
  }
  for (int j = 0; j < 16; ++j) {
    t.second[j] = (j % 2) << 4;
    t.group[j] = 4 * (j / 2);
    t.byte_base[j] = 8 * (j / 4);
  }
  for (int m = 0; m < 256; ++m) {
    for (int b = 0, c = 0; b < 8 && c < 4; ++b) {
      if ((m >> b) & 1) t.pos4[m][c++] = b;
    }
  }
  return t;
}

constexpr Select16Tables kSel = make_select16_tables();

// Dword indices of the 32 kept columns of 64 (bits: the mask bits of those columns), in two zmm.
template <int N>
struct KeptIndex;

template <>
struct KeptIndex<2> {  // 2:4
  __m512i shift0, shift1, lut, second, group;
  KeptIndex()
      : shift0(_mm512_load_si512(kSel.shift[0])),
        shift1(_mm512_load_si512(kSel.shift[1])),
        lut(_mm512_load_si512(kSel.nib_pos)),
        second(_mm512_load_si512(kSel.second)),
        group(_mm512_load_si512(kSel.group)) {}
  inline __attribute__((always_inline)) void get(const uint8_t* mp, __m512i& i0, __m512i& i1) const {
    uint64_t bits;
    std::memcpy(&bits, mp, 8);
    const __m512i b = _mm512_set1_epi64(static_cast<long long>(bits));
    const __m512i f = _mm512_set1_epi32(0x0F);
    // (nibble & 0xF) | (j % 2) << 4; vpermb reads the low 6 bits of byte 0 (other bytes: junk
    // the vpermt2ps never reads, it uses bits 0-4 of each dword).
    const __m512i n0 = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shift0, b), f, second, 0xEA);
    const __m512i n1 = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shift1, b), f, second, 0xEA);
    i0 = _mm512_add_epi32(_mm512_permutexvar_epi8(n0, lut), group);
    i1 = _mm512_add_epi32(_mm512_permutexvar_epi8(n1, lut), group);
  }
};

template <>
struct KeptIndex<4> {  // 4:8
  __m512i base;
  KeptIndex() : base(_mm512_load_si512(kSel.byte_base)) {}
  static inline __m512i four(const uint8_t* m) {
    __m512i t = _mm512_castsi128_si512(_mm_load_si128(reinterpret_cast<const __m128i*>(kSel.pos4[m[0]])));
    t = _mm512_inserti32x4(t, _mm_load_si128(reinterpret_cast<const __m128i*>(kSel.pos4[m[1]])), 1);
    t = _mm512_inserti32x4(t, _mm_load_si128(reinterpret_cast<const __m128i*>(kSel.pos4[m[2]])), 2);
    return _mm512_inserti32x4(t, _mm_load_si128(reinterpret_cast<const __m128i*>(kSel.pos4[m[3]])), 3);
  }
  inline __attribute__((always_inline)) void get(const uint8_t* mp, __m512i& i0, __m512i& i1) const {
    i0 = _mm512_add_epi32(four(mp), base);
    i1 = _mm512_add_epi32(four(mp + 4), base);
  }
};

template <int N, int WR, bool kPrefetch>
void select16_rows(const NMProblem& p, int64_t r) {
  const float* vp[WR];
  const uint8_t* mp[WR];
  const char* next[WR];
  for (int i = 0; i < WR; ++i) {
    vp[i] = static_cast<const float*>(row_values(p, r + i, 4));
    mp[i] = p.mask + (r + i) * p.KB;
    next[i] = kPrefetch && r + WR + i < p.R
                  ? static_cast<const char*>(row_values(p, r + WR + i, 4))
                  : nullptr;
  }
  const KeptIndex<N> index;
  __m512 acc[WR];
  for (int i = 0; i < WR; ++i) acc[i] = _mm512_setzero_ps();
  const float* x = p.x;
  const int64_t cols = p.kept * 2;
  const int64_t whole = cols / 64;
  for (int64_t c = 0; c < whole; ++c) {
    const __m512 x0 = _mm512_loadu_ps(x + 64 * c);
    const __m512 x1 = _mm512_loadu_ps(x + 64 * c + 16);
    const __m512 x2 = _mm512_loadu_ps(x + 64 * c + 32);
    const __m512 x3 = _mm512_loadu_ps(x + 64 * c + 48);
#pragma GCC unroll 8
    for (int i = 0; i < WR; ++i) {
      if constexpr (kPrefetch) {
        if (next[i] != nullptr) {
          _mm_prefetch(next[i] + 128 * c, _MM_HINT_T1);
          _mm_prefetch(next[i] + 128 * c + 64, _MM_HINT_T1);
        }
      }
      __m512i i0, i1;
      index.get(mp[i] + 8 * c, i0, i1);
      const __m512 xa = _mm512_permutex2var_ps(x0, i0, x1);
      const __m512 xb = _mm512_permutex2var_ps(x2, i1, x3);
      acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(vp[i] + 32 * c), xa, acc[i]);
      acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(vp[i] + 32 * c + 16), xb, acc[i]);
    }
  }
  // The last cols % 64 columns (x is zero past cols only up to a multiple of 16, so its loads
  // are masked; mask bytes past the row's KB read as zero): lanes past the tail's kept count are
  // masked off the FMA, so no 0 * x product (x may be Inf there) enters the sum.
  const int64_t tail = cols - 64 * whole;
  if (tail > 0) {
    const int64_t c0 = 64 * whole;
    const uint64_t xl = (uint64_t{1} << tail) - 1;
    const __m512 x0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(xl), x + c0);
    const __m512 x1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(xl >> 16), x + c0 + 16);
    const __m512 x2 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(xl >> 32), x + c0 + 32);
    const __m512 x3 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(xl >> 48), x + c0 + 48);
    const int64_t kt = tail / 2;  // kept values in the tail
    const __mmask16 k0 = static_cast<__mmask16>(kt >= 16 ? 0xffff : (1u << kt) - 1);
    const __mmask16 k1 = static_cast<__mmask16>(kt <= 16 ? 0 : (1u << (kt - 16)) - 1);
    for (int i = 0; i < WR; ++i) {
      alignas(8) uint8_t bytes[8] = {};
      std::memcpy(bytes, mp[i] + 8 * whole, static_cast<size_t>((tail + 7) / 8));
      __m512i i0, i1;
      index.get(bytes, i0, i1);
      const __m512 xa = _mm512_permutex2var_ps(x0, i0, x1);
      const __m512 xb = _mm512_permutex2var_ps(x2, i1, x3);
      const float* v = vp[i] + 32 * whole;
      acc[i] = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(k0, v), xa, acc[i], k0);
      acc[i] = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(k1, v + 16), xb, acc[i], k1);
    }
  }
  for (int i = 0; i < WR; ++i) p.y[r + i] += _mm512_reduce_add_ps(acc[i]);
}

template <int N>
void select16(const NMProblem& p, int64_t r0, int64_t r1) {
  // Prefetching the next rows pays for weights past L2 (the AVX2 kernel's finding); a weight
  // that fits L2 skips it.
  const bool prefetch = p.R * p.kept * 4 > (int64_t{1} << 20);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    if (prefetch) {
      select16_rows<N, 4, true>(p, r);
    } else {
      select16_rows<N, 4, false>(p, r);
    }
  }
  for (; r < r1; ++r) select16_rows<N, 1, false>(p, r);
}

bool has_vbmi() {
  static const bool yes = __builtin_cpu_supports("avx512vbmi");
  return yes;
}

// The AVX-512 selecting GEMV where it applies (fp32, 2:4 or 4:8, CPU with VBMI); false otherwise.
bool try_select16(const NMProblem& p, int64_t r0, int64_t r1) {
  if (p.B != 1 || p.vtype != ValueType::kFloat32 || !has_vbmi()) return false;
  if (p.n == 2 && p.m == 4) {
    select16<2>(p, r0, r1);
  } else if (p.n == 4 && p.m == 8) {
    select16<4>(p, r0, r1);
  } else {
    return false;
  }
  return true;
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
  // Batch-1 1:4 / 1:8 by default, and every other selecting pattern when forced: the AVX2
  // selecting GEMV (one FMA per 8 kept values), which expanding 16 dense weights per instruction cannot
  // beat at 1:4 / 1:8: it does 2 (1:8) to 4 (1:4) times more FMAs.
  // Batch-1 fp32 2:4 and 4:8: the AVX-512 selecting GEMV (select16), unless PATH_EXPAND.
  if (p.select != SelectMode::kNever && try_select16(p, r0, r1)) return;
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
