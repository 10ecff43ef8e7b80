// N:M mask in one pass over the weight: for each group of m consecutive elements of the
// last dim, keep the n largest |w|. Same rules as nmfx/masks.py: NaN ranks as +inf, ties go
// to the lower index, every group keeps exactly n. Used by eager training on CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace {

constexpr int64_t kMaxM = 16;

template <typename T>
void mask_groups(const T* w, bool* out, int64_t groups, int64_t n, int64_t m) {
  at::parallel_for(0, groups, 2048, [&](int64_t begin, int64_t end) {
    float mag[kMaxM];
    for (int64_t g = begin; g < end; ++g) {
      const T* src = w + g * m;
      bool* dst = out + g * m;
      for (int64_t i = 0; i < m; ++i) {
        const float v = std::fabs(static_cast<float>(src[i]));
        mag[i] = std::isnan(v) ? std::numeric_limits<float>::infinity() : v;
      }
      for (int64_t i = 0; i < m; ++i) {
        int64_t rank = 0;  // how many group members beat element i
        for (int64_t j = 0; j < i; ++j) rank += mag[j] >= mag[i];
        for (int64_t j = i + 1; j < m; ++j) rank += mag[j] > mag[i];
        dst[i] = rank < n;
      }
    }
  });
}

at::Tensor nm_mask(const at::Tensor& w, int64_t n, int64_t m) {
  TORCH_CHECK(w.device().is_cpu(), "nm_mask: weight must be on CPU, got ", w.device());
  TORCH_CHECK(m >= 2 && m <= kMaxM, "nm_mask: M=", m, " must be in [2, ", kMaxM, "]");
  TORCH_CHECK(n > 0 && n < m, "nm_mask: need 0 < N < M, got ", n, ":", m);
  TORCH_CHECK(w.dim() >= 1 && w.size(-1) % m == 0, "nm_mask: last dim ", w.size(-1),
              " is not a multiple of M=", m);
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty(wc.sizes(), wc.options().dtype(at::kBool));
  const int64_t groups = wc.numel() / m;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wc.scalar_type(), "nm_mask", [&] {
    mask_groups<scalar_t>(wc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<bool>(), groups, n, m);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nmfx_cpu, lib) { lib.def("nm_mask(Tensor w, int n, int m) -> Tensor"); }

TORCH_LIBRARY_IMPL(nmfx_cpu, CPU, lib) { lib.impl("nm_mask", &nm_mask); }
