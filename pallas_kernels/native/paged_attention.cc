// Ragged paged attention for the CPU as an XLA FFI custom call: K/V are read in place from the paged
// cache through each sequence's page table (no per-row gathers, no copies of the context).
//
// Why: the pure-JAX path gathers every row's context pages into a fresh [T, L, Hkv, D] block per loop
// iteration, which costs far more than the arithmetic; here each key block is read once per (sequence,
// query tile) and used by every row of the tile and every query head of each GQA group.
//
// Contract (pallas_kernels/__init__.py): q [T, Hq, D] (this step's query rows, ragged over sequences);
// k, v [T, Hkv, D] (this step's, written into the cache first, in place); kv_cache [P, PS, 2*Hkv, D] with
// K and V interleaved on axis 2 (k0, v0, k1, v1, ...); kv_lens i32[S] (context length including this
// step); page_indices i32[S, PPS]; cu_q_lens i32[S+1]; num_seqs i32[1]. Sequence s owns rows
// cu[s]..cu[s+1]-1, the last q_len positions of its kv_len; a row at position pos sees keys 0..pos
// (pos-W+1..pos with a sliding window W). Rows at or past cu[num_seqs] are padding: their output is zero.
//
// Work item: (sequence, query tile of up to q_tile rows) with all KV heads, so each key block's token rows
// are read once, in order. Per KV head the query vectors are the tile's rows x the G query heads of that
// KV head (nq = rows * G), attended with an online (flash) softmax over key blocks of up to 16 keys that
// never cross a page. Two layouts:
// - decode (nq <= kDotPathMaxNq): each key's dot product is an FMA chain, 16 of them are summed
//   horizontally by one transpose-add tree into a zmm of scores, and P.V broadcasts p over V rows;
// - prefill tiles (attend_lanes): 16 query vectors sit in the lanes of a zmm, so scores, softmax and P.V
//   are lane-wise broadcast-FMAs with no horizontal work (0.67x the time of a transposed-K variant at
//   prefill 1024).
// Items run on XLA's intra-op pool, largest first, taken from an atomic counter (the calling thread takes
// items too, as in int8_matmul.cc).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "spin_wait.h"

namespace ffi = xla::ffi;

namespace {

constexpr int KB = 16;             // keys per block: one zmm of scores
constexpr int kDotPathMaxNq = 8;   // up to this many query vectors per KV head: the decode path
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Item {
  int32_t seq, r0, r1;  // rows r0..r1-1 of sequence seq (relative to its first row), all KV heads
  int64_t cost;               // rows x keys visited, for largest-first ordering
};

struct Job {
  const float* q;        // [T, Hq, D]
  const float* cache;    // [P, PS, 2*Hkv, D] (this step's K/V written)
  const int32_t* kv_lens;  // [S]
  const int32_t* pages;  // [S, PPS]
  const int32_t* cu;     // [S+1]
  float* out;            // [T, Hq, D]
  int64_t Hq, Hkv, D, P, PS, PPS;
  float scale, soft_cap;
  int32_t window;
  std::vector<Item> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// e^x for x <= 88 (x = -inf gives ~0; callers mask): Cody-Waite range reduction and a degree-6 polynomial,
// ~1 ulp on the reduced range, scaled by 2^n with vscalefps.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// cap * tanh(s / cap), with tanh(y) = 1 - 2 / (e^{2y} + 1) (exact limits at +-inf).
inline __m512 soft_cap512(__m512 s, float cap) {
  const __m512 e = exp512(_mm512_mul_ps(s, _mm512_set1_ps(2.0f / cap)));
  const __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                                 _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(t, _mm512_set1_ps(cap));
}

// Lane i of the result = the sum of v[i]'s 16 lanes (a transpose-add tree: 45 shuffles/adds for 16 sums).
inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Per-thread scratch for one item (reused across items; sized on first use).
struct Scratch {  // the decode path's layout; attend_lanes documents its own use of these buffers
  // per KV head h, at offset h * nq (x D or x 16):
  std::vector<float> qb;   // [H, nq, D] scaled query vectors, m = row * G + g
  std::vector<float> acc;  // [H, nq, D] unnormalised outputs
  std::vector<float> s;    // [H, nq, 16] scores, then probabilities of the current key block
  std::vector<float> lv;   // [H, nq, 16] per-lane partial softmax denominators
  std::vector<float> mx;   // [H, nq] running max
  std::vector<float> corr; // [H, nq] rescale of acc for the current block
  std::vector<float> kt;   // [2, 16, D] a key block's K and V rows of one head, contiguous (lanes path)
  std::vector<int32_t> pos;  // [NB, 16] each lane's query position (lanes path)
};

// Scores s[m, i] = q_m . K_i for i < n (zero past n), K_i at kbase + i * stride.
template <int ND>
void scores_dot(const float* qb, int nq, const float* kbase, int64_t stride, int n, float* s) {
  constexpr int D = 16 * ND;
  for (int m = 0; m < nq; ++m) {
    __m512 qv[ND];
    for (int c = 0; c < ND; ++c) qv[c] = _mm512_loadu_ps(qb + m * D + 16 * c);
    __m512 a[KB];
    for (int i = 0; i < KB; ++i) {
      a[i] = _mm512_setzero_ps();
      if (i < n) {
        const float* k = kbase + i * stride;
        for (int c = 0; c < ND; ++c) a[i] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + 16 * c), a[i]);
      }
    }
    _mm512_storeu_ps(s + m * KB, hsum16(a));
  }
}

// acc[m] = acc[m] * corr[m] + sum_{i < n} p[m, i] V_i for MB query vectors from m0.
template <int ND, int MB>
void pv_block(float* acc, const float* p, const float* corr, int m0, const float* vbase, int64_t stride, int n) {
  constexpr int D = 16 * ND;
  __m512 a[MB][ND];
  for (int b = 0; b < MB; ++b) {
    const __m512 c = _mm512_set1_ps(corr[m0 + b]);
    for (int c2 = 0; c2 < ND; ++c2) a[b][c2] = _mm512_mul_ps(_mm512_loadu_ps(acc + (m0 + b) * D + 16 * c2), c);
  }
  for (int i = 0; i < n; ++i) {
    const float* v = vbase + i * stride;
    __m512 vv[ND];
    for (int c2 = 0; c2 < ND; ++c2) vv[c2] = _mm512_loadu_ps(v + 16 * c2);
    for (int b = 0; b < MB; ++b) {
      const __m512 pb = _mm512_set1_ps(p[(m0 + b) * KB + i]);
      for (int c2 = 0; c2 < ND; ++c2) a[b][c2] = _mm512_fmadd_ps(pb, vv[c2], a[b][c2]);
    }
  }
  for (int b = 0; b < MB; ++b)
    for (int c2 = 0; c2 < ND; ++c2) _mm512_storeu_ps(acc + (m0 + b) * D + 16 * c2, a[b][c2]);
}

// Prefetch the token rows (all KV heads) of the block starting at key k0: the next page is anywhere in the
// cache, so the hardware prefetcher cannot guess it, and decode is bound by these reads.
inline void prefetch_block(const Job& j, const int32_t* table, int64_t k0, int64_t kend, int64_t stride) {
  if (k0 >= kend) return;
  const int64_t page = k0 / j.PS, in_page = k0 - page * j.PS;
  const int64_t pid = table[page];
  if (pid < 0 || pid >= j.P) return;
  const int64_t n = std::min<int64_t>({KB, j.PS - in_page, kend - k0});
  const char* base = (const char*)(j.cache + (pid * j.PS + in_page) * stride);
  for (int64_t b = 0; b < n * stride * 4; b += 64) _mm_prefetch(base + b, _MM_HINT_T0);
}

// Decode path (nq <= kDotPathMaxNq). One KV head's part of a key block: scores, online-softmax update and
// P.V for its nq query vectors
// (qb, acc [nq, D]; s, lv [nq, 16]; mx, corr [nq]); rows r0.. of the tile start at position pos0.
template <int ND>
void attend_block(const Job& j, int nq, int64_t G, int64_t pos0, int64_t k0, int n, const float* kbase,
                  int64_t stride, float* qb, float* acc, float* s, float* lv, float* mx, float* corr) {
  constexpr int MB = ND <= 4 ? 4 : ND <= 8 ? 2 : 1;  // MB * ND accumulators stay within the 32 zmm
  const float* vbase = kbase + 16 * ND;
  scores_dot<ND>(qb, nq, kbase, stride, n, s);

  // Online softmax over this block; s becomes p (zero where masked), corr rescales acc.
  for (int m = 0; m < nq; ++m) {
    const int64_t pos = pos0 + m / G;
    const int64_t hi = std::min<int64_t>(n, pos - k0 + 1);  // keys i < hi are at or before pos
    uint32_t bits = hi <= 0 ? 0u : hi >= KB ? 0xFFFFu : ((1u << hi) - 1u);
    if (j.window > 0) {
      const int64_t lo = pos - j.window + 1 - k0;  // keys i >= lo are inside the window
      if (lo >= KB) bits = 0;
      else if (lo > 0) bits &= ~((1u << lo) - 1u);
    }
    float* sm = s + m * KB;
    if (bits == 0) {
      _mm512_storeu_ps(sm, _mm512_setzero_ps());
      corr[m] = 1.0f;
      continue;
    }
    const __mmask16 mask = (__mmask16)bits;
    __m512 sv = _mm512_loadu_ps(sm);
    if (j.soft_cap > 0.0f) sv = soft_cap512(sv, j.soft_cap);
    const float bmax = _mm512_mask_reduce_max_ps(mask, sv);
    const float mold = mx[m], mnew = std::max(mold, bmax);
    const float c = mold == kNegInf ? 0.0f : std::exp(mold - mnew);
    const __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mnew))));
    _mm512_storeu_ps(sm, p);
    float* lm = lv + m * KB;
    _mm512_storeu_ps(lm, _mm512_fmadd_ps(_mm512_loadu_ps(lm), _mm512_set1_ps(c), p));
    mx[m] = mnew;
    corr[m] = c;
  }
  int m = 0;
  for (; m + MB <= nq; m += MB) pv_block<ND, MB>(acc, s, corr, m, vbase, stride, n);
  switch (nq - m) {  // the rest together, so V is loaded once per key (decode: nq = G)
    case 3: if constexpr (MB > 3) pv_block<ND, 3>(acc, s, corr, m, vbase, stride, n); break;
    case 2: if constexpr (MB > 2) pv_block<ND, 2>(acc, s, corr, m, vbase, stride, n); break;
    case 1: pv_block<ND, 1>(acc, s, corr, m, vbase, stride, n); break;
    default: break;
  }
}

// One work item: rows r0..r1-1 of a sequence, every KV head, one pass over the key blocks (each block's
// token rows, all heads, are contiguous in the page: read once, in order).
template <int ND>
void attend(const Job& j, const Item& it, Scratch& sc) {
  constexpr int D = 16 * ND;
  const int64_t G = j.Hq / j.Hkv, H = j.Hkv;
  const int rows = it.r1 - it.r0;
  const int nq = rows * (int)G;  // query vectors per KV head, m = r * G + g
  const int64_t row0 = j.cu[it.seq] + it.r0;  // first query row of the tile in q/out
  const int64_t q_len = j.cu[it.seq + 1] - j.cu[it.seq];
  const int64_t prev = std::max<int64_t>(0, j.kv_lens[it.seq] - q_len);  // keys cached by earlier steps
  const int64_t kend = std::min<int64_t>(prev + it.r1, j.PPS * j.PS);   // keys 0..kend-1 can be visible
  const int64_t kstart = j.window > 0 ? std::max<int64_t>(0, prev + it.r0 - j.window + 1) : 0;
  const int64_t stride = 2 * H * D;  // floats between consecutive tokens of a page

  // Per head h: qb, acc [H, nq, D]; s, lv [H, nq, 16]; mx, corr [H, nq].
  sc.qb.resize((size_t)H * nq * D); sc.acc.assign((size_t)H * nq * D, 0.0f);
  sc.s.resize((size_t)H * nq * KB); sc.lv.assign((size_t)H * nq * KB, 0.0f);
  sc.mx.assign((size_t)H * nq, kNegInf); sc.corr.resize((size_t)H * nq);
  const __m512 scale = _mm512_set1_ps(j.scale);
  for (int r = 0; r < rows; ++r)
    for (int64_t hq = 0; hq < j.Hq; ++hq) {  // hq = h * G + g
      const float* src = j.q + ((row0 + r) * j.Hq + hq) * D;
      float* dst = &sc.qb[((hq / G) * nq + r * G + hq % G) * D];
      for (int c = 0; c < ND; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(src + 16 * c), scale));
    }

  const int32_t* table = j.pages + (int64_t)it.seq * j.PPS;
  for (int64_t k0 = kstart; k0 < kend;) {
    const int64_t page = k0 / j.PS, in_page = k0 - page * j.PS;
    const int n = (int)std::min<int64_t>({KB, j.PS - in_page, kend - k0});
    const int64_t pid = table[page];
    if (pid < 0 || pid >= j.P) { k0 += n; continue; }  // a bad table entry: skip rather than read wild
    prefetch_block(j, table, k0 + n, kend, stride);
    const float* tok = j.cache + (pid * j.PS + in_page) * stride;
    for (int64_t h = 0; h < H; ++h)
      attend_block<ND>(j, nq, G, prev + it.r0, k0, n, tok + 2 * h * D, stride, &sc.qb[h * nq * D],
                       &sc.acc[h * nq * D], &sc.s[h * nq * KB], &sc.lv[h * nq * KB], &sc.mx[h * nq],
                       &sc.corr[h * nq]);
    k0 += n;
  }

  for (int r = 0; r < rows; ++r)
    for (int64_t hq = 0; hq < j.Hq; ++hq) {
      const int64_t i = (hq / G) * nq + r * G + hq % G;
      const float l = _mm512_reduce_add_ps(_mm512_loadu_ps(&sc.lv[i * KB]));
      const __m512 inv = _mm512_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
      float* dst = j.out + ((row0 + r) * j.Hq + hq) * D;
      for (int c = 0; c < ND; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(&sc.acc[i * D + 16 * c]), inv));
    }
}

// Prefill tiles (nq > kDotPathMaxNq): the same attention with 16 query vectors in the lanes of a zmm, so
// nothing is reduced horizontally and K needs no transpose. Per KV head and lane block b: qT, accT
// [D, 16] (transposed), mx, l [16]; a key block's K and V rows are copied to contiguous [16, D] and read as
// broadcasts: scores S_i = sum_d qT[d] * K[i, d] (16 zmm, key i), the online softmax runs lane-wise over
// the 16 keys, and accT[d] += p_i * V[i, d].
template <int ND>
void attend_lanes(const Job& j, const Item& it, Scratch& sc) {
  constexpr int D = 16 * ND;
  const int64_t G = j.Hq / j.Hkv, H = j.Hkv;
  const int rows = it.r1 - it.r0;
  const int nq = rows * (int)G;  // query vectors per KV head, m = r * G + g, lane block m / 16
  const int NB = (nq + 15) / 16;
  const int64_t row0 = j.cu[it.seq] + it.r0;
  const int64_t q_len = j.cu[it.seq + 1] - j.cu[it.seq];
  const int64_t prev = std::max<int64_t>(0, j.kv_lens[it.seq] - q_len);
  const int64_t kend = std::min<int64_t>(prev + it.r1, j.PPS * j.PS);
  const int64_t kstart = j.window > 0 ? std::max<int64_t>(0, prev + it.r0 - j.window + 1) : 0;
  const int64_t stride = 2 * H * D;

  // qb, acc: [H, NB, D, 16]; mx, lv: [H, NB, 16]; kt: K then V rows of a block [2, 16, D]; pos: [NB, 16].
  sc.qb.assign((size_t)H * NB * D * 16, 0.0f); sc.acc.assign((size_t)H * NB * D * 16, 0.0f);
  sc.mx.assign((size_t)H * NB * 16, kNegInf); sc.lv.assign((size_t)H * NB * 16, 0.0f);
  sc.kt.assign((size_t)2 * KB * D, 0.0f); sc.pos.resize((size_t)NB * 16);
  for (int m = 0; m < NB * 16; ++m) sc.pos[m] = m < nq ? (int32_t)(prev + it.r0 + m / G) : -1;  // -1: sees nothing
  for (int r = 0; r < rows; ++r)
    for (int64_t hq = 0; hq < j.Hq; ++hq) {
      const int m = r * (int)G + (int)(hq % G);
      const float* src = j.q + ((row0 + r) * j.Hq + hq) * D;
      float* dst = &sc.qb[((hq / G) * NB + m / 16) * D * 16 + m % 16];
      for (int d = 0; d < D; ++d) dst[d * 16] = src[d] * j.scale;
    }

  float* kblk = sc.kt.data();
  float* vblk = kblk + KB * D;
  alignas(64) float pbuf[KB * 16];
  const int32_t* table = j.pages + (int64_t)it.seq * j.PPS;
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t k0 = kstart; k0 < kend;) {
    const int64_t page = k0 / j.PS, in_page = k0 - page * j.PS;
    const int n = (int)std::min<int64_t>({KB, j.PS - in_page, kend - k0});
    const int64_t pid = table[page];
    if (pid < 0 || pid >= j.P) { k0 += n; continue; }
    prefetch_block(j, table, k0 + n, kend, stride);
    const float* tok = j.cache + (pid * j.PS + in_page) * stride;
    for (int64_t h = 0; h < H; ++h) {
      for (int i = 0; i < n; ++i) {
        std::copy_n(tok + i * stride + 2 * h * D, D, kblk + i * D);
        std::copy_n(tok + i * stride + (2 * h + 1) * D, D, vblk + i * D);
      }
      for (int b = 0; b < NB; ++b) {
        const int32_t* pb = &sc.pos[b * 16];
        const int32_t minpos = pb[0], maxpos = pb[std::min(15, nq - 1 - 16 * b)];
        if (maxpos < k0) continue;  // every lane's position is before this key block
        if (j.window > 0 && minpos - j.window + 1 > k0 + n - 1) continue;  // every key is out of the window
        float* qT = &sc.qb[(h * NB + b) * D * 16];
        float* accT = &sc.acc[(h * NB + b) * D * 16];
        float* mxb = &sc.mx[(h * NB + b) * 16];
        float* lb = &sc.lv[(h * NB + b) * 16];
        __m512 S[KB];
        for (int i = 0; i < KB; ++i) S[i] = _mm512_setzero_ps();
        for (int d = 0; d < D; ++d) {
          const __m512 qd = _mm512_loadu_ps(qT + d * 16);
          for (int i = 0; i < KB; ++i) S[i] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kblk[i * D + d]), S[i]);
        }
        const __m512i posv = _mm512_loadu_si512(pb);
        __mmask16 mk[KB];
        __m512 bmax = neg_inf;
        for (int i = 0; i < KB; ++i) {
          mk[i] = i < n ? _mm512_cmpge_epi32_mask(posv, _mm512_set1_epi32((int32_t)(k0 + i))) : (__mmask16)0;
          if (j.window > 0)  // key k0+i > pos - W  <=>  pos < k0 + i + W
            mk[i] &= _mm512_cmplt_epi32_mask(posv, _mm512_set1_epi32((int32_t)(k0 + i + j.window)));
          const __m512 sv = j.soft_cap > 0.0f ? soft_cap512(S[i], j.soft_cap) : S[i];
          S[i] = _mm512_mask_blend_ps(mk[i], neg_inf, sv);
          bmax = _mm512_max_ps(bmax, S[i]);
        }
        const __m512 mold = _mm512_loadu_ps(mxb);
        const __m512 mnew = _mm512_max_ps(mold, bmax);
        // Lanes that have seen no key yet stay at -inf; 0 stands in as their exponent reference.
        const __m512 msafe = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(mnew, neg_inf, _CMP_NEQ_OQ), mnew);
        const __m512 corr = exp512(_mm512_sub_ps(mold, msafe));
        __m512 lsum = _mm512_mul_ps(_mm512_loadu_ps(lb), corr);
        for (int i = 0; i < n; ++i) {
          const __m512 p = _mm512_maskz_mov_ps(mk[i], exp512(_mm512_sub_ps(S[i], msafe)));
          lsum = _mm512_add_ps(lsum, p);
          _mm512_store_ps(pbuf + i * 16, p);
        }
        _mm512_storeu_ps(mxb, mnew);
        _mm512_storeu_ps(lb, lsum);
        for (int d0 = 0; d0 < D; d0 += 16) {
          __m512 a[16];
          for (int dd = 0; dd < 16; ++dd) a[dd] = _mm512_mul_ps(_mm512_loadu_ps(accT + (d0 + dd) * 16), corr);
          for (int i = 0; i < n; ++i) {
            const __m512 p = _mm512_load_ps(pbuf + i * 16);
            const float* v = vblk + i * D + d0;
            for (int dd = 0; dd < 16; ++dd) a[dd] = _mm512_fmadd_ps(p, _mm512_set1_ps(v[dd]), a[dd]);
          }
          for (int dd = 0; dd < 16; ++dd) _mm512_storeu_ps(accT + (d0 + dd) * 16, a[dd]);
        }
      }
    }
    k0 += n;
  }

  for (int r = 0; r < rows; ++r)
    for (int64_t hq = 0; hq < j.Hq; ++hq) {
      const int m = r * (int)G + (int)(hq % G);
      const int64_t blk = (hq / G) * NB + m / 16;
      const float l = sc.lv[blk * 16 + m % 16];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      const float* src = &sc.acc[blk * D * 16 + m % 16];
      float* dst = j.out + ((row0 + r) * j.Hq + hq) * D;
      for (int d = 0; d < D; ++d) dst[d] = src[d * 16] * inv;
    }
}

void run_items(Job& j) {
  thread_local Scratch sc;
  for (;;) {
    const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= (int64_t)j.items.size()) return;
    const Item& it = j.items[c];
    const bool lanes = (it.r1 - it.r0) * (j.Hq / j.Hkv) > kDotPathMaxNq;
    switch (j.D) {
      case 64: lanes ? attend_lanes<4>(j, it, sc) : attend<4>(j, it, sc); break;
      case 128: lanes ? attend_lanes<8>(j, it, sc) : attend<8>(j, it, sc); break;
      case 256: lanes ? attend_lanes<16>(j, it, sc) : attend<16>(j, it, sc); break;
      default: break;  // rejected before any item runs
    }
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// Write this step's K/V rows into their slots (K at 2h, V at 2h+1 of the token's row). A row whose slot
// falls outside the page table or whose table entry is not a page is dropped, as pure JAX's scatter does.
void write_kv(Job& j, float* cache, const float* k, const float* v, int64_t ns) {
  const int64_t D = j.D, stride = 2 * j.Hkv * D;
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t lo = j.cu[s], hi = j.cu[s + 1], kv_len = j.kv_lens[s];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t pos = kv_len - (hi - t);
      if (pos < 0 || pos / j.PS >= j.PPS) continue;
      const int64_t pid = j.pages[s * j.PPS + pos / j.PS];
      if (pid < 0 || pid >= j.P) continue;
      float* dst = cache + (pid * j.PS + pos % j.PS) * stride;
      for (int64_t h = 0; h < j.Hkv; ++h) {
        std::copy_n(k + (t * j.Hkv + h) * D, D, dst + 2 * h * D);
        std::copy_n(v + (t * j.Hkv + h) * D, D, dst + (2 * h + 1) * D);
      }
    }
  }
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cache_in,
                              ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> pages,
                              ffi::Buffer<ffi::S32> cu, ffi::Buffer<ffi::S32> num_seqs,
                              ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> cache,
                              float sm_scale, float soft_cap, int32_t sliding_window, int32_t q_tile) {
  auto qd = q.dimensions(), kd = k.dimensions(), cd = cache->dimensions(), pd = pages.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || cd.size() != 4 || pd.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention: q, k, v must be 3-D, kv_cache 4-D, page_indices 2-D");
  const int64_t T = qd[0], Hq = qd[1], D = qd[2], S = pd[0];
  const int64_t Hkv = cd[2] / 2;
  if (cd[3] != D || cd[2] % 2 != 0 || Hkv == 0 || Hq % Hkv != 0 || (D != 64 && D != 128 && D != 256) ||
      kd[0] != T || kd[1] != Hkv || kd[2] != D || v.element_count() != k.element_count() ||
      cache_in.element_count() != cache->element_count() ||
      (int64_t)kv_lens.element_count() != S || (int64_t)cu.element_count() != S + 1 || q_tile < 1)
    return ffi::Error::InvalidArgument("paged_attention: shapes do not match the ragged paged layout");
  auto job = std::make_shared<Job>();
  Job& j = *job;
  // The cache is updated in place: XLA aliases cache_in to the cache result (a donated buffer), and copies
  // it first only where the input is still needed elsewhere.
  if (cache_in.typed_data() != cache->typed_data())
    std::copy_n(cache_in.typed_data(), cache_in.element_count(), cache->typed_data());
  j.q = q.typed_data(); j.cache = cache->typed_data(); j.kv_lens = kv_lens.typed_data();
  j.pages = pages.typed_data(); j.cu = cu.typed_data(); j.out = out->typed_data();
  j.Hq = Hq; j.Hkv = Hkv; j.D = D; j.P = cd[0]; j.PS = cd[1]; j.PPS = pd[1];
  j.scale = sm_scale; j.soft_cap = soft_cap; j.window = sliding_window;

  const int64_t ns = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, S);
  const int64_t end = std::clamp<int64_t>(j.cu[ns], 0, T);  // rows from here on are padding
  for (int64_t s = 0; s < ns; ++s)
    if (j.cu[s] < 0 || j.cu[s + 1] < j.cu[s] || j.cu[s + 1] > T)
      return ffi::Error::InvalidArgument("paged_attention: cu_q_lens is not a ragged split of the rows");
  write_kv(j, cache->typed_data(), k.typed_data(), v.typed_data(), ns);
  std::fill(j.out + end * Hq * D, j.out + T * Hq * D, 0.0f);
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t lo = std::clamp<int64_t>(j.cu[s], 0, end), hi = std::clamp<int64_t>(j.cu[s + 1], lo, end);
    const int64_t prev = std::max<int64_t>(0, j.kv_lens[s] - (hi - lo));
    for (int64_t r0 = 0; r0 < hi - lo; r0 += q_tile) {
      const int64_t r1 = std::min<int64_t>(r0 + q_tile, hi - lo);
      const int64_t keys = sliding_window > 0 ? std::min<int64_t>(prev + r1, sliding_window + r1 - r0) : prev + r1;
      j.items.push_back({(int32_t)s, (int32_t)r0, (int32_t)r1, (r1 - r0 + 8) * keys});
    }
  }
  if (j.items.empty()) return ffi::Error::Success();
  std::stable_sort(j.items.begin(), j.items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min<int64_t>(threads, (int64_t)j.items.size()) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job]() { run_items(*job); });
  run_items(j);
  // Wait for the items the helpers took.
  aphrodite_cpu::wait_until([&] { return j.done.load(std::memory_order_acquire) >= (int64_t)j.items.size(); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AjPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [T, Hq, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [T, Hkv, D] (this step's)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [T, Hkv, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kv_cache [P, PS, 2*Hkv, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_lens [S]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_indices [S, PPS]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // cu_q_lens [S+1]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // num_seqs [1]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [T, Hq, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // kv_cache, aliased to the input
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")        // 0: none
                                  .Attr<int32_t>("sliding_window")  // 0: none
                                  .Attr<int32_t>("q_tile"));
