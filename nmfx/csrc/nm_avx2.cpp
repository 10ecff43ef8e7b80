// AVX2 + FMA N:M kernel (x86-64 without AVX-512).
//
// For every 8 dense columns of a weight row, the mask byte selects a 32-byte entry of a
// 256-entry table and one shuffle rebuilds the 8 dense weights in fp32, zeros included:
//   * bf16: the next 8 kept values are broadcast to both 128-bit lanes and vpshufb moves kept
//     value c into the high half of lane i (= its fp32 value) and zeros everything else;
//   * fp32 with at most 4 kept values per 8 columns (2:4, 1:4, 1:8, 4:8, N<=4 of 16): the next
//     4 kept values are broadcast and vpshufb places them, as for bf16;
//   * fp32 denser than that: vpermps with an index table, then an AND with a zeroing table;
//   * fp16: vpshufb expands 8 halves in 128 bits, then vcvtph2ps.
// One 16-byte fetch of kept values serves every block it covers (e.g. two blocks of bf16 2:4),
// and mask bytes are read 8 at a time. The expanded vector is FMA'd against x in registers, so
// the dense weight never exists in memory. At batch 1 four weight rows share each x load; at
// batch > 1 tiles of 3 weight rows x 4 rows of x reuse each expanded vector four times.
// At batch 1, patterns with one kept value per group (1:4, 1:8) or four per 8 columns (2:4, 4:8)
// select x instead of expanding W (select_gemv, below): one FMA per 8 kept values.
// From 32 rows of x the batched path (run_panels, below) takes over: it does only the kept
// multiply-adds, against x staged transposed.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "nm_kernels.h"

#pragma GCC target("avx2,fma,f16c,popcnt")

#include "nm_panels.h"  // after the target pragma: its code is compiled for AVX2 here

namespace nmfx {
namespace {

constexpr int8_t kZ = static_cast<int8_t>(0x80);  // vpshufb: write zero

struct alignas(32) Tables {
  int8_t f32_shuf[256][32];  // fp32, rank < 4
  int8_t bf16_shuf[256][32];
  int8_t f16_shuf[256][16];
  int32_t f32_perm[256][8];
  int32_t f32_keep[256][8];  // all-ones where kept
};

constexpr Tables make_tables() {
  Tables t{};
  for (int m = 0; m < 256; ++m) {
    int c = 0;
    for (int i = 0; i < 8; ++i) {
      const bool kept = (m >> i) & 1;
      for (int b = 0; b < 4; ++b) {
        t.f32_shuf[m][4 * i + b] = kept && c < 4 ? static_cast<int8_t>(4 * c + b) : kZ;
      }
      t.bf16_shuf[m][4 * i + 0] = kZ;
      t.bf16_shuf[m][4 * i + 1] = kZ;
      t.bf16_shuf[m][4 * i + 2] = kept ? static_cast<int8_t>(2 * c) : kZ;
      t.bf16_shuf[m][4 * i + 3] = kept ? static_cast<int8_t>(2 * c + 1) : kZ;
      t.f16_shuf[m][2 * i + 0] = kept ? static_cast<int8_t>(2 * c) : kZ;
      t.f16_shuf[m][2 * i + 1] = kept ? static_cast<int8_t>(2 * c + 1) : kZ;
      t.f32_perm[m][i] = kept ? c : 0;
      t.f32_keep[m][i] = kept ? -1 : 0;
      if (kept) ++c;
    }
  }
  return t;
}

constexpr Tables kTables = make_tables();

// Kept values are fetched 16 bytes at a time: with STEP kept values per block, one fetch serves
// kGroup consecutive blocks, and block g of the group shifts its shuffle control by g*STEP
// values (entries 0x80 stay negative, i.e. still "write zero").
template <Kind K, int STEP>
constexpr int kGroup =
    (STEP > 0 && K != Kind::kF32Perm && (16 / kElemBytes<K>) / STEP > 1) ? (16 / kElemBytes<K>) / STEP
                                                                        : 1;

template <Kind K>
inline __m256i fetch(const char* vp) {
  if constexpr (K == Kind::kF32Perm) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp));
  } else {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vp)));
  }
}

// The 8 dense weights of mask byte m from fetched values v, starting `shift` bytes into v.
template <Kind K>
inline __m256 expand8(__m256i v, unsigned m, int shift) {
  if constexpr (K == Kind::kF32Shuf || K == Kind::kBF16) {
    const int8_t(&tab)[256][32] = K == Kind::kF32Shuf ? kTables.f32_shuf : kTables.bf16_shuf;
    __m256i ctl = load_si256(tab[m]);
    if (shift) ctl = _mm256_add_epi8(ctl, _mm256_set1_epi8(static_cast<char>(shift)));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(v, ctl));
  } else if constexpr (K == Kind::kF16) {
    __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.f16_shuf[m]));
    if (shift) ctl = _mm_add_epi8(ctl, _mm_set1_epi8(static_cast<char>(shift)));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm256_castsi256_si128(v), ctl));
  } else {
    const __m256 e =
        _mm256_permutevar8x32_ps(_mm256_castsi256_ps(v), load_si256(kTables.f32_perm[m]));
    return _mm256_and_ps(e, _mm256_castsi256_ps(load_si256(kTables.f32_keep[m])));
  }
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// One 8-column block (number U of a run of 8) for WR weight rows times XB rows of x.
template <Kind K, int STEP, int WR, int XB, int U>
inline __attribute__((always_inline)) void block(const char*& vp, int64_t vstride, int64_t* off,
                                                 const int64_t* lim, __m256i* v, const float* xk,
                                                 int64_t ldx,
                                                 __m256 (&acc)[WR][XB], const uint64_t* mm) {
  constexpr int E = kElemBytes<K>;
  constexpr int G = kGroup<K, STEP>;
  constexpr int g = U % G;
  __m256 w[WR];
#pragma GCC unroll 8
  for (int i = 0; i < WR; ++i) {
    const unsigned m = static_cast<unsigned>(mm[i] >> (8 * U)) & 0xffu;
    if constexpr (STEP > 0) {
      if constexpr (g == 0) v[i] = fetch<K>(vp + i * vstride);
      w[i] = expand8<K>(v[i], m, g * STEP * E);
    } else {
      w[i] = expand8<K>(fetch<K>(vp + off[i]), m, 0);
      // Clamped at the row's end: a corrupt mask byte (more set bits than the pattern keeps)
      // must not walk the reads past the row; fetches there stay within the values' slack.
      off[i] = std::min<int64_t>(off[i] + static_cast<int64_t>(_mm_popcnt_u32(m)) * E, lim[i]);
    }
  }
  if constexpr (STEP > 0 && g == G - 1) vp += G * STEP * E;
#pragma GCC unroll 4
  for (int j = 0; j < XB; ++j) {
    const __m256 xv = _mm256_loadu_ps(xk + j * ldx);
#pragma GCC unroll 8
    for (int i = 0; i < WR; ++i) acc[i][j] = _mm256_fmadd_ps(w[i], xv, acc[i][j]);
  }
}

template <Kind K, int STEP, int WR, int XB, int... U>
inline __attribute__((always_inline)) void blocks(const char*& vp, int64_t vstride, int64_t* off,
                                                  const int64_t* lim, __m256i* v, const float* xk,
                                                  int64_t ldx,
                                                  __m256 (&acc)[WR][XB], const uint64_t* mm,
                                                  std::integer_sequence<int, U...>) {
  (block<K, STEP, WR, XB, U>(vp, vstride, off, lim, v, xk + 8 * U, ldx, acc, mm), ...);
}

// Software prefetch of the same columns WR rows further down, i.e. of the next tile of rows,
// into L2. A tile's rows are WR short interleaved streams (a 4096-wide 2:4 row is 8 KB), too
// short for the hardware prefetcher to ramp up on; without this a thread read 5-13 GB/s from
// DRAM where dense GEMV reads 17 GB/s (batch 1, 4096x4096, one thread).
template <int WR, int kIterBytes>
inline __attribute__((always_inline)) void prefetch_next_tile(const char* vp, int64_t vstride,
                                                              const uint8_t* mp, int64_t mstride,
                                                              int64_t kb) {
  const char* next = vp + WR * vstride;
#pragma GCC unroll 8
  for (int i = 0; i < WR; ++i) {
#pragma GCC unroll 4
    for (int o = 0; o < kIterBytes; o += 64) _mm_prefetch(next + i * vstride + o, _MM_HINT_T1);
    if ((kb & 63) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(mp + (WR + i) * mstride), _MM_HINT_T1);
    }
  }
}

// Rows r..r+WR-1 are contiguous (in `values` or in the tail copy; see row_values), so one base
// pointer and a row stride address them all. STEP > 0: every mask byte keeps STEP values
// (M in {4, 8}); STEP == 0: the byte's popcount (M = 16).
template <Kind K, int STEP, int WR, int XB>
void micro(const NMProblem& p, int64_t r, int64_t b) {
  constexpr int E = kElemBytes<K>;
  const char* vp = static_cast<const char*>(row_values(p, r, E));
  const int64_t vstride = p.kept * E;
  const uint8_t* mp = p.mask + r * p.KB;
  const int64_t mstride = p.KB;
  // Per-row value offsets from vp, used by the STEP == 0 form, and their bound: the row's end.
  int64_t off[WR];
  int64_t lim[WR];
  for (int i = 0; i < WR; ++i) off[i] = i * vstride;
  for (int i = 0; i < WR; ++i) lim[i] = (i + 1) * vstride;
  const char* const vp0 = vp;
  __m256 acc[WR][XB];
  for (int i = 0; i < WR; ++i) {
    for (int j = 0; j < XB; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  __m256i v[WR];
  const float* xb = p.x + b * p.ldx;
  const int64_t ldx = p.ldx;
  const int64_t KB = p.KB;
  // Mask bytes are read 8 at a time: one load per weight row per 64 columns.
  int64_t kb = 0;
  for (; kb + 8 <= KB; kb += 8) {
    uint64_t mm[WR];
    for (int i = 0; i < WR; ++i) std::memcpy(&mm[i], mp + i * mstride + kb, 8);
    if constexpr (STEP > 0) prefetch_next_tile<WR, 8 * STEP * E>(vp, vstride, mp + kb, mstride, kb);
    blocks<K, STEP, WR, XB>(vp, vstride, off, lim, v, xb + kb * 8, ldx, acc, mm,
                            std::make_integer_sequence<int, 8>{});
  }
  // Tail: the last KB % 8 mask bytes, zero-extended to a whole run (zero bytes keep nothing,
  // and x is zero padded to a multiple of 16 columns, but not necessarily of 64).
  if constexpr (STEP > 0) {
    for (int i = 0; i < WR; ++i) lim[i] -= vp - vp0;  // relative to where vp stopped
  }
  for (; kb < KB; ++kb) {
    uint64_t mm[WR];
    for (int i = 0; i < WR; ++i) mm[i] = mp[i * mstride + kb];
    // STEP = 0 form: addresses are vp + off[i], advanced by popcount (vp stays put).
    block<K, 0, WR, XB, 0>(vp, vstride, off, lim, v, xb + kb * 8, ldx, acc, mm);
  }
  for (int i = 0; i < WR; ++i) {
    for (int j = 0; j < XB; ++j) p.y[(b + j) * p.R + r + i] += hsum(acc[i][j]);
  }
}

template <Kind K, int STEP, int WR>
void all_x_rows(const NMProblem& p, int64_t r) {
  int64_t b = 0;
  for (; b + 4 <= p.B; b += 4) micro<K, STEP, WR, 4>(p, r, b);
  if (b + 2 <= p.B) {
    micro<K, STEP, WR, 2>(p, r, b);
    b += 2;
  }
  if (b < p.B) micro<K, STEP, WR, 1>(p, r, b);
}

// Rows [r0, r1) must not straddle p.safe_rows (their values must be contiguous).
// Batch 1: 4 weight rows share each x load. Batch > 1: tiles of 3 weight rows x 4 rows of x
// (12 accumulators + 3 expanded vectors + x = 16 ymm registers) measured fastest.
template <Kind K, int STEP>
void run_contiguous(const NMProblem& p, int64_t r0, int64_t r1) {
  int64_t r = r0;
  if (p.B == 1) {
    for (; r + 4 <= r1; r += 4) micro<K, STEP, 4, 1>(p, r, 0);
  } else {
    for (; r + 3 <= r1; r += 3) all_x_rows<K, STEP, 3>(p, r);
  }
  for (; r < r1; ++r) all_x_rows<K, STEP, 1>(p, r);
}

// Calls fn(r0', r1') on the parts of [r0, r1) on either side of p.safe_rows, whose rows' values
// are contiguous (kernels that address rows by one base pointer and a stride need that).
template <typename Fn>
inline void split_at_safe_rows(const NMProblem& p, int64_t r0, int64_t r1, Fn&& fn) {
  const int64_t split = r0 < p.safe_rows ? (r1 < p.safe_rows ? r1 : p.safe_rows) : r0;
  if (split > r0) fn(r0, split);
  if (r1 > split) fn(split, r1);
}

template <Kind K, int STEP>
void run(const NMProblem& p, int64_t r0, int64_t r1) {
  split_at_safe_rows(p, r0, r1, [&](int64_t a, int64_t b) { run_contiguous<K, STEP>(p, a, b); });
}

// Batch-1 GEMV for one kept value per group (1:4, 1:8): select x instead of expanding W.
// Per chunk of 8 groups (8*M columns) lane i needs x[i*M + t_i], t_i the kept position of group
// i. With x regrouped (xsel: register j holds x[i*M + j] in lane i) that is a blend tree over M
// registers whose selectors are the bits of t_i: a one-hot group 2^t times a constant whose bit
// 31-t is bit b of t puts bit b of t in the sign bit, which vblendvps reads (bits of other
// groups above the group's own land past bit 31 and vanish). One FMA then does 8 useful
// multiply-adds, where expanding does 8 FMAs of which 1 or 2 lanes are useful.
template <int M>
struct Selectors;

template <>
struct Selectors<4> {
  // The chunk's 32 mask bits (8 nibbles): lane i gets nibble i in its low bits.
  static inline void get(const uint8_t* mp, __m256i (&sel)[2]) {
    int32_t w;
    std::memcpy(&w, mp, 4);
    const __m256i v =
        _mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    sel[0] = _mm256_mullo_epi32(v, _mm256_set1_epi32(0x50000000));  // sign = bit 0 of t
    sel[1] = _mm256_mullo_epi32(v, _mm256_set1_epi32(0x30000000));  // sign = bit 1 of t
  }
};

template <>
struct Selectors<8> {
  static inline void get(const uint8_t* mp, __m256i (&sel)[3]) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mp)));
    sel[0] = _mm256_mullo_epi32(v, _mm256_set1_epi32(0x55000000));
    sel[1] = _mm256_mullo_epi32(v, _mm256_set1_epi32(0x33000000));
    sel[2] = _mm256_mullo_epi32(v, _mm256_set1_epi32(0x0F000000));
  }
};

inline __m256 blend(__m256 a, __m256 b, __m256i s) {
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(s));
}

// Patterns keeping 4 of every 8 columns (2:4, 4:8) at batch 1: entry [m] lists the positions
// (0..7) of the first 4 set bits of mask byte m, i.e. of its 4 kept columns.
struct alignas(16) Kept4 {
  int32_t pos[256][4];
};

constexpr Kept4 make_kept4() {
  Kept4 t{};
  for (int m = 0; m < 256; ++m) {
    int c = 0;
    for (int i = 0; i < 8 && c < 4; ++i) {
      if ((m >> i) & 1) t.pos[m][c++] = i;
    }
  }
  return t;
}

constexpr Kept4 kKept4 = make_kept4();

// 8 kept values = 16 columns: kept values 0-3 sit in columns 0-7 and pick their x from x[0..7]
// with a cross-lane permute (vpermps), kept values 4-7 from x[8..15]; one blend joins the two and
// one FMA does 8 useful multiply-adds, where expanding does 2 shuffles and 2 FMAs half of whose
// lanes multiply zeros.
template <Kind K, int WR, bool kPrefetch>
inline __attribute__((always_inline)) void select4_chunk(const char* vp, int64_t vstride,
                                                         const uint8_t* mp, int64_t mstride,
                                                         const float* xs, __m256 (&acc)[WR]) {
  const __m256 lo = _mm256_loadu_ps(xs);
  const __m256 hi = _mm256_loadu_ps(xs + 8);
#pragma GCC unroll 8
  for (int i = 0; i < WR; ++i) {
    if constexpr (kPrefetch) {
      _mm_prefetch(vp + (WR + i) * vstride, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(mp + (WR + i) * mstride), _MM_HINT_T1);
    }
    const uint8_t* m = mp + i * mstride;
    const __m256i idx = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(kKept4.pos[m[1]]),
                                            reinterpret_cast<const __m128i*>(kKept4.pos[m[0]]));
    const __m256 x = _mm256_blend_ps(_mm256_permutevar8x32_ps(lo, idx),
                                     _mm256_permutevar8x32_ps(hi, idx), 0xF0);
    acc[i] = _mm256_fmadd_ps(load8<K>(vp + i * vstride), x, acc[i]);
  }
}

template <Kind K, int M, int WR, bool kPrefetch>
inline __attribute__((always_inline)) void select_chunk(const char* vp, int64_t vstride,
                                                        const uint8_t* mp, int64_t mstride,
                                                        const float* xs, __m256 (&acc)[WR]) {
  __m256 xr[M];
#pragma GCC unroll 8
  for (int j = 0; j < M; ++j) xr[j] = _mm256_loadu_ps(xs + 8 * j);
#pragma GCC unroll 8
  for (int i = 0; i < WR; ++i) {
    if constexpr (kPrefetch) {
      _mm_prefetch(vp + (WR + i) * vstride, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(mp + (WR + i) * mstride), _MM_HINT_T1);
    }
    __m256i s[M == 4 ? 2 : 3];
    Selectors<M>::get(mp + i * mstride, s);
    __m256 x;
    if constexpr (M == 4) {
      x = blend(blend(xr[0], xr[1], s[0]), blend(xr[2], xr[3], s[0]), s[1]);
    } else {
      const __m256 a = blend(blend(xr[0], xr[1], s[0]), blend(xr[2], xr[3], s[0]), s[1]);
      const __m256 b = blend(blend(xr[4], xr[5], s[0]), blend(xr[6], xr[7], s[0]), s[1]);
      x = blend(a, b, s[2]);
    }
    acc[i] = _mm256_fmadd_ps(load8<K>(vp + i * vstride), x, acc[i]);
  }
}

template <Kind K, int N, int M, int WR, bool kPrefetch>
inline __attribute__((always_inline)) void select_any(const char* vp, int64_t vstride,
                                                      const uint8_t* mp, int64_t mstride,
                                                      const float* xs, __m256 (&acc)[WR]) {
  if constexpr (8 / M * N == 4) {
    select4_chunk<K, WR, kPrefetch>(vp, vstride, mp, mstride, xs, acc);
  } else {
    select_chunk<K, M, WR, kPrefetch>(vp, vstride, mp, mstride, xs, acc);
  }
}

template <Kind K, int N, int M, int WR>
void select_gemv(const NMProblem& p, int64_t r) {
  constexpr int E = kElemBytes<K>;
  constexpr int CH = 8 * M / N;  // columns per chunk: CH / 8 mask bytes, 8 kept values per row
  constexpr int MB = CH / 8;
  // 4 kept per mask byte (2:4, 4:8) read x as is; one kept per group reads it regrouped.
  const float* xs = 8 / M * N == 4 ? p.x : p.xsel;
  // Chunks per 64-byte line of values: prefetch once per line.
  constexpr int U = 64 / (8 * E) > 1 ? 64 / (8 * E) : 1;
  const char* vp = static_cast<const char*>(row_values(p, r, E));
  const char* const row0 = vp;
  const int64_t vstride = p.kept * E;
  const uint8_t* mp = p.mask + r * p.KB;
  const int64_t mstride = p.KB;
  const int64_t cols = p.kept / N * M;
  const int64_t nch = cols / CH;
  __m256 acc[WR];
  for (int i = 0; i < WR; ++i) acc[i] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + U <= nch; c += U) {
    select_any<K, N, M, WR, true>(vp, vstride, mp, mstride, xs + c * CH, acc);
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) {
      select_any<K, N, M, WR, false>(vp + u * 8 * E, vstride, mp + u * MB, mstride,
                                     xs + (c + u) * CH, acc);
    }
    vp += U * 8 * E;
    mp += U * MB;
  }
  for (; c < nch; ++c) {
    select_any<K, N, M, WR, false>(vp, vstride, mp, mstride, xs + c * CH, acc);
    vp += 8 * E;
    mp += MB;
  }
  // Fewer than 8 groups left: scalar, from the plain x.
  for (int i = 0; i < WR; ++i) {
    float tail = 0.f;
    const char* v = vp + i * vstride;
    const char* const vend = row0 + (i + 1) * vstride;  // a corrupt mask stops at the row's end
    for (int64_t col = nch * CH; col < cols; col += M) {
      for (int j = 0; j < M; ++j) {
        const int64_t k = col + j;
        if (v < vend && (mp[i * mstride + (k - nch * CH) / 8] >> ((k - nch * CH) % 8)) & 1) {
          tail += load1<K>(v) * p.x[k];
          v += E;
        }
      }
    }
    p.y[r + i] += hsum(acc[i]) + tail;
  }
}

template <Kind K, int N, int M>
void run_select(const NMProblem& p, int64_t r0, int64_t r1) {
  split_at_safe_rows(p, r0, r1, [&](int64_t a, int64_t b) {
    int64_t r = a;
    for (; r + 4 <= b; r += 4) select_gemv<K, N, M, 4>(p, r);
    for (; r < b; ++r) select_gemv<K, N, M, 1>(p, r);
  });
}

template <Kind K>
bool try_select(const NMProblem& p, int64_t r0, int64_t r1) {
  if (p.B != 1 || p.select == SelectMode::kNever) return false;
  if (p.n == 2 && p.m == 4) {
    run_select<K, 2, 4>(p, r0, r1);
  } else if (p.n == 4 && p.m == 8) {
    run_select<K, 4, 8>(p, r0, r1);
  } else if (p.xsel != nullptr && xsel_chunk(p.B, p.n, p.m) > 0) {
    if (p.m == 4) {
      run_select<K, 1, 4>(p, r0, r1);
    } else {
      run_select<K, 1, 8>(p, r0, r1);
    }
  } else {
    return false;
  }
  return true;
}

// Specialised for the constant kept-per-byte counts of the common patterns (1:8, 1:4 / 2:8,
// 2:4 / 4:8); every other pattern takes the popcount path (STEP = 0), which is also correct
// for them. Fewer instantiations keep the first-use build short.
template <Kind K>
void run_step(const NMProblem& p, int64_t r0, int64_t r1, int step) {
  switch (step) {
    case 1:
      return run<K, 1>(p, r0, r1);
    case 2:
      return run<K, 2>(p, r0, r1);
    case 4:
      return run<K, 4>(p, r0, r1);
    default:
      return run<K, 0>(p, r0, r1);
  }
}


}  // namespace

void nm_gemm_avx2_panels(const NMProblem& p, int64_t r0, int64_t r1) {
  run_panels_any<V256>(p, r0, r1);
}

void nm_gemm_avx2(const NMProblem& p, int64_t r0, int64_t r1) {
  if (p.xpanel != nullptr) return nm_gemm_avx2_panels(p, r0, r1);
  // Constant kept-per-byte when M divides 8; otherwise popcount per byte (M = 16).
  const int step = 8 % p.m == 0 ? 8 / p.m * p.n : 0;
  const int max_per_byte = step ? step : (p.n < 8 ? p.n : 8);
  switch (p.vtype) {
    case ValueType::kFloat32:
      if (try_select<Kind::kF32Shuf>(p, r0, r1)) break;
      if (max_per_byte <= 4) {
        run_step<Kind::kF32Shuf>(p, r0, r1, step);
      } else {
        run<Kind::kF32Perm, 0>(p, r0, r1);
      }
      break;
    case ValueType::kBFloat16:
      if (try_select<Kind::kBF16>(p, r0, r1)) break;
      run_step<Kind::kBF16>(p, r0, r1, step);
      break;
    case ValueType::kFloat16:
      if (try_select<Kind::kF16>(p, r0, r1)) break;
      run_step<Kind::kF16>(p, r0, r1, step);
      break;
  }
}

}  // namespace nmfx

#else  // not x86: never selected (cpu_has_* report false); keeps the build portable.

#include "nm_kernels.h"

namespace nmfx {
void nm_gemm_avx2(const NMProblem& p, int64_t r0, int64_t r1) { nm_gemm_portable(p, r0, r1); }
void nm_gemm_avx2_panels(const NMProblem& p, int64_t r0, int64_t r1) { nm_gemm_portable(p, r0, r1); }
}  // namespace nmfx

#endif
