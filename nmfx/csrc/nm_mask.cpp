// N:M mask in one pass over the weight: for each group of m consecutive elements of the
// last dim, keep the n largest |w|. Same rules as nmfx/masks.py: NaN ranks as +inf, ties go
// to the lower index, every group keeps exactly n. Used by eager training on CPU.
// Groups of 4 (2:4, 1:4, 3:4) and the SR-STE decay have AVX2 and AVX-512 kernels, chosen at run
// time from cpuid (set_mask_isa forces one, for tests); everything else runs portable loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "nm_parallel.h"

#include <cmath>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <optional>
#include <tuple>

namespace nmfx {
int64_t isa_cap();  // nm_ops.cpp: the highest ISA code this process may use (NMFX_ISA_CAP)
}

namespace {

constexpr int64_t kMaxM = 16;
// Work items of the threads (nm_parallel.h): 8192 groups, 32768 elements of the decay.
constexpr int64_t kGroupChunk = 8192;
constexpr int64_t kDecayChunk = 32768;
// Elements per work item of srste_decay_nm_ (its mask, on the stack: one bool each).
constexpr int64_t kTermChunk = 16384;

// ``keep ? v : 0`` as bit arithmetic (all-ones or all-zeros mask): GCC vectorises this but
// not a select on a bool load. Exact for every value, NaN and Inf included.
template <typename T>
inline T keep_or_zero(T v, bool keep) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, std::conditional_t<sizeof(T) == 2, uint16_t, uint64_t>>;
  U bits;
  std::memcpy(&bits, &v, sizeof(T));
  bits &= static_cast<U>(U{0} - static_cast<U>(keep));
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// One block of groups: ranks by pairwise comparison (j beats i when larger, or equal with a
// lower index), then the mask and, where ``mw`` is not null, the masked weight. M is a
// compile-time constant for the common sizes so the loops unroll; 0 means "runtime m".
// Restrict-qualified pointers passed by value: without them the loops do not vectorise
// (measured 15x slower).
template <typename T, int M>
void mask_block(const T* __restrict__ w, bool* __restrict__ out, T* __restrict__ mw, int64_t begin,
                int64_t end, int64_t n, int64_t m_rt) {
  const int64_t m = M > 0 ? M : m_rt;
  float mag[kMaxM];
  bool keep[kMaxM];
  for (int64_t g = begin; g < end; ++g) {
    const T* src = w + g * m;
    for (int64_t i = 0; i < m; ++i) {
      const float v = std::fabs(static_cast<float>(src[i]));
      mag[i] = v != v ? std::numeric_limits<float>::infinity() : v;  // NaN ranks as +inf
    }
    for (int64_t i = 0; i < m; ++i) {
      int64_t rank = 0;
      for (int64_t j = 0; j < i; ++j) rank += mag[j] >= mag[i];
      for (int64_t j = i + 1; j < m; ++j) rank += mag[j] > mag[i];
      keep[i] = rank < n;
    }
    if (out != nullptr) {
      bool* dst = out + g * m;
      for (int64_t i = 0; i < m; ++i) dst[i] = keep[i];
    }
    if (mw != nullptr) {
      T* dst_w = mw + g * m;
      for (int64_t i = 0; i < m; ++i) dst_w[i] = keep_or_zero(src[i], keep[i]);
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// fp32 groups of 4 with AVX2: one group per 128-bit lane, ranks from three in-lane rotations
// (element (i+k)%4 sits at position i of rotation k; it has the lower index iff i >= 4-k).
// Same rules as mask_block: larger wins, ties go to the lower index, NaN ranks as +inf.
// Returns all-ones lanes where kept. Integer keys and the "+1 turns > into >=" trick of
// keep4_avx512 (keys < 2^31, so the signed compare orders them); the third rotation is ~b1
// rotated, the rank is bit logic.
__attribute__((target("avx2"))) inline __m256i keep4_avx2(__m256 v, int64_t n) {
  const __m256i abs_bits = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf_key = _mm256_set1_epi32(0x7f800000);
  const __m256i low1 = _mm256_setr_epi32(0, 0, 0, 1, 0, 0, 0, 1);
  const __m256i low2 = _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);
  const __m256i ones = _mm256_set1_epi32(-1);
  const __m256i key = _mm256_min_epu32(_mm256_and_si256(_mm256_castps_si256(v), abs_bits), inf_key);
  const __m256i r1 = _mm256_add_epi32(_mm256_shuffle_epi32(key, _MM_SHUFFLE(0, 3, 2, 1)), low1);
  const __m256i r2 = _mm256_add_epi32(_mm256_shuffle_epi32(key, _MM_SHUFFLE(1, 0, 3, 2)), low2);
  const __m256i b1 = _mm256_cmpgt_epi32(r1, key);  // (i+1)%4 beats i
  const __m256i b2 = _mm256_cmpgt_epi32(r2, key);  // (i+2)%4 beats i
  // (i+3)%4 beats i == i does not beat (i+3)%4 == !b1[(i+3)%4]
  const __m256i b3 = _mm256_xor_si256(_mm256_shuffle_epi32(b1, _MM_SHUFFLE(2, 1, 0, 3)), ones);
  if (n == 1) return _mm256_xor_si256(_mm256_or_si256(_mm256_or_si256(b1, b2), b3), ones);
  if (n == 2) {
    const __m256i two = _mm256_or_si256(_mm256_and_si256(b1, _mm256_or_si256(b2, b3)), _mm256_and_si256(b2, b3));
    return _mm256_xor_si256(two, ones);
  }
  return _mm256_xor_si256(_mm256_and_si256(_mm256_and_si256(b1, b2), b3), ones);
}

__attribute__((target("avx2"))) void mask4_avx2(const float* __restrict__ w, bool* __restrict__ out,
                                               float* __restrict__ mw, int64_t begin, int64_t end,
                                               int64_t n) {
  int64_t g = begin;
  for (; g + 2 <= end; g += 2) {  // two groups of 4 per iteration
    const __m256 v = _mm256_loadu_ps(w + g * 4);
    const __m256i keep = keep4_avx2(v, n);
    if (mw != nullptr) _mm256_storeu_ps(mw + g * 4, _mm256_and_ps(v, _mm256_castsi256_ps(keep)));
    if (out == nullptr) continue;
    // 8 keep lanes -> 8 bytes of 0/1: pack the lanes' low bytes together
    const __m256i b = _mm256_and_si256(keep, _mm256_set1_epi32(1));
    const __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
    const __m128i packed = _mm_packus_epi16(_mm_packus_epi32(lo, hi), _mm_setzero_si128());
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + g * 4), packed);
  }
  if (g < end) mask_block<float, 4>(w, out, mw, g, end, n, 4);
}

// grad += lam * w where !keep, fp32, 8 at a time: the AND with an all-ones mask keeps kept
// positions' grad bit-exact whatever their weight (NaN/Inf included).
__attribute__((target("avx2"))) void decay_avx2(float* __restrict__ g, const float* __restrict__ x,
                                               const bool* __restrict__ keep, float l,
                                               int64_t begin, int64_t end) {
  const __m256 lv = _mm256_set1_ps(l);
  const __m256i zero = _mm256_setzero_si256();
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    int64_t k8;
    std::memcpy(&k8, keep + i, 8);
    const __m256i k = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(k8));
    const __m256 pruned = _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, zero));
    const __m256 add = _mm256_and_ps(_mm256_mul_ps(lv, _mm256_loadu_ps(x + i)), pruned);
    _mm256_storeu_ps(g + i, _mm256_add_ps(_mm256_loadu_ps(g + i), add));
  }
  for (; i < end; ++i) g[i] += keep[i] ? 0.0f : l * x[i];
}

// The SR-STE term of fp32 groups of 4 with the mask recomputed in registers: one pass that
// reads w and grad and writes grad, no mask in memory. Bit for bit mask4_avx2 then decay_avx2.
__attribute__((target("avx2"))) void decay4_nm_avx2(float* __restrict__ g, const float* __restrict__ w,
                                                   float l, int64_t begin, int64_t end, int64_t n) {
  const __m256 lv = _mm256_set1_ps(l);
  int64_t q = begin;
  for (; q + 2 <= end; q += 2) {  // two groups of 4 per iteration
    const __m256 v = _mm256_loadu_ps(w + q * 4);
    const __m256 kept = _mm256_castsi256_ps(keep4_avx2(v, n));
    const __m256 add = _mm256_andnot_ps(kept, _mm256_mul_ps(lv, v));
    _mm256_storeu_ps(g + q * 4, _mm256_add_ps(_mm256_loadu_ps(g + q * 4), add));
  }
  for (; q < end; ++q) {  // the last group, as mask_block then decay_avx2's tail
    bool keep[4];
    mask_block<float, 4>(w + q * 4, keep, nullptr, 0, 1, n, 4);
    for (int64_t i = 0; i < 4; ++i) g[q * 4 + i] += keep[i] ? 0.0f : l * w[q * 4 + i];
  }
}

#define NMFX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Keep bits of groups of 4 from "beats" bits, 4 bits per group (bit i: element i), for
// 16-bit masks of four groups. b1[i]: element (i+1)%4 beats element i; b2[i]: (i+2)%4 beats i.
// Every pair has exactly one winner (ties go to the lower index), so "(i+3)%4 beats i" is
// "i does not beat (i+3)%4": b3 = ~rotate(b1). rank = b1 + b2 + b3; keep = rank < n.
inline uint32_t keep4_from_beats(uint32_t b1, uint32_t b2, int64_t n) {
  const uint32_t b3 = ~(((b1 << 1) & 0xEEEEu) | ((b1 >> 3) & 0x1111u)) & 0xFFFFu;
  if (n == 1) return ~(b1 | b2 | b3) & 0xFFFFu;                         // rank 0
  if (n == 2) return ~((b1 & b2) | (b1 & b3) | (b2 & b3)) & 0xFFFFu;    // rank <= 1
  return ~(b1 & b2 & b3) & 0xFFFFu;                                     // n == 3: rank <= 2
}

// 16 floats of 4 groups of 4 (fp32, or bf16 widened): the keep bits. |v| as integer keys
// (order-preserving for non-negative floats; NaN clamped to +inf's key, so it ranks as +inf);
// "beats" of rotation k is key[(i+k)%4] > key[i], or >= where (i+k)%4 is the lower index
// (i >= 4-k): adding 1 to the rotated key there turns > into >= (keys <= 0x7f800000: no
// overflow). Two compares per 16 elements; the third rotation and the ranks are bit logic.
NMFX_AVX512 inline __mmask16 keep4_avx512(__m512 v, int64_t n) {
  const __m512i key = _mm512_min_epu32(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)),
                                       _mm512_set1_epi32(0x7f800000));
  const __m512i low1 = _mm512_setr_epi32(0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1);
  const __m512i low2 = _mm512_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1);
  const __m512i r1 = _mm512_add_epi32(_mm512_shuffle_epi32(key, _MM_PERM_ADCB), low1);
  const __m512i r2 = _mm512_add_epi32(_mm512_shuffle_epi32(key, _MM_PERM_BADC), low2);
  const uint32_t b1 = _mm512_cmpgt_epu32_mask(r1, key);
  const uint32_t b2 = _mm512_cmpgt_epu32_mask(r2, key);
  return static_cast<__mmask16>(keep4_from_beats(b1, b2, n));
}

// Groups of 4 with AVX-512, four groups per iteration: fp32, or bf16 widened to fp32 (exact),
// the masked weight written in its own dtype. Same ranks and outputs as mask_block.
template <typename T>
NMFX_AVX512 void mask4_avx512(const T* __restrict__ w, bool* __restrict__ out, T* __restrict__ mw,
                              int64_t begin, int64_t end, int64_t n) {
  const __m128i ones = _mm_set1_epi8(1);
  int64_t g = begin;
  for (; g + 4 <= end; g += 4) {
    __mmask16 keep;
    if constexpr (std::is_same_v<T, float>) {
      const __m512 v = _mm512_loadu_ps(w + g * 4);
      keep = keep4_avx512(v, n);
      if (mw != nullptr) _mm512_storeu_ps(mw + g * 4, _mm512_maskz_mov_ps(keep, v));
    } else {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 4));
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      keep = keep4_avx512(v, n);
      if (mw != nullptr) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(mw + g * 4), _mm256_maskz_mov_epi16(keep, raw));
      }
    }
    if (out != nullptr) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + g * 4), _mm_maskz_mov_epi8(keep, ones));
    }
  }
  if (g < end) mask_block<T, 4>(w, out, mw, g, end, n, 4);
}

// decay_avx2 16 at a time: the product only where pruned (zero elsewhere), then the add, so
// every bit equals decay_avx2's and decay_block's.
NMFX_AVX512 void decay_avx512(float* __restrict__ g, const float* __restrict__ x,
                              const bool* __restrict__ keep, float l, int64_t begin,
                              int64_t end) {
  const __m512 lv = _mm512_set1_ps(l);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + i));
    const __mmask16 pruned = _mm_testn_epi8_mask(k, k);
    const __m512 add = _mm512_maskz_mul_ps(pruned, lv, _mm512_loadu_ps(x + i));
    _mm512_storeu_ps(g + i, _mm512_add_ps(_mm512_loadu_ps(g + i), add));
  }
  for (; i < end; ++i) g[i] += keep[i] ? 0.0f : l * x[i];
}

// decay4_nm_avx2 16 at a time (four groups): bit for bit mask4_avx512 then decay_avx512.
NMFX_AVX512 void decay4_nm_avx512(float* __restrict__ g, const float* __restrict__ w, float l,
                                  int64_t begin, int64_t end, int64_t n) {
  const __m512 lv = _mm512_set1_ps(l);
  int64_t q = begin;
  for (; q + 4 <= end; q += 4) {
    const __m512 v = _mm512_loadu_ps(w + q * 4);
    const __mmask16 pruned = static_cast<__mmask16>(~keep4_avx512(v, n));
    const __m512 add = _mm512_maskz_mul_ps(pruned, lv, v);
    _mm512_storeu_ps(g + q * 4, _mm512_add_ps(_mm512_loadu_ps(g + q * 4), add));
  }
  if (q < end) decay4_nm_avx2(g, w, l, q, end, n);  // AVX-512F implies AVX2
}

// The packed N:M form of one row of fp32 groups of 4 (nmfx/packed.py's layout: the kept
// values in order, then one mask bit per element, bit j of byte b = element 8b+j), with the
// masked row too: one pass for the SR-STE forward that runs the sparse GEMM. 16 columns per
// iteration; returns how many columns it did (a multiple of 16), the caller does the rest.
// Every group keeps exactly n, so 16 columns give 4n values.
NMFX_AVX512 int64_t pack4_avx512(const float* __restrict__ w, float* __restrict__ mw,
                                 float* __restrict__ v, uint8_t* __restrict__ bits, int64_t cols,
                                 int64_t n) {
  const int64_t kept = 4 * n;
  const __mmask16 first = static_cast<__mmask16>((1u << kept) - 1u);
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16, v += kept) {
    const __m512 x = _mm512_loadu_ps(w + c);
    const __mmask16 k = keep4_avx512(x, n);
    _mm512_storeu_ps(mw + c, _mm512_maskz_mov_ps(k, x));
    // compress in a register, then a masked store (a compressing store to memory is slow on
    // some cores)
    _mm512_mask_storeu_ps(v, first, _mm512_maskz_compress_ps(k, x));
    const uint16_t k16 = static_cast<uint16_t>(k);
    std::memcpy(bits + c / 8, &k16, 2);
  }
  return c;
}

#undef NMFX_AVX512

// For each 8-bit keep pattern, the lanes to gather so the kept ones come first (AVX2 has no
// compress instruction).
struct LeftPackTable {
  alignas(32) int32_t lanes[256][8];
  LeftPackTable() {
    for (int k = 0; k < 256; ++k) {
      int at = 0;
      for (int i = 0; i < 8; ++i) {
        if (k & (1 << i)) lanes[k][at++] = i;
      }
      for (; at < 8; ++at) lanes[k][at] = 0;
    }
  }
};
const LeftPackTable kLeftPack;

// pack4_avx512 with AVX2, 8 columns (two groups, 2n values, one mask byte) per iteration.
__attribute__((target("avx2"))) int64_t pack4_avx2(const float* __restrict__ w,
                                                  float* __restrict__ mw, float* __restrict__ v,
                                                  uint8_t* __restrict__ bits, int64_t cols,
                                                  int64_t n) {
  const int64_t kept = 2 * n;
  const __m256i first = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(kept)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8, v += kept) {
    const __m256 x = _mm256_loadu_ps(w + c);
    const __m256 keep = _mm256_castsi256_ps(keep4_avx2(x, n));
    _mm256_storeu_ps(mw + c, _mm256_and_ps(x, keep));
    const int k = _mm256_movemask_ps(keep);
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.lanes[k]));
    _mm256_maskstore_ps(v, first, _mm256_permutevar8x32_ps(x, lanes));
    bits[c / 8] = static_cast<uint8_t>(k);
  }
  return c;
}


bool cpu_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes && nmfx::isa_cap() >= 2;
}

bool cpu_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes && nmfx::isa_cap() >= 3;
}
#else
bool cpu_avx2() { return false; }
bool cpu_avx512() { return false; }
#endif

// ISA codes as nm_gemm's (nmfx/kernels/_build.py ISA_CODES); 0 = the best this CPU has.
constexpr int64_t kIsaPortable = 1;
constexpr int64_t kIsaAvx2 = 2;
constexpr int64_t kIsaAvx512 = 3;
std::atomic<int64_t> g_mask_isa{0};  // set_mask_isa: tests run every ISA the host has

int64_t mask_isa() {
  const int64_t forced = g_mask_isa.load(std::memory_order_relaxed);
  if (forced != 0) return forced;
  return cpu_avx512() ? kIsaAvx512 : cpu_avx2() ? kIsaAvx2 : kIsaPortable;
}

// Forces the mask/decay kernels' ISA (0: back to automatic) and returns the previous setting.
int64_t set_mask_isa(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= kIsaAvx512, "set_mask_isa: ISA code ", isa,
              " is not 0 (auto), 1 (portable), 2 (avx2) or 3 (avx512)");
  TORCH_CHECK(isa != kIsaAvx2 || cpu_avx2(), "set_mask_isa: this CPU lacks AVX2");
  TORCH_CHECK(isa != kIsaAvx512 || cpu_avx512(), "set_mask_isa: this CPU lacks AVX-512 F/BW/VL/DQ");
  return g_mask_isa.exchange(isa);
}

// Groups [begin, end) on the calling thread, with the kernel of ``isa`` where it has one.
template <typename T, int M>
void mask_range(int64_t isa, const T* w, bool* out, T* masked, int64_t begin, int64_t end,
                int64_t n, int64_t m) {
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (M == 4 && (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>)) {
    if (isa == kIsaAvx512) return mask4_avx512<T>(w, out, masked, begin, end, n);
  }
  if constexpr (std::is_same_v<T, float> && M == 4) {
    if (isa >= kIsaAvx2) return mask4_avx2(w, out, masked, begin, end, n);
  }
#endif
  mask_block<T, M>(w, out, masked, begin, end, n, m);
}

template <typename T, int M>
void mask_groups_m(const T* w, bool* out, T* masked, int64_t groups, int64_t n, int64_t m) {
  const int64_t isa = mask_isa();
  nmfx::parallel_ranges(groups, kGroupChunk, [=](int64_t begin, int64_t end) {
    mask_range<T, M>(isa, w, out, masked, begin, end, n, m);
  });
}

// Writes the mask where ``out`` is not null, and the masked weight where ``masked`` is not null.
template <typename T>
void mask_groups(const T* w, bool* out, T* masked, int64_t groups, int64_t n, int64_t m) {
  switch (m) {
    case 4: return mask_groups_m<T, 4>(w, out, masked, groups, n, m);
    case 8: return mask_groups_m<T, 8>(w, out, masked, groups, n, m);
    case 16: return mask_groups_m<T, 16>(w, out, masked, groups, n, m);
    default: return mask_groups_m<T, 0>(w, out, masked, groups, n, m);
  }
}

// grad += lam * (1 - keep) * w over [begin, end): a select, so kept NaN/Inf weights add 0.
template <typename T>
void decay_block(T* __restrict__ g, const T* __restrict__ x, const bool* __restrict__ keep,
                 float l, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float add = keep_or_zero(l * static_cast<float>(x[i]), !keep[i]);
    g[i] = static_cast<T>(static_cast<float>(g[i]) + add);
  }
}

// decay over [begin, end) on the calling thread, with the kernel of ``isa`` where it has one.
template <typename T>
void decay_range(int64_t isa, T* g, const T* x, const bool* keep, float l, int64_t begin,
                 int64_t end) {
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (std::is_same_v<T, float>) {
    if (isa == kIsaAvx512) return decay_avx512(g, x, keep, l, begin, end);
    if (isa == kIsaAvx2) return decay_avx2(g, x, keep, l, begin, end);
  }
#endif
  decay_block<T>(g, x, keep, l, begin, end);
}

// Groups of m along the middle dim of a contiguous [outer, K, inner] tensor, inner > 1: a
// conv weight [out, in, *k] grouped along its input channels (inner = prod(k)), or a
// [in, out] weight used as x @ W (outer = 1). Blocks [begin, end) index (outer, group); the
// m rows of a block are compared 16 inner positions at a time, so the compiler vectorises
// across positions (same ranks as mask_block: larger wins, ties to the lower index, NaN as
// +inf). Writes the mask (``out``), the masked weight (``mw``) and/or the SR-STE term into
// ``g`` (as decay_block), each where not null. Instantiated per ISA below; no FMA contraction
// can change a bit (ISO C++ build: -ffp-contract=off; the term is masked between mul and add).
template <typename T, int M>
inline __attribute__((always_inline)) void strided_body(
    const T* __restrict__ w, bool* __restrict__ out, T* __restrict__ mw, T* __restrict__ g,
    float l, int64_t K, int64_t inner, int64_t n, int64_t m_rt, int64_t begin, int64_t end) {
  constexpr int64_t kTile = 16;
  const int64_t m = M > 0 ? M : m_rt;
  const int32_t n32 = static_cast<int32_t>(n);
  const int64_t per_row = K / m;
  const float inf = std::numeric_limits<float>::infinity();
  float mag[kMaxM][kTile];
  int32_t rank[kMaxM][kTile];
  for (int64_t b = begin; b < end; ++b) {
    const int64_t base = (b / per_row) * K * inner + (b % per_row) * m * inner;
    for (int64_t j0 = 0; j0 < inner; j0 += kTile) {
      const int64_t jn = std::min(kTile, inner - j0);
      for (int64_t t = 0; t < m; ++t) {
        const T* src = w + base + t * inner + j0;
        if (jn == kTile) {
          for (int64_t jj = 0; jj < kTile; ++jj) mag[t][jj] = std::fabs(static_cast<float>(src[jj]));
        } else {
          for (int64_t jj = 0; jj < kTile; ++jj) mag[t][jj] = 0.0f;
          for (int64_t jj = 0; jj < jn; ++jj) mag[t][jj] = std::fabs(static_cast<float>(src[jj]));
        }
        for (int64_t jj = 0; jj < kTile; ++jj) {
          mag[t][jj] = mag[t][jj] != mag[t][jj] ? inf : mag[t][jj];  // NaN ranks as +inf
          rank[t][jj] = 0;
        }
      }
      for (int64_t t = 0; t < m; ++t) {  // only rank[t] written: the jj loops vectorise
        for (int64_t u = 0; u < t; ++u) {  // u has the lower index: it wins ties
          for (int64_t jj = 0; jj < kTile; ++jj) rank[t][jj] += mag[u][jj] >= mag[t][jj];
        }
        for (int64_t u = t + 1; u < m; ++u) {
          for (int64_t jj = 0; jj < kTile; ++jj) rank[t][jj] += mag[u][jj] > mag[t][jj];
        }
      }
      for (int64_t t = 0; t < m; ++t) {
        const int64_t at = base + t * inner + j0;
        if (mw != nullptr) {
          for (int64_t jj = 0; jj < jn; ++jj) mw[at + jj] = keep_or_zero(w[at + jj], rank[t][jj] < n32);
        }
        if (out != nullptr) {
          for (int64_t jj = 0; jj < jn; ++jj) out[at + jj] = rank[t][jj] < n32;
        }
        if (g != nullptr) {
          for (int64_t jj = 0; jj < jn; ++jj) {
            const float add = keep_or_zero(l * static_cast<float>(w[at + jj]), rank[t][jj] >= n32);
            g[at + jj] = static_cast<T>(static_cast<float>(g[at + jj]) + add);
          }
        }
      }
    }
  }
}

template <typename T, int M>
void strided_portable(const T* w, bool* out, T* mw, T* g, float l, int64_t K, int64_t inner,
                      int64_t n, int64_t m, int64_t begin, int64_t end) {
  strided_body<T, M>(w, out, mw, g, l, K, inner, n, m, begin, end);
}

#if defined(__x86_64__) || defined(_M_X64)
template <typename T, int M>
__attribute__((target("avx2"))) void strided_avx2(const T* w, bool* out, T* mw, T* g, float l,
                                                  int64_t K, int64_t inner, int64_t n, int64_t m,
                                                  int64_t begin, int64_t end) {
  strided_body<T, M>(w, out, mw, g, l, K, inner, n, m, begin, end);
}

template <typename T, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void strided_avx512(
    const T* w, bool* out, T* mw, T* g, float l, int64_t K, int64_t inner, int64_t n, int64_t m,
    int64_t begin, int64_t end) {
  strided_body<T, M>(w, out, mw, g, l, K, inner, n, m, begin, end);
}
#endif

template <typename T, int M>
void strided_m(const T* w, bool* out, T* mw, T* g, float l, int64_t outer, int64_t K,
               int64_t inner, int64_t n, int64_t m) {
  const int64_t isa = mask_isa();
  const int64_t blocks = outer * (K / m);
  // work items of about kGroupChunk * 4 elements
  const int64_t chunk = std::max<int64_t>(1, kGroupChunk * 4 / (m * inner));
  nmfx::parallel_ranges(blocks, chunk, [=](int64_t begin, int64_t end) {
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == kIsaAvx512) return strided_avx512<T, M>(w, out, mw, g, l, K, inner, n, m, begin, end);
    if (isa == kIsaAvx2) return strided_avx2<T, M>(w, out, mw, g, l, K, inner, n, m, begin, end);
#endif
    strided_portable<T, M>(w, out, mw, g, l, K, inner, n, m, begin, end);
  });
}

template <typename T>
void strided(const T* w, bool* out, T* mw, T* g, float l, int64_t outer, int64_t K, int64_t inner,
             int64_t n, int64_t m) {
  switch (m) {
    case 4: return strided_m<T, 4>(w, out, mw, g, l, outer, K, inner, n, m);
    case 8: return strided_m<T, 8>(w, out, mw, g, l, outer, K, inner, n, m);
    case 16: return strided_m<T, 16>(w, out, mw, g, l, outer, K, inner, n, m);
    default: return strided_m<T, 0>(w, out, mw, g, l, outer, K, inner, n, m);
  }
}

// [outer, K, inner] of a contiguous tensor grouped along ``dim`` (K = its size).
std::tuple<int64_t, int64_t, int64_t> split_at(const at::Tensor& w, int64_t dim) {
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= w.size(d);
  for (int64_t d = dim + 1; d < w.dim(); ++d) inner *= w.size(d);
  return {outer, w.size(dim), inner};
}

void check_args(const at::Tensor& w, int64_t n, int64_t m) {
  TORCH_CHECK(w.device().is_cpu(), "nm_mask: weight must be on CPU, got ", w.device());
  TORCH_CHECK(m >= 2 && m <= kMaxM, "nm_mask: M=", m, " must be in [2, ", kMaxM, "]");
  TORCH_CHECK(n > 0 && n < m, "nm_mask: need 0 < N < M, got ", n, ":", m);
  TORCH_CHECK(w.dim() >= 1 && w.size(-1) % m == 0, "nm_mask: last dim ", w.size(-1),
              " is not a multiple of M=", m);
}

at::Tensor nm_mask(const at::Tensor& w, int64_t n, int64_t m) {
  check_args(w, n, m);
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty(wc.sizes(), wc.options().dtype(at::kBool));
  const int64_t groups = wc.numel() / m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wc.scalar_type(), "nm_mask", [&] {
    mask_groups<scalar_t>(wc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<bool>(), nullptr,
                          groups, n, m);
  });
  return out;
}

// (mask, where(mask, w, 0)) in one pass.
std::tuple<at::Tensor, at::Tensor> nm_mask_apply(const at::Tensor& w, int64_t n, int64_t m) {
  check_args(w, n, m);
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty(wc.sizes(), wc.options().dtype(at::kBool));
  at::Tensor masked = at::empty_like(wc);
  const int64_t groups = wc.numel() / m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wc.scalar_type(), "nm_mask_apply", [&] {
    mask_groups<scalar_t>(wc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<bool>(),
                          masked.mutable_data_ptr<scalar_t>(), groups, n, m);
  });
  return {out, masked};
}

// grad += lam * (1 - mask) * w, in place, one pass (the SR-STE term).
void srste_decay_(at::Tensor grad, const at::Tensor& w, const at::Tensor& mask, double lam) {
  TORCH_CHECK(grad.is_contiguous() && w.is_contiguous() && mask.is_contiguous(),
              "srste_decay_: grad, weight and mask must be contiguous");
  TORCH_CHECK(grad.sizes() == w.sizes() && mask.sizes() == w.sizes(), "srste_decay_: shape mismatch");
  TORCH_CHECK(grad.scalar_type() == w.scalar_type() && mask.scalar_type() == at::kBool,
              "srste_decay_: dtypes");
  const int64_t numel = w.numel();
  const float l = static_cast<float>(lam);
  const int64_t isa = mask_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "srste_decay_", [&] {
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* x = w.const_data_ptr<scalar_t>();
    const bool* keep = mask.const_data_ptr<bool>();
    nmfx::parallel_ranges(numel, kDecayChunk, [=](int64_t begin, int64_t end) {
      decay_range<scalar_t>(isa, g, x, keep, l, begin, end);
    });
  });
}

// The term over groups [begin, end) in one register pass where a kernel exists (fp32 groups
// of 4, AVX2 or AVX-512); false otherwise (the caller masks into a buffer, then decays).
template <typename T>
bool fused_term(int64_t isa, T* g, const T* w, float l, int64_t begin, int64_t end, int64_t n,
                int64_t m) {
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (std::is_same_v<T, float>) {
    if (m != 4) return false;
    if (isa == kIsaAvx512) return decay4_nm_avx512(g, w, l, begin, end, n), true;
    if (isa == kIsaAvx2) return decay4_nm_avx2(g, w, l, begin, end, n), true;
  }
#endif
  return false;
}

// The checks of the ops that take a weight grouped along ``dim``; returns dim in [0, ndim).
int64_t check_dim_args(const char* op, const at::Tensor& w, int64_t n, int64_t m, int64_t dim,
                       const at::Tensor& other, const char* other_name) {
  TORCH_CHECK(w.device().is_cpu(), op, ": weight must be on CPU, got ", w.device());
  TORCH_CHECK(m >= 2 && m <= kMaxM, op, ": M=", m, " must be in [2, ", kMaxM, "]");
  TORCH_CHECK(n > 0 && n < m, op, ": need 0 < N < M, got ", n, ":", m);
  TORCH_CHECK(w.dim() >= 1 && dim >= -w.dim() && dim < w.dim(), op, ": dim ", dim,
              " is out of range for a weight of shape ", w.sizes());
  dim = dim < 0 ? dim + w.dim() : dim;
  TORCH_CHECK(w.size(dim) % m == 0, op, ": dim ", dim, " has size ", w.size(dim),
              ", not a multiple of M=", m);
  TORCH_CHECK(other.sizes() == w.sizes(), op, ": ", other_name, " ", other.sizes(), " and weight ",
              w.sizes(), " differ in shape");
  TORCH_CHECK(other.scalar_type() == w.scalar_type(), op, ": ", other_name, " is ",
              other.scalar_type(), " but the weight is ", w.scalar_type());
  TORCH_CHECK(other.is_contiguous() && w.is_contiguous(), op, ": ", other_name,
              " and weight must be contiguous");
  return dim;
}

// grad += lam * (1 - E) * w, E the N:M mask of ``w`` along ``dim``, recomputed on the fly:
// no mask tensor is read or written, so the SR-STE hook needs nothing from the forward (a
// compiled one caches none). Groups along the last dim: chunk by chunk, the mask into a
// buffer on the stack that stays in L1, then the decay kernel; otherwise the strided kernel.
// Bit for bit srste_decay_(grad, w, nm_mask(w along dim), lam) on every ISA.
void srste_decay_nm_(at::Tensor grad, const at::Tensor& w, int64_t n, int64_t m, int64_t dim,
                     double lam) {
  dim = check_dim_args("srste_decay_nm_", w, n, m, dim, grad, "grad");
  const auto [outer, K, inner] = split_at(w, dim);
  const float l = static_cast<float>(lam);
  const int64_t isa = mask_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "srste_decay_nm_", [&] {
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* x = w.const_data_ptr<scalar_t>();
    if (inner > 1) return strided<scalar_t>(x, nullptr, nullptr, g, l, outer, K, inner, n, m);
    nmfx::parallel_ranges(w.numel() / m, kTermChunk / m, [=](int64_t begin, int64_t end) {
      if (fused_term(isa, g, x, l, begin, end, n, m)) return;
      bool keep[kTermChunk];
      const int64_t off = begin * m;
      const int64_t len = (end - begin) * m;
      switch (m) {
        case 4: mask_range<scalar_t, 4>(isa, x + off, keep, nullptr, 0, end - begin, n, m); break;
        case 8: mask_range<scalar_t, 8>(isa, x + off, keep, nullptr, 0, end - begin, n, m); break;
        case 16: mask_range<scalar_t, 16>(isa, x + off, keep, nullptr, 0, end - begin, n, m); break;
        default: mask_range<scalar_t, 0>(isa, x + off, keep, nullptr, 0, end - begin, n, m);
      }
      decay_range<scalar_t>(isa, g + off, x + off, keep, l, 0, len);
    });
  });
}

// (mask, where(mask, w, 0)) of ``w`` grouped along ``dim``, written into ``mask`` (when given)
// and ``masked`` in w's own layout: the SR-STE forward into buffers the caller reuses across
// steps (fresh multi-MB outputs are page-faulted in again on every step), and a conv weight
// needs no transposed copy.
void nm_mask_apply_out(const at::Tensor& w, int64_t n, int64_t m, int64_t dim,
                       const std::optional<at::Tensor>& mask, at::Tensor masked) {
  dim = check_dim_args("nm_mask_apply_out", w, n, m, dim, masked, "masked");
  bool* keep = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->is_contiguous() && mask->sizes() == w.sizes() && mask->scalar_type() == at::kBool,
                "nm_mask_apply_out: mask must be a contiguous bool tensor shaped like the weight");
    keep = mask->mutable_data_ptr<bool>();
  }
  const auto [outer, K, inner] = split_at(w, dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "nm_mask_apply_out", [&] {
    const scalar_t* x = w.const_data_ptr<scalar_t>();
    scalar_t* mw = masked.mutable_data_ptr<scalar_t>();
    if (inner > 1) return strided<scalar_t>(x, keep, mw, nullptr, 0.0f, outer, K, inner, n, m);
    mask_groups<scalar_t>(x, keep, mw, w.numel() / m, n, m);
  });
}

// Columns per step of pack_rows' portable part: a multiple of every M and of 8 (mask bytes).
constexpr int64_t kPackChunk = 4096;

// Rows [r0, r1) of a contiguous [rows, cols] weight grouped along its last dim: the masked
// rows into ``mw``, the kept values into ``vals`` (cols / m * n per row) and the mask bits
// into ``bits`` ((cols + 7) / 8 bytes per row). The vector kernels take fp32 groups of 4; the
// rest of a row goes through mask_range (same ranks) and is packed from its keep bytes.
template <typename T, int M>
void pack_rows(int64_t isa, const T* w, T* mw, T* vals, uint8_t* bits, int64_t r0, int64_t r1,
               int64_t cols, int64_t n, int64_t m) {
  const int64_t vcols = cols / m * n, bcols = (cols + 7) / 8;
  bool keep[kPackChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = w + r * cols;
    T* mr = mw + r * cols;
    uint8_t* br = bits + r * bcols;
    int64_t c = 0;
#if defined(__x86_64__) || defined(_M_X64)
    if constexpr (std::is_same_v<T, float> && M == 4) {
      if (isa == kIsaAvx512) c = pack4_avx512(wr, mr, vals + r * vcols, br, cols, n);
      else if (isa == kIsaAvx2) c = pack4_avx2(wr, mr, vals + r * vcols, br, cols, n);
    }
#endif
    T* v = vals + r * vcols + c / m * n;  // c is a multiple of 8 and of m
    for (; c < cols; c += kPackChunk) {
      const int64_t len = std::min(kPackChunk, cols - c);
      mask_range<T, M>(isa, wr + c, keep, mr + c, 0, len / m, n, m);
      for (int64_t i = 0; i < len; ++i) {
        if (keep[i]) *v++ = wr[c + i];
      }
      for (int64_t b = 0; b * 8 < len; ++b) {
        uint8_t byte = 0;
        for (int64_t j = 0; j < 8 && b * 8 + j < len; ++j) {
          byte |= static_cast<uint8_t>(keep[b * 8 + j]) << j;
        }
        br[c / 8 + b] = byte;
      }
    }
  }
}

// The SR-STE forward's masked weight and the packed form of the same N:M weight (what the
// sparse GEMM nm_gemm reads), from one pass over a contiguous [rows, cols] ``w`` grouped along
// its last dim, into buffers the caller reuses: ``masked`` like ``w``, ``values`` with at least
// rows * cols / m * n elements, ``mask`` uint8 [rows, (cols + 7) / 8].
void nm_mask_pack_out(const at::Tensor& w, int64_t n, int64_t m, at::Tensor masked,
                      at::Tensor values, at::Tensor mask) {
  TORCH_CHECK(w.dim() == 2, "nm_mask_pack_out: the weight must be 2-D [rows, cols], got shape ",
              w.sizes());
  TORCH_CHECK(m == 4 || m == 8 || m == 16, "nm_mask_pack_out: M=", m,
              " is not a packed pattern's M (4, 8 or 16)");
  check_dim_args("nm_mask_pack_out", w, n, m, 1, masked, "masked");
  const int64_t rows = w.size(0), cols = w.size(1);
  TORCH_CHECK(values.scalar_type() == w.scalar_type() && values.is_contiguous() &&
                  values.numel() >= rows * (cols / m * n),
              "nm_mask_pack_out: values must be contiguous, of the weight's dtype, with at least ",
              rows * (cols / m * n), " elements; got ", values.scalar_type(), " ", values.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.dim() == 2 &&
                  mask.size(0) == rows && mask.size(1) == (cols + 7) / 8,
              "nm_mask_pack_out: mask must be contiguous uint8 [", rows, ", ", (cols + 7) / 8,
              "], got ", mask.scalar_type(), " ", mask.sizes());
  const int64_t isa = mask_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "nm_mask_pack_out", [&] {
    const scalar_t* x = w.const_data_ptr<scalar_t>();
    scalar_t* mw = masked.mutable_data_ptr<scalar_t>();
    scalar_t* vals = values.mutable_data_ptr<scalar_t>();
    uint8_t* bits = mask.mutable_data_ptr<uint8_t>();
    const int64_t row_chunk = std::max<int64_t>(1, 4 * kGroupChunk / cols);
    nmfx::parallel_ranges(rows, row_chunk, [=](int64_t r0, int64_t r1) {
      switch (m) {
        case 4: return pack_rows<scalar_t, 4>(isa, x, mw, vals, bits, r0, r1, cols, n, m);
        case 8: return pack_rows<scalar_t, 8>(isa, x, mw, vals, bits, r0, r1, cols, n, m);
        default: return pack_rows<scalar_t, 16>(isa, x, mw, vals, bits, r0, r1, cols, n, m);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nmfx_cpu, lib) {
  lib.def("nm_mask(Tensor w, int n, int m) -> Tensor");
  lib.def("nm_mask_apply(Tensor w, int n, int m) -> (Tensor, Tensor)");
  lib.def("srste_decay_(Tensor(a!) grad, Tensor w, Tensor mask, float lam) -> ()");
  lib.def("srste_decay_nm_(Tensor(a!) grad, Tensor w, int n, int m, int dim, float lam) -> ()");
  lib.def("nm_mask_apply_out(Tensor w, int n, int m, int dim, Tensor(a!)? mask, Tensor(b!) masked) -> ()");
  lib.def(
      "nm_mask_pack_out(Tensor w, int n, int m, Tensor(a!) masked, Tensor(b!) values, "
      "Tensor(c!) mask) -> ()");
  lib.def("set_mask_isa(int isa) -> int", &set_mask_isa);
}

TORCH_LIBRARY_IMPL(nmfx_cpu, CPU, lib) {
  lib.impl("nm_mask", &nm_mask);
  lib.impl("nm_mask_apply", &nm_mask_apply);
  lib.impl("srste_decay_", &srste_decay_);
  lib.impl("srste_decay_nm_", &srste_decay_nm_);
  lib.impl("nm_mask_apply_out", &nm_mask_apply_out);
  lib.impl("nm_mask_pack_out", &nm_mask_pack_out);
}
