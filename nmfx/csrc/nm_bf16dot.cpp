// bf16 N:M kernel on AVX512-BF16 dot products (vdpbf16ps): only the kept multiply-adds.
//
// Dense bf16 GEMMs (oneDNN) run vdpbf16ps, two bf16 products per fp32 lane, twice the
// multiply-adds per instruction of fp32 FMAs; the other nmfx kernels widen bf16 to fp32 and lose
// to them from a few rows of x on. Here the kept values of a weight row are used as they are
// packed: 32 kept values (16 pairs) are one vdpbf16ps operand, and the other is x gathered at
// their columns by one vpermt2b (a 64-column table of x) per 64 columns. 2:4 and 4:8 thus do half
// the dot products of dense (1:4 a quarter, plus a blend per extra 64 columns).
//
// Per pass the gather indices of a panel of kPanelRows weight rows are decoded once from the
// mask (vpcompressw of the column numbers) into a per-thread scratch next to the kept values,
// then every tile of kXB rows of x (staged as bf16, zero padded) runs against the panel in
// tiles of kWR weight rows: kWR x kXB fp32 accumulators, one horizontal reduction per tile.
// Products are exact in fp32, sums are fp32 (round to nearest; the instruction treats subnormal
// inputs and outputs as zero, as oneDNN's bf16 GEMM on the same instruction does).
//
// Patterns: M divides 32 and 64 columns keep 8, 16 or 32 values (N/M = 1/8, 1/4 or 1/2): 2:4,
// 4:8, 8:16, 1:4, 2:8, 1:8, ... (bf16dot_supports). Compiled with target pragmas so it builds on
// any x86-64 compiler; it only runs where the CPU reports avx512_bf16 (nm_ops.cpp).
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "nm_kernels.h"  // before the target pragma: its inline functions stay baseline x86-64

#pragma GCC target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512bf16,fma,f16c,popcnt")

#include "nm_bf16dot.h"  // after the target pragma: compiled for AVX512-BF16 here

namespace nmfx {
namespace {

constexpr int kWR = 4;               // weight rows per tile
constexpr int kXB = 4;               // rows of x per tile
constexpr int64_t kPanelRows = 16;   // weight rows decoded per pass over x

// Rows [r, r + nr) into the panel scratch: per vector, 32 gather indices (column within its
// 64-column chunk, as the byte pair of its bf16 word for vpermt2b) and the 32 kept values.
// Chunk i of a vector owns lanes [i*c, (i+1)*c): one vpcompressb of the column numbers by the
// chunk's 64 mask bits lists its kept columns in order. Whatever the mask holds, every index is
// in [0, 64) and values are read by the pattern's constant count (masked loads), so nothing is
// read out of bounds; lanes a mask leaves unfilled point at column 63 of their chunk, which
// holds zero past the last column.
void decode_panel(const NMProblem& p, const Geometry& geo, int64_t r, int64_t nr, uint16_t* idx,
                  uint16_t* vals) {
  alignas(64) uint8_t iota[64];
  for (int i = 0; i < 64; ++i) iota[i] = static_cast<uint8_t>(i);
  const __m512i cols = _mm512_load_si512(iota);
  const __m512i fill = _mm512_set1_epi8(63);
  const __m512i fill16 = _mm512_set1_epi16(63);
  for (int64_t i = 0; i < nr; ++i) {
    const uint8_t* mrow = p.mask + (r + i) * p.KB;
    const uint16_t* vrow = static_cast<const uint16_t*>(row_values(p, r + i, 2));
    uint16_t* irow = idx + i * geo.nvec * 32;
    uint16_t* wrow = vals + i * geo.nvec * 32;
    for (int64_t v = 0; v < geo.nvec; ++v) {
      __m512i iv = fill16;
      for (int ch = 0; ch < geo.g; ++ch) {
        const __mmask64 bits = mask64(mrow, v * geo.g + ch, p.KB);
        const __m512i kept = _mm512_mask_compress_epi8(fill, bits, cols);
        const __m512i words = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(kept));
        if (geo.g == 1) {
          iv = words;
        } else {
          const __mmask32 lanes = ((1u << geo.c) - 1u) << (ch * geo.c);
          iv = _mm512_mask_expand_epi16(iv, lanes, words);
        }
      }
      // Word index k -> byte indices (2k, 2k + 1): vpermt2b gathers the bf16 words (a byte
      // permute is one uop where vpermt2w is several on current x86 cores).
      const __m512i twice = _mm512_slli_epi16(iv, 1);
      const __m512i bytes = _mm512_add_epi16(_mm512_add_epi16(twice, _mm512_slli_epi16(twice, 8)),
                                             _mm512_set1_epi16(0x0100));
      _mm512_storeu_si512(irow + v * 32, bytes);
      const int64_t left = p.kept - v * 32;
      const __mmask32 have = left >= 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1u;
      _mm512_storeu_si512(wrow + v * 32, _mm512_maskz_loadu_epi16(have, vrow + v * 32));
    }
  }
}

// y[b + j, r + i] += sum over the row of W[r + i] * x[b + j], for WR weight rows and XB rows of x.
template <int WR, int XB, int G>
void tile(const NMProblem& p, const Geometry& geo, const uint16_t* idx, const uint16_t* vals,
          const uint16_t* x, int64_t r, int64_t b) {
  __m512 acc[WR][XB];
  for (int i = 0; i < WR; ++i) {
    for (int j = 0; j < XB; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  const int64_t stride = geo.nvec * 32;
  for (int64_t v = 0; v < geo.nvec; ++v) {
    __m512i iv[WR];
    __m512bh wv[WR];
    for (int i = 0; i < WR; ++i) {
      iv[i] = _mm512_loadu_si512(idx + i * stride + v * 32);
      wv[i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(vals + i * stride + v * 32));
    }
    for (int j = 0; j < XB; ++j) {
      const uint16_t* xr = x + (b + j) * p.ldxb + v * 64 * G;
      __m512i t[WR];
      for (int ch = 0; ch < G; ++ch) {
        const __m512i x0 = _mm512_loadu_si512(xr + 64 * ch);
        const __m512i x1 = _mm512_loadu_si512(xr + 64 * ch + 32);
        const __mmask32 lanes = ((1ull << (32 / G)) - 1ull) << (ch * (32 / G));
        for (int i = 0; i < WR; ++i) {
          const __m512i g = _mm512_permutex2var_epi8(x0, iv[i], x1);
          t[i] = ch == 0 ? g : _mm512_mask_mov_epi16(t[i], lanes, g);
        }
      }
      for (int i = 0; i < WR; ++i) {
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv[i], reinterpret_cast<__m512bh>(t[i]));
      }
    }
  }
  if constexpr (WR * XB == 16) {
    alignas(64) float s[16];
    _mm512_store_ps(s, hsum16(&acc[0][0]));
    for (int j = 0; j < XB; ++j) {
      float* yrow = p.y + (b + j) * p.R + r;
      for (int i = 0; i < WR; ++i) yrow[i] += s[i * XB + j];
    }
  } else {
    for (int j = 0; j < XB; ++j) {
      float* yrow = p.y + (b + j) * p.R + r;
      for (int i = 0; i < WR; ++i) yrow[i] += _mm512_reduce_add_ps(acc[i][j]);
    }
  }
}

// Every row of x against panel rows [0, nr) (weight rows r .. r + nr).
template <int G>
void panel_pass(const NMProblem& p, const Geometry& geo, const uint16_t* idx,
                const uint16_t* vals, int64_t r, int64_t nr) {
  const int64_t stride = geo.nvec * 32;
  int64_t b = 0;
  auto rows_of_w = [&](auto xb_tag) {
    constexpr int XB = decltype(xb_tag)::value;
    int64_t i = 0;
    for (; i + kWR <= nr; i += kWR) {
      tile<kWR, XB, G>(p, geo, idx + i * stride, vals + i * stride, p.xbf16, r + i, b);
    }
    for (; i < nr; ++i) tile<1, XB, G>(p, geo, idx + i * stride, vals + i * stride, p.xbf16, r + i, b);
  };
  for (; b + kXB <= p.B; b += kXB) rows_of_w(std::integral_constant<int, kXB>{});
  switch (p.B - b) {
    case 3:
      return rows_of_w(std::integral_constant<int, 3>{});
    case 2:
      return rows_of_w(std::integral_constant<int, 2>{});
    case 1:
      return rows_of_w(std::integral_constant<int, 1>{});
    default:
      return;
  }
}

template <int G>
void run_dot(const NMProblem& p, const Geometry& geo, int64_t r0, int64_t r1) {
  static thread_local KeptVector<uint16_t> idx;  // reused across calls (no page faults)
  static thread_local KeptVector<uint16_t> vals;
  const size_t need = static_cast<size_t>(kPanelRows * geo.nvec * 32);
  if (idx.size() < need) {
    idx.resize(need);
    vals.resize(need);
  }
  for (int64_t r = r0; r < r1; r += kPanelRows) {
    const int64_t nr = std::min(kPanelRows, r1 - r);
    decode_panel(p, geo, r, nr, idx.data(), vals.data());
    panel_pass<G>(p, geo, idx.data(), vals.data(), r, nr);
  }
}

}  // namespace

void nm_gemm_avx512bf16(const NMProblem& p, int64_t r0, int64_t r1) {
  if (p.xbf16 == nullptr) return nm_gemm_avx512(p, r0, r1);  // not the dot-product path
  const Geometry geo = geometry(p);
  switch (geo.g) {
    case 1:
      return run_dot<1>(p, geo, r0, r1);
    case 2:
      return run_dot<2>(p, geo, r0, r1);
    default:
      return run_dot<4>(p, geo, r0, r1);
  }
}

}  // namespace nmfx

#else  // not x86: never selected (cpu_has_* report false); keeps the build portable.

#include "nm_kernels.h"

namespace nmfx {
void nm_gemm_avx512bf16(const NMProblem& p, int64_t r0, int64_t r1) {
  nm_gemm_portable(p, r0, r1);
}
}  // namespace nmfx

#endif
