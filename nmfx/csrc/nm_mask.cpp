// N:M mask in one pass over the weight: for each group of m consecutive elements of the
// last dim, keep the n largest |w|. Same rules as nmfx/masks.py: NaN ranks as +inf, ties go
// to the lower index, every group keeps exactly n. Used by eager training on CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <tuple>

namespace {

constexpr int64_t kMaxM = 16;

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
  for (int64_t g = begin; g < end; ++g) {
    const T* src = w + g * m;
    bool* dst = out + g * m;
    for (int64_t i = 0; i < m; ++i) {
      const float v = std::fabs(static_cast<float>(src[i]));
      mag[i] = v != v ? std::numeric_limits<float>::infinity() : v;  // NaN ranks as +inf
    }
    for (int64_t i = 0; i < m; ++i) {
      int64_t rank = 0;
      for (int64_t j = 0; j < i; ++j) rank += mag[j] >= mag[i];
      for (int64_t j = i + 1; j < m; ++j) rank += mag[j] > mag[i];
      dst[i] = rank < n;
    }
    if (mw != nullptr) {
      T* dst_w = mw + g * m;
      for (int64_t i = 0; i < m; ++i) dst_w[i] = keep_or_zero(src[i], dst[i]);
    }
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// fp32 groups of 4 with AVX2: one group per 128-bit lane, ranks from three in-lane rotations
// (element (i+k)%4 sits at position i of rotation k; it has the lower index iff i >= 4-k).
// Same rules as mask_block: larger wins, ties go to the lower index, NaN ranks as +inf.
__attribute__((target("avx2"))) void mask4_avx2(const float* __restrict__ w, bool* __restrict__ out,
                                               float* __restrict__ mw, int64_t begin, int64_t end,
                                               int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  // lower-index masks per rotation k (1, 2, 3), for positions 0..3 of each lane
  const __m256 low1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, -1, 0, 0, 0, -1));
  const __m256 low2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
  const __m256 low3 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, -1, -1, 0, -1, -1, -1));
  const __m256i nvec = _mm256_set1_epi32(static_cast<int>(n));
  int64_t g = begin;
  for (; g + 2 <= end; g += 2) {  // two groups of 4 per iteration
    const __m256 v = _mm256_loadu_ps(w + g * 4);
    __m256 a = _mm256_andnot_ps(sign, v);
    a = _mm256_blendv_ps(a, inf, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    __m256i rank = _mm256_setzero_si256();
    const __m256 r1 = _mm256_permute_ps(a, _MM_SHUFFLE(0, 3, 2, 1));
    const __m256 r2 = _mm256_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2));
    const __m256 r3 = _mm256_permute_ps(a, _MM_SHUFFLE(2, 1, 0, 3));
    const __m256 b1 = _mm256_or_ps(_mm256_cmp_ps(r1, a, _CMP_GT_OQ), _mm256_and_ps(low1, _mm256_cmp_ps(r1, a, _CMP_EQ_OQ)));
    const __m256 b2 = _mm256_or_ps(_mm256_cmp_ps(r2, a, _CMP_GT_OQ), _mm256_and_ps(low2, _mm256_cmp_ps(r2, a, _CMP_EQ_OQ)));
    const __m256 b3 = _mm256_or_ps(_mm256_cmp_ps(r3, a, _CMP_GT_OQ), _mm256_and_ps(low3, _mm256_cmp_ps(r3, a, _CMP_EQ_OQ)));
    rank = _mm256_sub_epi32(rank, _mm256_castps_si256(b1));  // all-ones == -1
    rank = _mm256_sub_epi32(rank, _mm256_castps_si256(b2));
    rank = _mm256_sub_epi32(rank, _mm256_castps_si256(b3));
    const __m256i keep = _mm256_cmpgt_epi32(nvec, rank);  // rank < n
    if (mw != nullptr) _mm256_storeu_ps(mw + g * 4, _mm256_and_ps(v, _mm256_castsi256_ps(keep)));
    const int bits = _mm256_movemask_ps(_mm256_castsi256_ps(keep));
    for (int i = 0; i < 8; ++i) out[g * 4 + i] = (bits >> i) & 1;
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

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

template <typename T, int M>
void mask_groups_m(const T* w, bool* out, T* masked, int64_t groups, int64_t n, int64_t m) {
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (std::is_same_v<T, float> && M == 4) {
    if (has_avx2()) {
      at::parallel_for(0, groups, 4096, [=](int64_t begin, int64_t end) {
        mask4_avx2(w, out, masked, begin, end, n);
      });
      return;
    }
  }
#endif
  at::parallel_for(0, groups, 4096, [=](int64_t begin, int64_t end) {
    mask_block<T, M>(w, out, masked, begin, end, n, m);
  });
}

// Writes the mask, and the masked weight where ``masked`` is not null.
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "srste_decay_", [&] {
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const scalar_t* x = w.const_data_ptr<scalar_t>();
    const bool* keep = mask.const_data_ptr<bool>();
    at::parallel_for(0, numel, 16384, [=](int64_t begin, int64_t end) {
#if defined(__x86_64__) || defined(_M_X64)
      if constexpr (std::is_same_v<scalar_t, float>) {
        // casts only satisfy the compiler for the other dtypes: this branch runs for float
        if (has_avx2()) {
          return decay_avx2(reinterpret_cast<float*>(g), reinterpret_cast<const float*>(x), keep,
                            l, begin, end);
        }
      }
#endif
      decay_block<scalar_t>(g, x, keep, l, begin, end);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nmfx_cpu, lib) {
  lib.def("nm_mask(Tensor w, int n, int m) -> Tensor");
  lib.def("nm_mask_apply(Tensor w, int n, int m) -> (Tensor, Tensor)");
  lib.def("srste_decay_(Tensor(a!) grad, Tensor w, Tensor mask, float lam) -> ()");
}

TORCH_LIBRARY_IMPL(nmfx_cpu, CPU, lib) {
  lib.impl("nm_mask", &nm_mask);
  lib.impl("nm_mask_apply", &nm_mask_apply);
  lib.impl("srste_decay_", &srste_decay_);
}
