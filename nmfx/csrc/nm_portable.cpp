// Portable (scalar C++) N:M kernel: the reference every SIMD path is tested against.
#include <cstring>

#include "nm_kernels.h"

namespace nmfx {
namespace {

inline float to_float(const void* base, int64_t i, ValueType t) {
  if (t == ValueType::kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  if (t == ValueType::kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  // IEEE half -> float, including subnormals, inf and NaN.
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {
    exp = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline int elem_size(ValueType t) { return t == ValueType::kFloat32 ? 4 : 2; }

}  // namespace

void nm_gemm_portable(const NMProblem& p, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const void* vals = row_values(p, r, elem_size(p.vtype));
    const uint8_t* mrow = p.mask + r * p.KB;
    for (int64_t b = 0; b < p.B; ++b) {
      const float* xr = p.x + b * p.ldx;
      float acc = 0.f;
      int64_t v = 0;
      for (int64_t kb = 0; kb < p.KB; ++kb) {
        unsigned m = mrow[kb];
        while (m != 0 && v < p.kept) {  // a corrupt mask never reads past the row
          const int j = __builtin_ctz(m);
          acc += to_float(vals, v++, p.vtype) * xr[kb * 8 + j];
          m &= m - 1;
        }
      }
      p.y[b * p.R + r] += acc;
    }
  }
}

namespace {

template <typename T>
void expand_rows_t(const NMProblem& p, int64_t r0, int64_t r1, T* out, int64_t ldo) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* v = static_cast<const T*>(row_values(p, r, sizeof(T)));
    T* o = out + (r - r0) * ldo;
    std::memset(o, 0, ldo * sizeof(T));
    const uint8_t* mrow = p.mask + r * p.KB;
    int64_t c = 0;
    for (int64_t kb = 0; kb < p.KB; ++kb) {
      unsigned m = mrow[kb];
      while (m != 0 && c < p.kept) {  // a corrupt mask never reads past the row
        o[kb * 8 + __builtin_ctz(m)] = v[c++];
        m &= m - 1;
      }
    }
  }
}

}  // namespace

void expand_rows_portable(const NMProblem& p, int64_t r0, int64_t r1, void* out, int64_t ldo) {
  if (p.vtype == ValueType::kFloat32) {
    expand_rows_t(p, r0, r1, static_cast<uint32_t*>(out), ldo);
  } else {
    expand_rows_t(p, r0, r1, static_cast<uint16_t*>(out), ldo);
  }
}

}  // namespace nmfx
