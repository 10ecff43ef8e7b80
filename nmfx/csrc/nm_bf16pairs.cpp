// bf16 N:M GEMM on AVX512-BF16 dot products over kept pairs, for many rows of x.
//
// A dense bf16 GEMM (oneDNN's F.linear) runs vdpbf16ps near this instruction's peak; expanding
// W first (the dense branch) can only add to its time, and gathering x per weight row (the
// dot-product panels, nm_bf16dot.cpp) costs a permute per dot product. Here the lanes of a
// vector are 16 rows of x and one weight row is broadcast: two consecutive kept values of a row
// (a "pair", one 32-bit broadcast straight from the packed values) meet the two columns of x
// they belong to, pre-interleaved in a table of x pairs. Every window of 8 columns has a small
// set of possible column pairs (2:4: the 6 pairs of each group of 4; 4:8: the 28 of 8 columns;
// 1:4: one column from each group, 16; 1:8: one value alone, 8), so the table holds, per window
// and block of 32 rows of x, every possible pair (bf16 x[c_a] in the low half of each 32-bit
// lane, x[c_b] in the high half); the mask byte of a weight row's window names its pairs
// through a 256-entry lookup. One vdpbf16ps then does 32 useful multiply-adds for 16 rows of x
// (2:4, 4:8, 1:4: half, half and a quarter of dense's instructions; 1:8 does one kept value per
// lane pair: a quarter), with one table load and no permute.
//
// x is staged once per call with its columns as 32-row words (bf16pairs_stage, parallel over
// columns). Loops: per work item (a chunk of weight rows), per sub-chunk whose y^T [rows, x
// rows] stays in L2, per block of windows and block of 32 rows of x, the table slice is built
// (<= 24 KB, it stays in L1) and tiles of kRT weight rows accumulate into y^T, added into y at
// the end. Sums are fp32; vdpbf16ps treats subnormal inputs and
// outputs as zero, as oneDNN's bf16 GEMM on the same instruction does.
//
// Whatever the mask holds, every table slot named is in bounds (bytes that are not of the
// pattern name slot 0) and values are read by the pattern's constant count per window, so
// nothing is read out of bounds. Compiled with target pragmas so it builds on any x86-64
// compiler; it only runs where the CPU reports avx512_bf16 (nm_ops.cpp).
#include "nm_kernels.h"  // before the target pragma: its inline functions stay baseline x86-64

namespace nmfx {

// Which pattern class, or -1 (mirrored by nmfx/kernels/_build.py bf16pairs_supports).
int bf16pairs_kind(int n, int m) {
  if (n == 2 && m == 4) return 0;
  if (n == 4 && m == 8) return 1;
  if (n == 1 && m == 4) return 2;
  if (n == 1 && m == 8) return 3;
  return -1;
}

}  // namespace nmfx

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#pragma GCC target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512bf16,fma,f16c,popcnt")

#include "nm_transpose.h"  // after the target pragma: compiled for AVX-512 here

namespace nmfx {
namespace {

constexpr int kLanes = static_cast<int>(kBf16PairsLanes);  // rows of x per table block
constexpr int kSliceBytes = 24576;  // table slice per block of windows, at most
constexpr int kPrefetchRows = 8;  // rows ahead that decode prefetches
constexpr int kRT = 8;                                       // weight rows per tile
constexpr int64_t kSubRows = 256;  // weight rows per y^T block (256 x 256 rows of x: 256 KB)
constexpr int kNoCol = 255;

// One pattern class: its table slots (column pairs within the window; kNoCol: the high half is
// zero) and, per mask byte, the byte offsets of its Q slots within the window's table.
struct Kind {
  int E;  // slots per window
  int Q;  // dot products (pairs) per window and row
  int V;  // kept values per window and row
  std::array<std::array<uint8_t, 2>, 28> slot_cols;
  std::array<std::array<uint32_t, 2>, 256> lut;
};

int pair_index8(int a, int b) {  // a < b < 8 -> 0..27
  int idx = 0;
  for (int i = 0; i < a; ++i) idx += 7 - i;
  return idx + (b - a - 1);
}

int pair_index4(int a, int b) { return a == 0 ? b - 1 : a == 1 ? b + 1 : 5; }  // a < b < 4 -> 0..5

// Set bits of v, in order, into out (at most 8); returns their count.
int set_bits(unsigned v, int* out) {
  int c = 0;
  for (int i = 0; i < 8; ++i) {
    if (v >> i & 1) out[c++] = i;
  }
  return c;
}

Kind make_kind(int kind) {
  Kind k{};
  k.E = kind == 0 ? 12 : kind == 1 ? 28 : kind == 2 ? 16 : 8;
  k.Q = kind <= 1 ? 2 : 1;
  k.V = kind <= 1 ? 4 : kind == 2 ? 2 : 1;
  constexpr uint32_t kSlot = kLanes * 4;  // bytes per slot
  int bits[8];
  if (kind == 0) {  // 2:4: slots 0-5 the pairs of columns 0-3, 6-11 those of columns 4-7
    for (int a = 0; a < 4; ++a) {
      for (int b = a + 1; b < 4; ++b) {
        k.slot_cols[pair_index4(a, b)] = {static_cast<uint8_t>(a), static_cast<uint8_t>(b)};
        k.slot_cols[6 + pair_index4(a, b)] = {static_cast<uint8_t>(a + 4),
                                              static_cast<uint8_t>(b + 4)};
      }
    }
    for (unsigned v = 0; v < 256; ++v) {
      const int lo = set_bits(v & 15, bits) == 2 ? pair_index4(bits[0], bits[1]) : 0;
      const int hi = set_bits(v >> 4, bits) == 2 ? pair_index4(bits[0], bits[1]) : 0;
      k.lut[v] = {lo * kSlot, (6 + hi) * kSlot};
    }
  } else if (kind == 1) {  // 4:8: every pair of the 8 columns; the first two kept, the last two
    for (int a = 0; a < 8; ++a) {
      for (int b = a + 1; b < 8; ++b) {
        k.slot_cols[pair_index8(a, b)] = {static_cast<uint8_t>(a), static_cast<uint8_t>(b)};
      }
    }
    for (unsigned v = 0; v < 256; ++v) {
      if (set_bits(v, bits) == 4) {
        k.lut[v] = {pair_index8(bits[0], bits[1]) * kSlot, pair_index8(bits[2], bits[3]) * kSlot};
      } else {
        k.lut[v] = {0, 0};
      }
    }
  } else if (kind == 2) {  // 1:4: one column of each group of 4
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        k.slot_cols[a * 4 + b] = {static_cast<uint8_t>(a), static_cast<uint8_t>(b + 4)};
      }
    }
    for (unsigned v = 0; v < 256; ++v) {
      int lo = 0, hi = 0;
      if (set_bits(v & 15, bits) == 1) lo = bits[0];
      if (set_bits(v >> 4, bits) == 1) hi = bits[0];
      k.lut[v] = {static_cast<uint32_t>(lo * 4 + hi) * kSlot, 0};
    }
  } else {  // 1:8: the one kept value alone (high half zero)
    for (int a = 0; a < 8; ++a) k.slot_cols[a] = {static_cast<uint8_t>(a), kNoCol};
    for (unsigned v = 0; v < 256; ++v) {
      k.lut[v] = {static_cast<uint32_t>(set_bits(v, bits) == 1 ? bits[0] : 0) * kSlot, 0};
    }
  }
  return k;
}

const Kind& kind_of(int n, int m) {
  static const std::array<Kind, 4> kinds = {make_kind(0), make_kind(1), make_kind(2),
                                            make_kind(3)};
  return kinds[bf16pairs_kind(n, m)];
}

// Windows per block: the block's table slice (E slots x 128 bytes per window) <= ~24 KB.
int block_windows(const Kind& k) { return std::max(1, kSliceBytes / (k.E * kLanes * 4)); }

// Kept values of a row's window as the 32-bit word a pair broadcasts (1:8: the one value,
// high half zero, so whatever follows it in memory is never multiplied).
template <int V>
inline uint32_t pair_word(const uint8_t* vrow, int64_t w, int q) {
  uint32_t v = 0;
  if constexpr (V == 1) {
    uint16_t h;
    std::memcpy(&h, vrow + w * 2, 2);
    v = h;
  } else {
    std::memcpy(&v, vrow + w * V * 2 + q * 4, 4);
  }
  return v;
}

// One dot product of a tile: its table slot (byte offset within the window's table) and the
// 32-bit word of kept values it broadcasts.
struct Entry {
  uint32_t off;
  uint32_t val;
};

// The mask bytes and kept values of rows [r0, r1), windows [w0, w1), into L1: each row's
// block is a short stretch the hardware prefetcher does not follow. Decoding waits on them:
// without this a third of the time; with it, still a quarter at 64 rows of x.
template <int V>
void prefetch_rows(const NMProblem& p, int64_t r0, int64_t r1, int64_t w0, int64_t w1) {
  for (int64_t r = r0; r < r1; ++r) {
    const char* pm = reinterpret_cast<const char*>(p.mask + r * p.KB + w0);
    const char* pv = static_cast<const char*>(row_values(p, r, 2)) + w0 * V * 2;
    _mm_prefetch(pm, _MM_HINT_T0);
    const uintptr_t first = reinterpret_cast<uintptr_t>(pv) & ~uintptr_t{63};
    const uintptr_t last = reinterpret_cast<uintptr_t>(pv + (w1 - w0) * V * 2 - 1);
    for (uintptr_t a = first; a <= last; a += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
    }
  }
}

// Rows [s0, s1) x windows [w0, w1) as entries [tile of kRT rows][window][row][pair]: decoded
// once per block of windows and reused for every block of rows of x. Rows past s1 (the last
// tile's padding) get zero values.
template <int Q, int V>
void decode(const NMProblem& p, const Kind& k, int64_t s0, int64_t s1, int64_t w0, int64_t w1,
            Entry* st) {
  const int64_t nw = w1 - w0;
  for (int64_t t0 = s0; t0 < s1; t0 += kRT) {
    Entry* tile_st = st + (t0 - s0) / kRT * nw * kRT * Q;
    for (int i = 0; i < kRT; ++i) {
      const int64_t r = t0 + i;
      Entry* e = tile_st + i * Q;
      if (r >= s1) {
        for (int64_t w = 0; w < nw; ++w) {
          for (int q = 0; q < Q; ++q) e[w * kRT * Q + q] = Entry{0, 0};
        }
        continue;
      }
      const uint8_t* mrow = p.mask + r * p.KB;
      const uint8_t* vrow = static_cast<const uint8_t*>(row_values(p, r, 2));
      if (r + kPrefetchRows < s1) prefetch_rows<V>(p, r + kPrefetchRows, r + kPrefetchRows + 1, w0, w1);
      if constexpr (Q == 2) {  // {off0, val0, off1, val1}: one 16-byte store per window
        for (int64_t w = w0; w < w1; ++w) {
          const __m128i offs = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(k.lut[mrow[w]].data()));
          const __m128i vals = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vrow + w * 8));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(e + (w - w0) * kRT * Q),
                           _mm_unpacklo_epi32(offs, vals));
        }
      } else {
        for (int64_t w = w0; w < w1; ++w) {
          e[(w - w0) * kRT * Q] = Entry{k.lut[mrow[w]][0], pair_word<V>(vrow, w, 0)};
        }
      }
    }
  }
}

// nw windows of one tile (kRT weight rows, entries st) against XZ x 16 rows of x (the table
// slice of those windows): yt rows (stride ldyt) += the tile's sums.
template <int Q, int XZ>
void tile(const Entry* st, int64_t nw, const char* slice, int64_t wbytes, float* yt,
          int64_t ldyt) {
  __m512 acc[kRT][XZ];
  for (int i = 0; i < kRT; ++i) {
    for (int z = 0; z < XZ; ++z) acc[i][z] = _mm512_loadu_ps(yt + i * ldyt + z * 16);
  }
  for (int64_t w = 0; w < nw; ++w, st += kRT * Q) {
    const char* tw = slice + w * wbytes;
    for (int i = 0; i < kRT; ++i) {
      for (int q = 0; q < Q; ++q) {
        const Entry e = st[i * Q + q];
        const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(e.val)));
        for (int z = 0; z < XZ; ++z) {
          const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(tw + e.off + z * 64));
          acc[i][z] = _mm512_dpbf16_ps(acc[i][z], xv, wv);
        }
      }
    }
  }
  for (int i = 0; i < kRT; ++i) {
    for (int z = 0; z < XZ; ++z) _mm512_storeu_ps(yt + i * ldyt + z * 16, acc[i][z]);
  }
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The last window of a row when it holds fewer than V kept values (cols not a multiple of 8):
// each kept value at its column (the first `left` set bits of the mask byte), in fp32.
void tail_window(const NMProblem& p, const uint8_t* mrow, const uint16_t* vrow, int64_t w,
                 int64_t left, float* ytrow) {
  int cols[8];
  const int c = std::min<int>(set_bits(mrow[w], cols), static_cast<int>(left));
  const int64_t v0 = p.kept - left;
  for (int t = 0; t < c; ++t) {
    const float wv = bf16_to_float(vrow[v0 + t]);
    const int64_t col = w * 8 + cols[t];
    const uint16_t* xt = static_cast<const uint16_t*>(p.xpairs);
    for (int64_t b = 0; b < p.B; ++b) {
      const uint16_t xv = xt[(b / kLanes * p.KB * 8 + col) * kLanes + b % kLanes];
      ytrow[b] += wv * bf16_to_float(xv);
    }
  }
}

// The table slice of windows [w0, w1) for the block of rows of x at xt (its columns as
// kLanes-wide words, see bf16pairs_stage) into tab: per window, each slot's pair of columns
// interleaved (low half: the first column).
void build_slice(const Kind& k, const uint16_t* xt, int64_t w0, int64_t w1, uint32_t* tab) {
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t w = w0; w < w1; ++w) {
    const uint16_t* xw = xt + w * 8 * kLanes;
    constexpr int kZ = kLanes / 16;
    __m512i col[8][kZ];
    for (int c = 0; c < 8; ++c) {
      for (int z = 0; z < kZ; ++z) {
        col[c][z] = _mm512_cvtepu16_epi32(
            _mm256_load_si256(reinterpret_cast<const __m256i*>(xw + c * kLanes + z * 16)));
      }
    }
    uint32_t* out = tab + (w - w0) * k.E * kLanes;
    for (int s = 0; s < k.E; ++s) {
      const int a = k.slot_cols[s][0];
      const int b = k.slot_cols[s][1];
      for (int z = 0; z < kZ; ++z) {
        const __m512i hi = b == kNoCol ? zero : _mm512_slli_epi32(col[b][z], 16);
        _mm512_store_si512(out + s * kLanes + z * 16, _mm512_or_si512(col[a][z], hi));
      }
    }
  }
}

// y[b, r] += yt[r, b] for r < nr, b < B (y row stride ldy): 16 x 16 blocks through registers,
// the edges one by one.
void add_transposed(const float* yt, int64_t ldyt, int64_t nr, int64_t B, float* y, int64_t ldy) {
  const int64_t nr16 = nr / 16 * 16, B16 = B / 16 * 16;
  for (int64_t r0 = 0; r0 < nr16; r0 += 16) {
    for (int64_t b0 = 0; b0 < B16; b0 += 16) {
      __m512 v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(yt + (r0 + i) * ldyt + b0);
      transpose16(v);
      for (int j = 0; j < 16; ++j) {
        float* o = y + (b0 + j) * ldy + r0;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), v[j]));
      }
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    float* yrow = y + b * ldy;
    const int64_t r_from = b < B16 ? nr16 : 0;
    for (int64_t r = r_from; r < nr; ++r) yrow[r] += yt[r * ldyt + b];
  }
}

// tile<Q, XZ> for the vectors of x rows this block has (1 to kLanes / 16).
template <int Q>
void tile_z(int64_t zs, const Entry* st, int64_t nw, const char* slice, int64_t wbytes,
            float* yt, int64_t ldyt) {
  switch (zs) {
    case 1:
      return tile<Q, 1>(st, nw, slice, wbytes, yt, ldyt);
    case 2:
      return tile<Q, 2>(st, nw, slice, wbytes, yt, ldyt);
    case 3:
      if constexpr (kLanes >= 48) return tile<Q, 3>(st, nw, slice, wbytes, yt, ldyt);
      [[fallthrough]];
    default:
      if constexpr (kLanes >= 64) return tile<Q, 4>(st, nw, slice, wbytes, yt, ldyt);
  }
}

// With `out` (bf16 [B, R]), rows [r0, r1) of it are written, bf16(sum + bias) (bias may be
// null); without, the sums are added into p.y.
template <int Q, int V>
void run_rows(const NMProblem& p, const Kind& k, int64_t r0, int64_t r1, const float* bias,
              uint16_t* out) {
  static thread_local KeptVector<float> ytbuf;  // reused across calls (no page faults)
  static thread_local KeptVector<Entry> stbuf;
  alignas(64) uint32_t slice[kSliceBytes / 4];  // on the stack: a thread_local was looked up per step
  const int64_t nxb = (p.B + kLanes - 1) / kLanes;
  const int64_t ldyt = nxb * kLanes;
  // y^T of a sub-chunk of weight rows stays <= 256 KB (L2).
  const int64_t sub =
      std::min<int64_t>(std::max<int64_t>(kRT, 65536 / ldyt / kRT * kRT), (r1 - r0 + kRT - 1) / kRT * kRT);
  const int64_t kw = block_windows(k);
  if (ytbuf.size() < static_cast<size_t>(sub * ldyt)) ytbuf.resize(sub * ldyt);
  if (stbuf.size() < static_cast<size_t>(sub * kw * Q)) stbuf.resize(sub * kw * Q);
  float* yt = ytbuf.data();
  Entry* st = stbuf.data();
  const int64_t full = p.kept / V;         // windows holding all V values
  const int64_t left = p.kept - full * V;  // values of the window after them
  const int64_t wbytes = int64_t{k.E} * kLanes * 4;
  const uint16_t* xt = static_cast<const uint16_t*>(p.xpairs);
  const int64_t xb_words = p.KB * 8 * kLanes;
  for (int64_t s0 = r0; s0 < r1; s0 += sub) {
    const int64_t s1 = std::min(r1, s0 + sub);
    const int64_t ntiles = (s1 - s0 + kRT - 1) / kRT;
    std::fill(yt, yt + ntiles * kRT * ldyt, 0.f);
    for (int64_t w0 = 0; w0 < full; w0 += kw) {
      const int64_t w1 = std::min(full, w0 + kw);
      const int64_t nw = w1 - w0;
      decode<Q, V>(p, k, s0, s1, w0, w1, st);
      for (int64_t xb = 0; xb < nxb; ++xb) {
        build_slice(k, xt + xb * xb_words, w0, w1, slice);
        const char* tb = reinterpret_cast<const char*>(slice);
        const int64_t zs = std::min<int64_t>(kLanes, p.B - xb * kLanes + 15) / 16;
        for (int64_t t = 0; t < ntiles; ++t) {
          float* ytr = yt + t * kRT * ldyt + xb * kLanes;
          const Entry* ts = st + t * nw * kRT * Q;
          tile_z<Q>(zs, ts, nw, tb, wbytes, ytr, ldyt);
        }
      }
    }
    if (left > 0) {
      for (int64_t r = s0; r < s1; ++r) {
        tail_window(p, p.mask + r * p.KB, static_cast<const uint16_t*>(row_values(p, r, 2)),
                    full, left, yt + (r - s0) * ldyt);
      }
    }
    if (out != nullptr) {
      store_transposed(yt, ldyt, s1 - s0, p.B, bias != nullptr ? bias + s0 : nullptr, out + s0, p.R);
    } else {
      add_transposed(yt, ldyt, s1 - s0, p.B, p.y + s0, p.R);
    }
  }
}

}  // namespace

void nm_gemm_bf16pairs_out(const NMProblem& p, int64_t r0, int64_t r1, const float* bias,
                           uint16_t* out) {
  const Kind& k = kind_of(p.n, p.m);
  switch (bf16pairs_kind(p.n, p.m)) {
    case 0:
    case 1:
      return run_rows<2, 4>(p, k, r0, r1, bias, out);
    case 2:
      return run_rows<1, 2>(p, k, r0, r1, bias, out);
    default:
      return run_rows<1, 1>(p, k, r0, r1, bias, out);
  }
}

void nm_gemm_bf16pairs(const NMProblem& p, int64_t r0, int64_t r1) {
  nm_gemm_bf16pairs_out(p, r0, r1, nullptr, nullptr);
}

// Columns [c0, c1) of x (B rows of `cols` bf16 bits, strides sb and sk) into xt: per block of
// kLanes rows of x, column c's kLanes values contiguous (xt + (block * ldc + c) * kLanes), zero
// past B and past cols.
bool bf16pairs_stage(const uint16_t* x, int64_t sb, int64_t sk, int64_t B, int64_t cols,
                     int64_t ldc, int64_t c0, int64_t c1, uint16_t* xt) {
  const __m512i exp = _mm512_set1_epi32(0x7f807f80);
  __mmask32 bad = 0;  // words whose exponent is all ones (NaN, Inf)
  const int64_t nxb = (B + kLanes - 1) / kLanes;
  // Unit column stride, even c0 and row offsets that fit the gather's 32-bit indices: per 16
  // rows of x, one gather of 32-bit words (two adjacent columns) per column pair.
  const bool gather = sk == 1 && c0 % 2 == 0 && sb * 2 * 16 < (int64_t{1} << 31);
  for (int64_t xb = 0; xb < nxb; ++xb) {
    uint16_t* out = xt + xb * ldc * kLanes;
    const int64_t nb = std::min<int64_t>(kLanes, B - xb * kLanes);
    if (gather) {
      for (int h = 0; h < kLanes / 16; ++h) {
        const int64_t hb = std::clamp<int64_t>(nb - h * 16, 0, 16);
        const __mmask16 valid = static_cast<__mmask16>((1u << hb) - 1u);
        const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                   11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(static_cast<int>(sb * 2)));
        const uint16_t* base = x + (xb * kLanes + h * 16) * sb;
        for (int64_t c = c0; c < c1; c += 2) {
          __m512i g = _mm512_setzero_si512();
          if (c < cols && hb > 0) g = _mm512_mask_i32gather_epi32(g, valid, index, base + c, 1);
          bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(g, exp), exp);
          _mm256_store_si256(reinterpret_cast<__m256i*>(out + c * kLanes + h * 16),
                             _mm512_cvtepi32_epi16(g));
          _mm256_store_si256(reinterpret_cast<__m256i*>(out + (c + 1) * kLanes + h * 16),
                             _mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
        }
      }
      continue;
    }
    for (int64_t c = c0; c < c1; ++c) {
      uint16_t* o = out + c * kLanes;
      const int64_t have = c < cols ? nb : 0;
      const uint16_t* src = x + xb * kLanes * sb + c * sk;
      for (int64_t b = 0; b < have; ++b) {
        o[b] = src[b * sb];
        bad |= (o[b] & 0x7f80u) == 0x7f80u;
      }
      for (int64_t b = have; b < kLanes; ++b) o[b] = 0;
    }
  }
  return bad != 0;
}

}  // namespace nmfx

#else  // not x86: never selected (cpu_has_* report false); keeps the build portable.

namespace nmfx {
void nm_gemm_bf16pairs(const NMProblem& p, int64_t r0, int64_t r1) { nm_gemm_portable(p, r0, r1); }
void nm_gemm_bf16pairs_out(const NMProblem&, int64_t, int64_t, const float*, uint16_t*) {}
bool bf16pairs_stage(const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                     int64_t, uint16_t*) {
  return false;
}
}  // namespace nmfx

#endif
