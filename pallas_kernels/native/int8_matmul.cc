// y[M, N] = x[M, K] @ W[K, N] with W stored as 8-bit blocks, as an XLA FFI custom call (CPU).
//
// Why: at batch 1 the fp32 step is bound by reading the weights; 8-bit weights are a quarter of the bytes.
// W is quantized per output column in blocks of QB = 32 along K, asymmetrically: w = d * q + m with
// q in [0, 255] (u8) and one f32 (d, m) per block. That grid holds a GGUF Q4_1 block exactly (its 16
// levels are every 17th step), so the default model's weights pass through unchanged. The activation row
// is quantized on the fly to s8 in the same blocks (one scale per block, like llama.cpp's q8 activations),
// so the inner loop is AVX-512 VNNI vpdpbusd (u8 x s8 -> s32), and a block contributes
// sx * (d * sum(q * qx) + m * sum(qx)). With the `residual` attribute the rounding error of qx is
// quantized again into a second s8 plane (qx' = 254 qx + qx2, scale sx / 254): ~15-bit activations for
// twice the integer work, which keeps greedy output with fp32's (int8 activations alone flip near-ties).
//
// Layout (built by int8_matmul.py `pack_blocks`): q as u8 [Np/16, Kp/4, 16, 4] (Np, Kp: N, K padded to 16
// and QB). One 64-byte load holds 4 consecutive k of 16 outputs, so a broadcast of 4 activation bytes feeds
// 16 dot products at once (no horizontal sums). dm: f32 [Np/16, Kp/QB, 2, 16] (d then m of 16 outputs), or
// f16 where that holds the weights exactly (a Q4_1 GGUF's scales are f16): fewer bytes to stream.
//
// 4-bit weights (attribute `w4`): where every block of a matrix is on the 16-level grid (q = 17 i, as a
// GGUF Q4_1 block is), the packed bytes hold two k4 steps, i of k4 = 2 s in the low nibble and of 2 s + 1 in
// the high one ([Np/16, Kp/8, 16, 4] bytes), with d scaled by 17: the same products, half the weight bytes.
// At decode the step streams every weight from memory, so the bytes are what it waits on.
//
// Threads: XLA's intra-op pool (ffi::ThreadPool). The work is split into chunks of output tiles taken
// from an atomic counter; the calling thread takes chunks too, so it never waits on a task that has not
// started, and a task that starts late finds no chunk and only drops its reference to the shared state.
// The activation quantization is the first phase of the same scheme (chunks of rows, then a wait until
// every row is done): done serially it was a third of a 1024-token call. Tiles: 32 outputs x 4 tokens.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "spin_wait.h"

namespace ffi = xla::ffi;

namespace {

constexpr int QB = 32;  // activation quantization block along K

struct Job {
  const uint8_t* w;      // packed weights
  const void* dm;        // [Np/16, nb, 2, 16] block scales and offsets, f32 or (dm16) f16
  bool dm16;
  const float* x;        // [M, K] the f32 activations ([M, 2K] gate | up with silu_mul)
  bool silu_mul;         // the activation row is silu(gate) * up, computed here (the MLP's down projection)
  int8_t* xq;            // [M, Kp] quantized activations
  int8_t* xq2;           // [M, Kp] their quantized residuals (residual mode only, else nullptr)
  float* xs;             // [M, nb] activation block scales
  float* xm;             // [M, nb] sx * sum(xq) per block (the offsets' factor)
  float* y;              // [M, N]
  int64_t M, K, N, Kp, nb;  // nb = Kp / QB
  bool w4;               // 4-bit weights: two k4 steps per 64-byte load (see the top)
  int64_t tiles;         // output tiles of 32 columns (the last may be 16 or fewer)
  int64_t tiles_per_chunk, chunks;
  int64_t rows_per_qchunk, qchunks;  // phase 1: the activation quantization, by rows
  std::atomic<int64_t> qnext{0};
  std::atomic<int64_t> qdone{0};
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Scratch for the quantized activations, kept per calling thread and grown as needed: a fresh allocation
// per call costs page faults and a zero fill (a third of a 1024-row call's time at K = 1536).
struct Scratch {
  std::vector<int8_t> q, q2;
  std::vector<float> s, m;
};

using aphrodite_cpu::wait_until;

// MT tokens x G groups of 16 outputs, starting at output group g0 and token m0. R: residual mode, the
// activation is q + q2 / 254 in units of the block scale (two s8 planes, two vpdpbusd per weight load).
// W4: 4-bit weights, one load holds the weights of two k4 steps (low and high nibbles).
template <int MT, int G, bool R, bool W4>
inline void micro(const Job& j, int64_t g0, int64_t m0) {
  const int64_t group_bytes = W4 ? j.Kp * 8 : j.Kp * 16;
  const uint8_t* wg[G];
  for (int g = 0; g < G; ++g) wg[g] = j.w + (g0 + g) * group_bytes;
  __m512 facc[MT][G];
  for (int t = 0; t < MT; ++t)
    for (int g = 0; g < G; ++g) facc[t][g] = _mm512_setzero_ps();
  const int8_t* xrow[MT];
  const int8_t* xrow2[MT];
  for (int t = 0; t < MT; ++t) {
    xrow[t] = j.xq + (m0 + t) * j.Kp;
    xrow2[t] = R ? j.xq2 + (m0 + t) * j.Kp : nullptr;
  }
  int64_t dmg[G];  // element offsets of each group's scales
  for (int g = 0; g < G; ++g) dmg[g] = (g0 + g) * j.nb * 32;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < j.nb; ++b) {
    __m512i iacc[MT][G], iacc2[MT][G];
    for (int t = 0; t < MT; ++t)
      for (int g = 0; g < G; ++g) iacc[t][g] = iacc2[t][g] = _mm512_setzero_si512();
    // One k4 step: 4 inputs of 16 outputs per group against MT tokens' 4 activation bytes.
    auto step = [&](int64_t k4, const __m512i* wv) __attribute__((always_inline)) {
      for (int t = 0; t < MT; ++t) {
        int32_t xi;
        std::memcpy(&xi, xrow[t] + k4 * 4, 4);
        __m512i xb = _mm512_set1_epi32(xi);
        for (int g = 0; g < G; ++g) iacc[t][g] = _mm512_dpbusd_epi32(iacc[t][g], wv[g], xb);
        if (R) {
          std::memcpy(&xi, xrow2[t] + k4 * 4, 4);
          __m512i xb2 = _mm512_set1_epi32(xi);
          for (int g = 0; g < G; ++g) iacc2[t][g] = _mm512_dpbusd_epi32(iacc2[t][g], wv[g], xb2);
        }
      }
    };
    if (W4) {
#pragma GCC unroll 4
      for (int kk = 0; kk < QB / 8; ++kk) {
        const int64_t k8 = b * (QB / 8) + kk;  // two k4 steps: 2 k8 and 2 k8 + 1
        __m512i lo[G], hi[G];
        for (int g = 0; g < G; ++g) {
          const __m512i v = _mm512_loadu_si512(wg[g] + k8 * 64);
          lo[g] = _mm512_and_si512(v, nib);
          hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        }
        step(2 * k8, lo);
        step(2 * k8 + 1, hi);
      }
    } else {
#pragma GCC unroll 8
      for (int kk = 0; kk < QB / 4; ++kk) {
        const int64_t k4 = b * (QB / 4) + kk;
        __m512i wv[G];
        for (int g = 0; g < G; ++g) wv[g] = _mm512_loadu_si512(wg[g] + k4 * 64);
        step(k4, wv);
      }
    }
    __m512 d[G], m[G];
    for (int g = 0; g < G; ++g) {
      const int64_t o = dmg[g] + b * 32;
      if (j.dm16) {
        const uint16_t* h = static_cast<const uint16_t*>(j.dm) + o;
        d[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)h));
        m[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + 16)));
      } else {
        const float* f = static_cast<const float*>(j.dm) + o;
        d[g] = _mm512_loadu_ps(f);
        m[g] = _mm512_loadu_ps(f + 16);
      }
    }
    for (int t = 0; t < MT; ++t) {
      __m512 sx = _mm512_set1_ps(j.xs[(m0 + t) * j.nb + b]);
      __m512 xm = _mm512_set1_ps(j.xm[(m0 + t) * j.nb + b]);
      for (int g = 0; g < G; ++g) {
        __m512 f = _mm512_cvtepi32_ps(iacc[t][g]);
        if (R) f = _mm512_fmadd_ps(f, _mm512_set1_ps(254.0f), _mm512_cvtepi32_ps(iacc2[t][g]));
        facc[t][g] = _mm512_fmadd_ps(f, _mm512_mul_ps(d[g], sx), facc[t][g]);
        facc[t][g] = _mm512_fmadd_ps(m[g], xm, facc[t][g]);
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const int64_t n0 = (g0 + g) * 16;
    if (n0 >= j.N) break;
    const int64_t left = j.N - n0;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    for (int t = 0; t < MT; ++t) _mm512_mask_storeu_ps(j.y + (m0 + t) * j.N + n0, mask, facc[t][g]);
  }
}

template <int G, bool R, bool W4>
void tile(const Job& j, int64_t g0) {
  int64_t m = 0;
  if (R) {  // twice the accumulators: 4 tokens x 2 groups x 2 planes is 16 of the 32 zmm registers
    for (; m + 4 <= j.M; m += 4) micro<4, G, R, W4>(j, g0, m);
    for (; m + 2 <= j.M; m += 2) micro<2, G, R, W4>(j, g0, m);
    if (m < j.M) micro<1, G, R, W4>(j, g0, m);
    return;
  }
  for (; m + 4 <= j.M; m += 4) micro<4, G, R, W4>(j, g0, m);
  switch (j.M - m) {
    case 3: micro<3, G, R, W4>(j, g0, m); break;
    case 2: micro<2, G, R, W4>(j, g0, m); break;
    case 1: micro<1, G, R, W4>(j, g0, m); break;
    default: break;
  }
}

void run_chunks(Job& j) {
  const int64_t groups = (j.N + 15) / 16;
  for (;;) {
    const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= j.chunks) return;
    const int64_t t_end = std::min(j.tiles, (c + 1) * j.tiles_per_chunk);
    for (int64_t t = c * j.tiles_per_chunk; t < t_end; ++t) {
      const int64_t g0 = t * 2;
      const bool two = g0 + 2 <= groups;
      const bool r = j.xq2 != nullptr;
      if (j.w4) {
        if (r) two ? tile<2, true, true>(j, g0) : tile<1, true, true>(j, g0);
        else two ? tile<2, false, true>(j, g0) : tile<1, false, true>(j, g0);
      } else {
        if (r) two ? tile<2, true, false>(j, g0) : tile<1, true, false>(j, g0);
        else two ? tile<2, false, false>(j, g0) : tile<1, false, false>(j, g0);
      }
    }
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// e^x for f32 lanes (Cephes' expf polynomial, ~1 ulp; x clamped to the finite range).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// silu(g) * u = g / (1 + e^-g) * u
inline __m512 silu_mul_ps(__m512 g, __m512 u) {
  const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

// Per token and block of QB: scale = max|x| / 127, q = round(x / scale), and scale * sum(q). Residual
// mode adds q2 = round(254 * (x / scale - q)) and uses scale / 254 with q' = 254 q + q2.
void quantize_rows(const Job& j, int64_t m_begin, int64_t m_end) {
  const bool residual = j.xq2 != nullptr;
  const int64_t K = j.K;
  for (int64_t m = m_begin; m < m_end; ++m) {
    const float* xr = j.x + m * (j.silu_mul ? 2 * K : K);
    int8_t* qr = j.xq + m * j.Kp;
    int8_t* q2r = residual ? j.xq2 + m * j.Kp : nullptr;
    for (int64_t b = 0; b < j.nb; ++b) {
      const int64_t k0 = b * QB;
      __m512 lo, hi;
      if (k0 + QB <= K) {
        lo = _mm512_loadu_ps(xr + k0);
        hi = _mm512_loadu_ps(xr + k0 + 16);
      } else {  // the tail block: zeros past K (so the padded q are 0 too)
        const int64_t n = std::max<int64_t>(0, K - k0);
        const __mmask32 mask = n >= 32 ? 0xFFFFFFFFu : ((1u << n) - 1u);
        lo = _mm512_maskz_loadu_ps((__mmask16)(mask & 0xFFFF), xr + k0);
        hi = _mm512_maskz_loadu_ps((__mmask16)(mask >> 16), xr + k0 + 16);
      }
      if (j.silu_mul) {  // zeros past K stay zero: silu(0) * 0
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(QB, K - k0));
        const __mmask32 mask = n >= 32 ? 0xFFFFFFFFu : ((1u << n) - 1u);
        lo = silu_mul_ps(lo, _mm512_maskz_loadu_ps((__mmask16)(mask & 0xFFFF), xr + K + k0));
        hi = silu_mul_ps(hi, _mm512_maskz_loadu_ps((__mmask16)(mask >> 16), xr + K + k0 + 16));
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float d = amax / 127.0f;
      const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512 slo = _mm512_mul_ps(lo, vid), shi = _mm512_mul_ps(hi, vid);
      __m512i qlo = _mm512_cvtps_epi32(slo);  // round to nearest even
      __m512i qhi = _mm512_cvtps_epi32(shi);
      _mm_storeu_si128((__m128i*)(qr + k0), _mm512_cvtsepi32_epi8(qlo));
      _mm_storeu_si128((__m128i*)(qr + k0 + 16), _mm512_cvtsepi32_epi8(qhi));
      __m512i qs = _mm512_add_epi32(qlo, qhi);
      float scale = d;
      if (residual) {
        const __m512 f254 = _mm512_set1_ps(254.0f);
        // (x * id - q) * 254, with x * id rounded to f32 first (as the NumPy model does)
        __m512i q2lo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(slo, _mm512_cvtepi32_ps(qlo)), f254));
        __m512i q2hi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(shi, _mm512_cvtepi32_ps(qhi)), f254));
        _mm_storeu_si128((__m128i*)(q2r + k0), _mm512_cvtsepi32_epi8(q2lo));
        _mm_storeu_si128((__m128i*)(q2r + k0 + 16), _mm512_cvtsepi32_epi8(q2hi));
        qs = _mm512_add_epi32(_mm512_mullo_epi32(qs, _mm512_set1_epi32(254)), _mm512_add_epi32(q2lo, q2hi));
        scale = d / 254.0f;
      }
      j.xs[m * j.nb + b] = scale;
      j.xm[m * j.nb + b] = scale * (float)_mm512_reduce_add_epi32(qs);
    }
  }
}

// One thread's share: quantization chunks (rows), then, once every row is quantized, output tiles.
void run_job(Job& j) {
  for (;;) {
    const int64_t c = j.qnext.fetch_add(1, std::memory_order_relaxed);
    if (c >= j.qchunks) break;
    quantize_rows(j, c * j.rows_per_qchunk, std::min(j.M, (c + 1) * j.rows_per_qchunk));
    j.qdone.fetch_add(1, std::memory_order_release);
  }
  // Every chunk was taken by a running thread, so this wait ends.
  wait_until([&] { return j.qdone.load(std::memory_order_acquire) >= j.qchunks; });
  run_chunks(j);
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                          ffi::AnyBuffer dm, ffi::ResultBuffer<ffi::F32> y, int32_t residual,
                          int32_t w4, int32_t silu_mul) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("int8_matmul: x, w and y must be 2-D");
  if (silu_mul && xd.size() == 2 && xd[1] % 2 != 0)
    return ffi::Error::InvalidArgument("int8_matmul: silu_mul needs x = [gate | up] of even width");
  const int64_t M = xd[0], K = silu_mul ? xd[1] / 2 : xd[1], Np = wd[0], Kp = w4 ? 2 * wd[1] : wd[1], N = yd[1];
  const bool dm16 = dm.element_type() == ffi::DataType::F16;
  if (!dm16 && dm.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("int8_matmul: dm must be f32 or f16");
  if (yd[0] != M || Kp % QB != 0 || Np % 16 != 0 || K > Kp || N > Np || dm.element_count() != (size_t)(Np * (Kp / QB) * 2))
    return ffi::Error::InvalidArgument("int8_matmul: shapes do not match the packed weight layout");
  if (M == 0 || N == 0) return ffi::Error::Success();
  thread_local Scratch scratch;
  const int64_t nb = Kp / QB;
  if ((int64_t)scratch.q.size() < M * Kp) scratch.q.resize(M * Kp);
  if (residual && (int64_t)scratch.q2.size() < M * Kp) scratch.q2.resize(M * Kp);
  if ((int64_t)scratch.s.size() < M * nb) { scratch.s.resize(M * nb); scratch.m.resize(M * nb); }
  auto job = std::make_shared<Job>();
  Job& j = *job;
  j.M = M; j.K = K; j.N = N; j.Kp = Kp; j.nb = nb; j.w4 = w4 != 0; j.silu_mul = silu_mul != 0;
  j.x = x.typed_data(); j.w = w.typed_data(); j.dm = dm.untyped_data(); j.dm16 = dm16; j.y = y->typed_data();
  j.xq = scratch.q.data(); j.xq2 = residual ? scratch.q2.data() : nullptr;
  j.xs = scratch.s.data(); j.xm = scratch.m.data();
  j.tiles = (N + 31) / 32;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // About 4 chunks per thread balances a busy core against the per-chunk atomics.
  j.tiles_per_chunk = std::max<int64_t>(1, j.tiles / (threads * 4));
  j.chunks = (j.tiles + j.tiles_per_chunk - 1) / j.tiles_per_chunk;
  // Quantization in row chunks of about 64 Ki activations (a few microseconds each).
  j.rows_per_qchunk = std::max<int64_t>(1, (int64_t)65536 / Kp);
  j.qchunks = (M + j.rows_per_qchunk - 1) / j.rows_per_qchunk;
  const int64_t helpers = std::min<int64_t>(threads, std::max(j.chunks, j.qchunks)) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([job]() { run_job(*job); });
  run_job(j);
  wait_until([&] { return j.done.load(std::memory_order_acquire) >= j.chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AjInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("residual")
                                  .Attr<int32_t>("w4")
                                  .Attr<int32_t>("silu_mul"));
