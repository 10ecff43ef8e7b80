// Torch entry points for the N:M kernels: argument checks, x/y staging, ISA selection and
// threading. Registered as the internal op library `nmfx_cpu`; the public op `nmfx::nm_linear`
// (Python, nmfx/kernels/_ops.py) calls into it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "nm_kernels.h"

namespace nmfx {

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
         __builtin_cpu_supports("avx512dq");
}

namespace {

constexpr int64_t kIsaAuto = 0;
constexpr int64_t kIsaPortable = 1;
constexpr int64_t kIsaAvx2 = 2;
constexpr int64_t kIsaAvx512 = 3;
// Widest SIMD load (elements) a kernel may issue at a row's last kept value.
constexpr int64_t kValuePad = 16;

int64_t isa_support() {
  int64_t bits = 1 << kIsaPortable;
  if (cpu_has_avx2()) bits |= 1 << kIsaAvx2;
  if (cpu_has_avx512()) bits |= 1 << kIsaAvx512;
  return bits;
}

using KernelFn = void (*)(const NMProblem&, int64_t, int64_t);

KernelFn select_kernel(int64_t isa) {
  const int64_t support = isa_support();
  if (isa == kIsaAuto) {
    isa = (support & (1 << kIsaAvx512)) ? kIsaAvx512
          : (support & (1 << kIsaAvx2)) ? kIsaAvx2
                                          : kIsaPortable;
  }
  TORCH_CHECK(isa >= kIsaPortable && isa <= kIsaAvx512, "nmfx: unknown ISA code ", isa);
  TORCH_CHECK(support & (1 << isa), "nmfx: ISA code ", isa,
              " is not supported by this CPU (supported bitmask ", support, ")");
  switch (isa) {
    case kIsaAvx512:
      return nm_gemm_avx512;
    case kIsaAvx2:
      return nm_gemm_avx2;
    default:
      return nm_gemm_portable;
  }
}

ValueType value_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ValueType::kFloat32;
    case at::kBFloat16:
      return ValueType::kBFloat16;
    case at::kHalf:
      return ValueType::kFloat16;
    default:
      TORCH_CHECK(false, "nmfx: packed values must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

at::Tensor nm_gemm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                   const std::optional<at::Tensor>& bias, int64_t rows, int64_t cols, int64_t n,
                   int64_t m, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols, "nmfx: x must be [B, ", cols, "], got ",
              x.sizes());
  TORCH_CHECK(m > 0 && n > 0 && n < m && cols % m == 0, "nmfx: bad pattern ", n, ":", m,
              " for cols=", cols);
  const int64_t kept = cols / m * n;
  const int64_t KB = (cols + 7) / 8;
  TORCH_CHECK(values.is_contiguous() && values.dim() == 2 && values.size(0) == rows &&
                  values.size(1) == kept,
              "nmfx: values must be contiguous [", rows, ", ", kept, "], got ", values.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.dim() == 2 &&
                  mask.size(0) == rows && mask.size(1) == KB,
              "nmfx: mask must be contiguous uint8 [", rows, ", ", KB, "]");
  const ValueType vtype = value_type(values);
  const int64_t B = x.size(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);

  const int64_t ldx = std::max<int64_t>(16, (cols + 15) / 16 * 16);
  at::Tensor xbuf = at::empty({B, ldx}, f32);
  xbuf.narrow(1, 0, cols).copy_(x);
  if (ldx > cols) xbuf.narrow(1, cols, ldx - cols).zero_();

  at::Tensor y;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == rows, "nmfx: bias must have ", rows, " elements, got ",
                bias->numel());
    y = bias->to(at::kFloat).reshape({1, rows}).expand({B, rows}).contiguous();
  } else {
    y = at::zeros({B, rows}, f32);
  }
  if (B == 0 || rows == 0) return y.to(x.scalar_type());

  // Rows whose SIMD loads could run past the end of `values` read from a padded copy.
  const int64_t safe_rows =
      kept > 0 ? std::max<int64_t>(0, rows - (kValuePad + kept - 1) / kept) : rows;
  at::Tensor tail = at::zeros({(rows - safe_rows) * kept + kValuePad}, values.options());
  if (rows > safe_rows) {
    tail.narrow(0, 0, (rows - safe_rows) * kept)
        .copy_(values.narrow(0, safe_rows, rows - safe_rows).reshape({-1}));
  }

  NMProblem p{};
  p.x = xbuf.data_ptr<float>();
  p.B = B;
  p.ldx = ldx;
  p.values = values.data_ptr();
  p.kept = kept;
  p.mask = mask.data_ptr<uint8_t>();
  p.KB = KB;
  p.R = rows;
  p.vtype = vtype;
  p.safe_rows = safe_rows;
  p.tail_values = tail.data_ptr();
  p.y = y.data_ptr<float>();

  const KernelFn fn = select_kernel(isa);
  // Work in units of 8 weight rows so thread boundaries keep the kernels' row groups whole;
  // small problems stay on one thread (a fork costs more than it saves below ~64k MACs).
  const int64_t groups = (rows + 7) / 8;
  const int64_t macs_per_group = 8 * std::max<int64_t>(cols, 1) * B;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / macs_per_group);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    fn(p, g0 * 8, std::min(g1 * 8, rows));
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace nmfx

TORCH_LIBRARY(nmfx_cpu, lib) {
  lib.def(
      "nm_gemm(Tensor x, Tensor values, Tensor mask, Tensor? bias, int rows, int cols, int n, "
      "int m, int isa) -> Tensor",
      &nmfx::nm_gemm);
  lib.def("isa_support() -> int", &nmfx::isa_support);
}
