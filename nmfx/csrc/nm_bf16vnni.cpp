// bf16 N:M GEMM for many rows of x: W expanded in L2-sized slabs, dense AVX512-BF16 dot products.
//
// Why: oneDNN's bf16 F.linear repacks the dense weight into its VNNI layout on every call, and the
// dense branch (nm_dense.cpp) first expands the packed weight into a dense scratch for it: two
// passes over a dense-sized weight through memory before the GEMM. Here the packed rows are
// expanded (vpexpandw) straight into a small per-thread slab that stays in L2, and a
// register-blocked vdpbf16ps microkernel reads it from there: the only pass over the weight
// through memory reads its packed form, once per call.
//
// Orientation: the vector lanes are 16 rows of x, one weight row is broadcast. x is staged once
// per call in the pair-interleaved (VNNI) layout xs[block][k/2][lane] (a 32-bit word: x[b][k],
// x[b][k+1]), blocks of 16 * ZV rows of x; the weight slab holds, per chunk of 32 columns, each
// row's 16 column pairs as one 64-byte line, so every broadcast of a tile is one pointer plus a
// constant offset (vdpbf16ps with an embedded {1to16} broadcast) and expanding a row needs no
// transpose: one masked load of its kept values and one vpexpandw per 32 columns. A tile is NR
// weight rows x ZV vectors of x rows (NR * ZV <= 28 accumulators in registers); per column pair
// it loads ZV vectors of x and issues NR * ZV dot products.
//
// Loops: per work item (a run of consecutive weight rows; runs of about equal size, two per
// thread), per group of at most kGroupRows rows of the run, per slab of kSlabCols columns (a
// run's first slabs narrower): expand the group's rows into the slab, then per block of x rows,
// per tile, accumulate into y^T of the group (fp32, L2), added into y at the end. Pruned positions are multiplied as zeros, so NaN and
// Inf in x give F.linear's results without a scan; vdpbf16ps treats subnormal inputs and outputs
// as zero, as oneDNN's bf16 GEMM on the same instruction does.
//
// Whatever the mask holds, a row's kept values are read by the pattern's constant count per 32
// columns (masked loads), so nothing is read out of bounds. Only functions marked with the
// target attribute use AVX-512; they run only where the CPU reports avx512_bf16 (nm_ops.cpp).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "nm_kernels.h"
#include "nm_parallel.h"
#include "nm_thread_buffer.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NMFX_VNNI_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16")))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16")
#include "nm_transpose.h"  // its helpers compiled for AVX-512 here, nothing else
#pragma GCC pop_options
#endif

namespace nmfx {

bool bf16vnni_supports(int n, int m) { return m >= 2 && m <= 32 && 32 % m == 0 && n > 0 && n < m; }

#if defined(__x86_64__) || defined(__i386__)
namespace {

constexpr int64_t kChunk = 32;  // columns per expanded 64-byte line
// Vectors of 16 rows of x per block, at most: tiles of 14 weight rows x 2 vectors (28
// accumulators; one vector: 28 rows). 6 x 4 and 8 x 3 tiles measured the same within noise at
// 16-256 rows of x (one thread, Zen 4, 1024x1024 to 4096x11008). A group's last rows run one
// shorter tile, its height rounded up to tail_step rows (the slab's kPadRows lines past a group
// hold what the rounding reads; their sums are never stored).
constexpr int64_t kMaxZV = 2;
constexpr int64_t kPadRows = 4;
// Weight rows per group at most and columns per slab: a slab (64 + 4 rows x 1024 columns, 136
// KB) and its successor stay in L2 with a block of x's slab (32 rows x 1024 columns, 64 KB).
// 112-row groups and 512- or 2048-column slabs measured within noise of 56-row groups.
constexpr int64_t kGroupRows = 64;
constexpr int64_t kSlabCols = 1024;
// A run's first slab is expanded with no dot products to overlap it: it covers only
// kFirstSlabCols columns, and each next slab twice as many, up to kSlabCols.
constexpr int64_t kFirstSlabCols = 256;
// Work items per thread: runs of consecutive weight rows of equal size (rounded to even rows).
// 1 or 2 measured 5-10% faster than 4 at 1024x1024, 16-256 rows of x, two threads (Zen 4); 2
// keeps some balancing when a thread is descheduled. Runs of groups of a fixed 56 rows had left
// 256x2048 at 32 rows of x (5 groups: 2 + 3 per thread) 0.70x of F.linear on two threads.
constexpr int64_t kRunsPerThread = 2;
constexpr int64_t kMinRunRows = 16;
// Columns of x per staging item (x is staged by blocks of rows and ranges of columns, so that
// one block of rows of x is staged by every thread).
constexpr int64_t kStageCols = 512;

struct Plan {
  int64_t group;  // weight rows per group
  int64_t slab;   // columns per slab (multiple of kChunk)
};

// Expands packed rows into a slab one (row, chunk of 32 columns) line at a time, so that the
// expansion of the next slab can run between the dot products of this one (Expander::step in
// the tile loop): run as a phase of its own, it had cost 6 cycles per line with nothing else
// to do, a third of the time at 16 rows of x. Line (c, r - r0) goes to slab + (c * ldc + r - r0)
// * 16 words; rows are expanded in order, each row's chunks in order (its packed values and
// mask bytes read as one stream).
struct Expander {
  const NMProblem* p = nullptr;
  uint32_t* slab = nullptr;
  int64_t ldc = 0;
  int64_t r = 0, r0 = 0, r1 = 0;  // rows left: [r, r1)
  int64_t c = 0, nch = 0;  // next chunk of row r, chunks per row
  int64_t v0 = 0, mb0 = 0;  // first kept value and mask byte of the slab within a row
  int64_t full = 0;  // chunks per row with all their kept values and mask bytes
  int64_t per = 0;  // kept values per chunk
  int64_t per_step = 0;  // lines per step
  const uint16_t* vp = nullptr;  // row r's values from v0
  const uint8_t* mp = nullptr;  // row r's mask from mb0

  void start(const NMProblem& prob, uint32_t* out, int64_t ld, int64_t row0, int64_t row1,
             int64_t col0, int64_t chunks) {
    p = &prob;
    slab = out;
    ldc = ld;
    r = r0 = row0;
    r1 = row1;
    c = 0;
    nch = chunks;
    per = kChunk / p->m * p->n;
    v0 = col0 / p->m * p->n;
    mb0 = col0 / 8;
    full = std::clamp<int64_t>(std::min((p->KB - mb0) / 4, (p->kept - v0) / per), 0, nch);
    per_step = 0;
    if (r < r1) seek();
  }
  void seek() {
    vp = static_cast<const uint16_t*>(row_values(*p, r, 2)) + v0;
    mp = p->mask + r * p->KB + mb0;
  }
  int64_t lines_left() const { return (r1 - r) * nch - c; }

  NMFX_VNNI_TARGET __attribute__((always_inline)) inline void line() {
    uint32_t* out = slab + (c * ldc + r - r0) * 16;
    if (c < full) {
      uint32_t bits;
      std::memcpy(&bits, mp + c * 4, 4);
      const __mmask32 lm = per >= 32 ? ~0u : (1u << per) - 1;
      const __m512i v = _mm512_maskz_loadu_epi16(lm, vp + c * per);
      _mm512_store_si512(out, _mm512_maskz_expand_epi16(bits, v));
    } else {
      partial(out);
    }
    if (++c == nch) {
      c = 0;
      if (++r < r1) seek();
    }
  }
  // The last, partial chunk of a row (cols not a multiple of 32): the mask bytes and kept values
  // left, the rest zero.
  NMFX_VNNI_TARGET void partial(uint32_t* out) const {
    uint32_t bits = 0;
    const int64_t nb = std::clamp<int64_t>(p->KB - mb0 - c * 4, 0, 4);
    if (nb > 0) std::memcpy(&bits, mp + c * 4, nb);
    const int64_t left = std::clamp<int64_t>(p->kept - v0 - c * per, 0, per);
    const __mmask32 vm = left >= 32 ? ~0u : (1u << left) - 1;
    const __m512i v = _mm512_maskz_loadu_epi16(vm, vp + c * per);
    _mm512_store_si512(out, _mm512_maskz_expand_epi16(bits, v));
  }
  NMFX_VNNI_TARGET __attribute__((always_inline)) inline void step() {
    for (int64_t i = 0; i < per_step && r < r1; ++i) line();
  }
  NMFX_VNNI_TARGET void finish() {
    while (r < r1) line();
  }
};

// Rows [b0, b0 + 16) of x (bf16 bits, row stride sb, unit column stride) as column pairs
// [q0, q1) of one 16-lane column of the VNNI staging: word (q, lane i) at out + q * lanes + i.
// Rows past B and columns past cols are zero.
NMFX_VNNI_TARGET void stage_rows16(const uint16_t* x, int64_t sb, int64_t B, int64_t cols,
                                   int64_t b0, int64_t q0, int64_t q1, int64_t lanes,
                                   uint32_t* out) {
  const int64_t nrow = std::clamp<int64_t>(B - b0, 0, 16);
  for (int64_t q = q0; q < q1; q += 16) {
    const int64_t c = 2 * q;
    const int64_t have = std::clamp<int64_t>(cols - c, 0, 32);
    const __mmask32 cm = have >= 32 ? ~0u : (1u << have) - 1;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      r[i] = i < nrow ? _mm512_maskz_loadu_epi16(cm, x + (b0 + i) * sb + c) : _mm512_setzero_si512();
    }
    transpose16(r);
    const int64_t nq = std::min<int64_t>(16, q1 - q);
    for (int64_t t = 0; t < nq; ++t) _mm512_storeu_si512(out + (q + t) * lanes, r[t]);
  }
}

// The packed rows and mask bytes of the slab after next, prefetched a row at a time between
// chunks of the tiles (rows / iterations rows per chunk), so that expanding it (during the next
// slab) finds them in cache: its rows are ~100 short streams the hardware prefetchers do not
// follow, and a burst of a slab's prefetches at once filled the miss queue.
struct Prefetch {
  const NMProblem* p = nullptr;
  int64_t r = 0, r1 = 0;  // rows left: [r, r1)
  int64_t v0 = 0, vbytes = 0;  // kept values from v0, bytes per row
  int64_t mb0 = 0, mbytes = 0;  // mask bytes
  int64_t rows = 0, iterations = 1, debt = 0;

  NMFX_VNNI_TARGET __attribute__((always_inline)) inline void step() {
    for (debt += rows; debt >= iterations && r < r1; debt -= iterations, ++r) {
      const char* v = static_cast<const char*>(row_values(*p, r, 2)) + v0 * 2;
      for (int64_t o = 0; o < vbytes; o += 64) _mm_prefetch(v + o, _MM_HINT_T0);
      const char* mk = reinterpret_cast<const char*>(p->mask + r * p->KB + mb0);
      for (int64_t o = 0; o < mbytes; o += 64) _mm_prefetch(mk + o, _MM_HINT_T0);
    }
  }
};

// One tile: NR weight rows (slab lines at w, chunk stride ldw words) x ZV vectors of x rows
// (staging at xs, 16 * ZV words per column pair), nch chunks. yt rows (stride ldyt) = (FIRST)
// or += the sums. Each chunk also expands a few lines of the next slab (ex).
template <int NR, int ZV, bool FIRST>
NMFX_VNNI_TARGET __attribute__((noinline)) void tile(const uint32_t* w, int64_t ldw,
                                                     const uint32_t* xs, int64_t nch, float* yt,
                                                     int64_t ldyt, Expander& exp, Prefetch& pfp) {
  constexpr int kLanes = 16 * ZV;
  Expander ex = exp;  // local copies: their state can stay in registers
  Prefetch pf = pfp;
  __m512 acc[NR][ZV];
#pragma GCC unroll 28
  for (int j = 0; j < NR; ++j) {
    for (int z = 0; z < ZV; ++z) {
      acc[j][z] = FIRST ? _mm512_setzero_ps() : _mm512_loadu_ps(yt + j * ldyt + z * 16);
    }
  }
  for (int64_t c = 0; c < nch; ++c, w += ldw, xs += 16 * kLanes) {
    ex.step();
    pf.step();
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      __m512bh xv[ZV];
      for (int z = 0; z < ZV; ++z) {
        xv[z] = reinterpret_cast<__m512bh>(_mm512_load_si512(xs + i * kLanes + z * 16));
      }
#pragma GCC unroll 28
      for (int j = 0; j < NR; ++j) {
        const __m512bh wb = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(w[j * 16 + i])));
        for (int z = 0; z < ZV; ++z) acc[j][z] = _mm512_dpbf16_ps(acc[j][z], xv[z], wb);
      }
    }
  }
#pragma GCC unroll 28
  for (int j = 0; j < NR; ++j) {
    for (int z = 0; z < ZV; ++z) _mm512_storeu_ps(yt + j * ldyt + z * 16, acc[j][z]);
  }
  exp = ex;
  pfp = pf;
}

// Tile rows per vector count: NR * ZV accumulators, ZV vectors of x and one broadcast in the 32
// registers; a group's last, shorter tile rounds its rows up to a multiple of tail_step.
constexpr int tile_rows(int zv) { return zv == 2 ? 14 : 28; }
constexpr int tail_step(int zv) { return zv == 2 ? 2 : 4; }
static_assert(tail_step(1) - 1 <= kPadRows && tail_step(2) - 1 <= kPadRows);

// Everything one call of tiles<ZV> passes on to each tile.
struct TileArgs {
  const uint32_t* slab;
  int64_t ldw;
  const uint32_t* xs;
  int64_t nch;
  bool first;
  float* yt;
  int64_t ldyt;
  Expander* ex;
  Prefetch* pf;
};

template <int NR, int ZV>
NMFX_VNNI_TARGET void tile_at(const TileArgs& a, int64_t j0) {
  if (a.first) {
    tile<NR, ZV, true>(a.slab + j0 * 16, a.ldw, a.xs, a.nch, a.yt + j0 * a.ldyt, a.ldyt, *a.ex, *a.pf);
  } else {
    tile<NR, ZV, false>(a.slab + j0 * 16, a.ldw, a.xs, a.nch, a.yt + j0 * a.ldyt, a.ldyt, *a.ex, *a.pf);
  }
}

// The tail tile of K * tail_step(ZV) rows (k of them: K counts down to k).
template <int ZV, int K>
NMFX_VNNI_TARGET void tail_tile(const TileArgs& a, int64_t j0, int64_t k) {
  if constexpr (K > 0) {
    if (k == K) return tile_at<K * tail_step(ZV), ZV>(a, j0);
    return tail_tile<ZV, K - 1>(a, j0, k);
  }
}

template <int ZV>
NMFX_VNNI_TARGET void tiles(int64_t nrows, const TileArgs& a) {
  constexpr int NR = tile_rows(ZV);
  constexpr int kStep = tail_step(ZV);
  int64_t j0 = 0;
  for (; j0 + NR <= nrows; j0 += NR) tile_at<NR, ZV>(a, j0);
  if (j0 < nrows) tail_tile<ZV, NR / kStep>(a, j0, (nrows - j0 + kStep - 1) / kStep);
}

// x in VNNI pairs: per block of `lanes` rows (the last block: its vectors of 16 rows only),
// [pairs][lanes of the block] words.
struct Staged {
  const uint32_t* xs;
  int64_t B;
  int64_t pairs;  // column pairs per block (columns rounded up to kChunk, halved)
  int64_t lanes;  // 16 * vectors per block
  int64_t blocks;
  const float* bias;  // [R] or null
  uint16_t* out;      // [B, R] bf16
  int64_t vectors(int64_t blk) const { return std::min<int64_t>(lanes, B - blk * lanes + 15) / 16; }
};

// Tile calls per slab (one per tile of every block of x, the shorter last one included).
int64_t tile_calls(const Staged& s, int64_t nrows) {
  int64_t calls = 0;
  for (int64_t blk = 0; blk < s.blocks; ++blk) {
    const int nr = tile_rows(static_cast<int>(s.vectors(blk)));
    calls += (nrows + nr - 1) / nr;
  }
  return calls;
}

// Column pairs per slab of a group: a run's first group starts at kFirstSlabCols columns and
// doubles up to kSlabCols (its first slab is expanded with nothing to overlap); others take
// kSlabCols from the start.
int64_t slab_pairs(const Plan& plan, bool run_start, int64_t q0) {
  if (!run_start) return plan.slab / 2;
  int64_t width = kFirstSlabCols / 2;
  for (int64_t done = width; done <= q0 && width < plan.slab / 2; done += width) width *= 2;
  return std::min(width, plan.slab / 2);
}

// One slab of one group of weight rows: rows [g0, g1), column pairs [q0, q0 + 16 * nch).
struct Step {
  int64_t g0, g1, q0, nch;
};

// Weight rows [ga, gb) (a run of groups): slab after slab, each expanded during the one before
// (two slab buffers), the packed data of the one after that prefetched meanwhile; each group's
// y^T is stored into the output after its last slab.
NMFX_VNNI_TARGET void run_groups(const NMProblem& p, const Staged& s, const Plan& plan,
                                 int64_t ga, int64_t gb) {
  static thread_local KeptVector<uint32_t> slabbuf;  // counted and releasable (nm_thread_buffer.h)
  static thread_local KeptVector<float> ytbuf;
  const int64_t ldc = plan.group + kPadRows;  // slab lines per chunk
  const int64_t ldyt = s.blocks * s.lanes;
  const int64_t slab_words = plan.slab / kChunk * ldc * 16;
  if (slabbuf.size() < static_cast<size_t>(2 * slab_words)) slabbuf.resize(2 * slab_words);
  if (ytbuf.size() < static_cast<size_t>(ldc * ldyt)) ytbuf.resize(ldc * ldyt);
  uint32_t* slabs = slabbuf.data();  // 64-byte aligned
  float* yt = ytbuf.data();
  std::vector<Step> steps;
  for (int64_t g0 = ga; g0 < gb; g0 += plan.group) {
    for (int64_t q0 = 0, w = 0; q0 < s.pairs; q0 += w) {
      w = std::min(slab_pairs(plan, g0 == ga, q0), s.pairs - q0);
      steps.push_back({g0, std::min(gb, g0 + plan.group), q0, w / 16});
    }
  }
  const int64_t per = kChunk / p.m * p.n;
  Expander ex;
  ex.start(p, slabs, ldc, steps[0].g0, steps[0].g1, 2 * steps[0].q0, steps[0].nch);
  ex.finish();
  for (size_t t = 0; t < steps.size(); ++t) {
    const Step& st = steps[t];
    const int64_t nrows = st.g1 - st.g0;
    const int64_t calls = tile_calls(s, nrows);
    uint32_t* slab = slabs + (t % 2) * slab_words;
    if (t + 1 < steps.size()) {
      const Step& nx = steps[t + 1];
      ex.start(p, slabs + ((t + 1) % 2) * slab_words, ldc, nx.g0, nx.g1, 2 * nx.q0, nx.nch);
      ex.per_step = (ex.lines_left() + calls * st.nch - 1) / (calls * st.nch);
    }
    Prefetch pf;
    if (t + 2 < steps.size()) {
      const Step& nn = steps[t + 2];
      pf.p = &p;
      pf.r = nn.g0;
      pf.r1 = nn.g1;
      pf.v0 = 2 * nn.q0 / p.m * p.n;
      pf.vbytes = nn.nch * per * 2;
      pf.mb0 = 2 * nn.q0 / 8;
      pf.mbytes = nn.nch * 4;
      pf.rows = pf.r1 - pf.r;
      pf.iterations = calls * st.nch;
    }
    for (int64_t blk = 0; blk < s.blocks; ++blk) {
      const int64_t zv = s.vectors(blk);
      const TileArgs a{slab, ldc * 16, s.xs + blk * s.pairs * s.lanes + st.q0 * zv * 16, st.nch,
                       st.q0 == 0, yt + blk * s.lanes, ldyt, &ex, &pf};
      if (zv == 2) {
        tiles<2>(nrows, a);
      } else {
        tiles<1>(nrows, a);
      }
    }
    ex.finish();
    if (st.q0 + 16 * st.nch >= s.pairs) {
      store_transposed(yt, ldyt, nrows, s.B, s.bias != nullptr ? s.bias + st.g0 : nullptr,
                       s.out + st.g0, p.R);
    }
  }
}

// Block blk of rows of x, column pairs [q0, q1), into the staging.
NMFX_VNNI_TARGET void stage_block(const uint16_t* x, int64_t sb, int64_t cols, const Staged& s,
                                  int64_t blk, int64_t q0, int64_t q1, uint32_t* xs) {
  const int64_t zv = s.vectors(blk);
  for (int64_t h = 0; h < zv; ++h) {
    stage_rows16(x, sb, s.B, cols, blk * s.lanes + h * 16, q0, q1, zv * 16,
                 xs + blk * s.pairs * s.lanes + h * 16);
  }
}

// The calling thread's own copy of x's one block staged for call number `call` (staged on the
// thread's first run of the call).
NMFX_VNNI_TARGET const uint32_t* own_staging(const uint16_t* x, int64_t sb, int64_t cols,
                                             const Staged& s, int64_t call) {
  static thread_local KeptVector<uint32_t> buf;  // counted and releasable (nm_thread_buffer.h)
  static thread_local int64_t held = 0;  // the call it holds
  const size_t words = static_cast<size_t>(s.pairs * s.lanes);
  if (held != call || buf.size() < words) {  // (a released buffer has size 0)
    if (buf.size() < words) buf.resize(words);
    stage_block(x, sb, cols, s, 0, 0, s.pairs, buf.data());
    held = call;
  }
  return buf.data();
}

// Rows [0, R) in `runs` runs of about equal size, bounds on even rows (the tail tiles' unit).
int64_t run_bound(int64_t R, int64_t runs, int64_t i) { return i >= runs ? R : R * i / runs / 2 * 2; }

}  // namespace

int64_t bf16vnni_staged_words(int64_t B, int64_t cols) {
  const int64_t zvb = std::min<int64_t>(kMaxZV, (B + 15) / 16);
  const int64_t lanes = 16 * zvb;
  const int64_t blocks = (B + lanes - 1) / lanes;
  const int64_t pairs = (cols + kChunk - 1) / kChunk * kChunk / 2;
  return blocks * pairs * lanes;
}

void nm_gemm_bf16vnni(const NMProblem& p, const uint16_t* x, int64_t sb, int64_t cols,
                      const float* bias, uint16_t* out, uint32_t* staging) {
  Staged s{};
  s.bias = bias;
  s.out = out;
  s.B = p.B;
  const int64_t zvb = std::min<int64_t>(kMaxZV, (p.B + 15) / 16);
  s.lanes = 16 * zvb;
  s.blocks = (p.B + s.lanes - 1) / s.lanes;
  s.pairs = (cols + kChunk - 1) / kChunk * kChunk / 2;
  s.xs = staging;
  const int64_t macs = p.R * cols * p.B;
  const int64_t nt = macs < (int64_t{1} << 16) ? 1 : at::get_num_threads();
  // One parallel region per call (a region of its own for staging x had cost 256x2048 at 32
  // rows of x 5-30% of its time on two threads, Zen 4, the more the busier the host). One block of rows of x (at most 32): each
  // thread stages all of it into its own buffer when it starts its first run. More: the first
  // work items stage x by blocks and column ranges into the shared staging, and a thread that
  // takes a run waits for the staging items taken before it (items are handed out in order, so
  // it only waits on items being run, as a region's end would).
  const bool own = s.blocks == 1 && nt > 1;
  const int64_t qstep = kStageCols / 2;  // a multiple of 16 pairs (stage_rows16's unit)
  const int64_t qitems = (s.pairs + qstep - 1) / qstep;
  const int64_t pre = own ? 0 : s.blocks * qitems;  // staging items
  std::atomic<int64_t> staged{0};
  static std::atomic<int64_t> calls{0};
  const int64_t call = calls.fetch_add(1, std::memory_order_relaxed) + 1;
  // Work items: runs of consecutive weight rows of about equal size (kRunsPerThread per thread),
  // each in groups of at most kGroupRows rows, so that each group but a run's first finds its
  // rows prefetched and its first slab expanded.
  const int64_t runs = std::clamp<int64_t>(p.R / kMinRunRows, 1, nt * kRunsPerThread);
  int64_t most = 0;  // rows of the longest run
  for (int64_t i = 0; i < runs; ++i) {
    most = std::max(most, run_bound(p.R, runs, i + 1) - run_bound(p.R, runs, i));
  }
  const int64_t per_run = (most + kGroupRows - 1) / kGroupRows;
  Plan plan{};
  plan.group = std::min(kGroupRows, ((most + per_run - 1) / per_run + 1) / 2 * 2);
  plan.slab = kSlabCols;
  parallel_items(pre + runs, nt, [&](int64_t i) {
    if (i < pre) {
      const int64_t blk = i / qitems, q0 = i % qitems * qstep;
      stage_block(x, sb, cols, s, blk, q0, std::min(s.pairs, q0 + qstep), staging);
      staged.fetch_add(1, std::memory_order_release);
      return;
    }
    while (staged.load(std::memory_order_acquire) < pre) _mm_pause();
    Staged mine = s;
    if (own) mine.xs = own_staging(x, sb, cols, s, call);
    run_groups(p, mine, plan, run_bound(p.R, runs, i - pre), run_bound(p.R, runs, i - pre + 1));
  });
}

#else  // not x86: never selected (cpu_has_* report false); keeps the build portable.

int64_t bf16vnni_staged_words(int64_t, int64_t) { return 0; }
void nm_gemm_bf16vnni(const NMProblem&, const uint16_t*, int64_t, int64_t, const float*,
                      uint16_t*, uint32_t*) {}

#endif

}  // namespace nmfx
