// Argument checks and value padding shared by the op entry points (nm_ops.cpp, nm_dense.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

#include "nm_kernels.h"

namespace nmfx {

// Widest SIMD load (elements) a kernel may issue at a row's last kept value.
constexpr int64_t kValuePad = 16;

inline ValueType value_type(const at::Tensor& t) {
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

// Shapes of a packed weight, checked: after this, a kernel may address values[rows, kept] and
// mask[rows, KB] (the mask's bits themselves are not trusted: see the kernels' bounds).
struct PackedShape {
  int64_t kept;  // kept values per row
  int64_t KB;    // mask bytes per row
  ValueType vtype;
};

inline PackedShape check_packed(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& mask, const std::optional<at::Tensor>& bias,
                                int64_t rows, int64_t cols, int64_t n, int64_t m) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols, "nmfx: x must be [B, ", cols, "], got ",
              x.sizes());
  TORCH_CHECK(rows >= 0 && m > 0 && n > 0 && n < m && cols % m == 0, "nmfx: bad pattern ", n,
              ":", m, " for cols=", cols);
  const int64_t kept = cols / m * n;
  const int64_t KB = (cols + 7) / 8;
  TORCH_CHECK(values.is_contiguous() && values.dim() == 2 && values.size(0) == rows &&
                  values.size(1) == kept,
              "nmfx: values must be contiguous [", rows, ", ", kept, "], got ", values.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.dim() == 2 &&
                  mask.size(0) == rows && mask.size(1) == KB,
              "nmfx: mask must be contiguous uint8 [", rows, ", ", KB, "]");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "nmfx: x is ", x.scalar_type(),
              " but the packed values are ", values.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == rows, "nmfx: bias must have ", rows, " elements, got ",
                bias->numel());
  }
  return {kept, KB, value_type(values)};
}

// SIMD loads may read up to kValuePad elements past a row's last kept value. Values packed by
// nmfx.packed sit in storage with that much slack; otherwise rows >= safe_rows read from `tail`,
// a copy of the last rows followed by kValuePad zeros (see NMProblem::safe_rows).
struct ValueTail {
  int64_t safe_rows;
  at::Tensor tail;  // undefined when every row is safe
};

inline ValueTail value_tail(const at::Tensor& values, int64_t rows, int64_t kept) {
  const int64_t slack = static_cast<int64_t>(values.storage().nbytes()) / values.element_size() -
                        values.storage_offset() - rows * kept;
  ValueTail out{rows, at::Tensor()};
  if (slack < kValuePad && rows > 0) {
    out.safe_rows = kept > 0 ? std::max<int64_t>(0, rows - (kValuePad + kept - 1) / kept) : rows;
    // One allocation and plain copies: zeros + narrow + copy_ through ATen had cost ~5 us per
    // call, and a lowered layer (values cloned to their exact size) pays this on every call.
    const int64_t n = (rows - out.safe_rows) * kept;
    const size_t es = values.element_size();
    out.tail = at::empty({n + kValuePad}, values.options());
    char* dst = static_cast<char*>(out.tail.data_ptr());
    if (n > 0) {
      std::memcpy(dst, static_cast<const char*>(values.const_data_ptr()) + out.safe_rows * kept * es,
                  static_cast<size_t>(n) * es);
    }
    std::memset(dst + static_cast<size_t>(n) * es, 0, kValuePad * es);
  }
  return out;
}

// The weight's half of an NMProblem (values, mask, pattern, tail rows); callers fill x, y and the
// path fields. `vt` must outlive the problem: tail_values points into its tensor.
inline NMProblem weight_problem(const at::Tensor& values, const at::Tensor& mask,
                                const PackedShape& shape, const ValueTail& vt, int64_t rows,
                                int64_t n, int64_t m) {
  NMProblem p{};
  p.values = values.data_ptr();
  p.kept = shape.kept;
  p.mask = mask.data_ptr<uint8_t>();
  p.KB = shape.KB;
  p.R = rows;
  p.n = static_cast<int>(n);
  p.m = static_cast<int>(m);
  p.vtype = shape.vtype;
  p.safe_rows = vt.safe_rows;
  p.tail_values = vt.tail.defined() ? vt.tail.data_ptr() : nullptr;
  return p;
}

}  // namespace nmfx
