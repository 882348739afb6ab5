// The CPU prefill GEMM of the Mamba projections (float32; AVX-512 tiles of panels.h, torch's mm
// without AVX-512): out[M, N] (+)= x'[M, K] · W[K, N] (+ bias[N]) for a prefill's many rows, x' = x or
// its rows RMS-normalised and scaled by the block's norm weight (the pre-norm fused into in_proj), the
// product added into out with accumulate (out_proj into the residual). Mamba-1 (models/mamba.py) runs
// all four projections through it, Mamba-2 (models/mamba2.py) in_proj and out_proj; see README.md.
// Items run on the item pool of panels.h (the caller plus at::get_num_threads() - 1 workers).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "panels.h"

namespace {

// ------------------------------------------------------------------------------------- prefill GEMM
// out[M, N] (+)= x[M, K] · W[K, N] (+ bias[N]) for a prefill's many rows, through the AVX-512 tiles of
// panels.h (16 rows x one 16-column panel, accumulators in registers) on a weight stored [K, N] (the
// column-major linear weight's transpose, as post_load keeps it): no weight packed ahead of time (the
// copy of a panel per item costs ~1/(rows of the item) of its products). Items are (block of kRowBlock
// rows, run of kPanelRun panels); an item copies each of its panels [K, 16] into a thread-local buffer,
// then multiplies it with each group of 8..16 rows of its block, those rows interleaved once per call
// into [K, rows] blocks (the tile's broadcasts then address one pointer). At M = 2048, 2 threads, a few
// alternated runs on the shared machine: in_proj (768 -> 3072) and out_proj (1536 -> 768) ran fastest
// with 512 x 2 (256 x 4 close; 128 x 8 and 2048 x 1 slower), ~1.2-1.3x MKL's sgemm.
constexpr int64_t kRowBlock = 512;
constexpr int64_t kPanelRun = 2;
constexpr int64_t kDepth = 256;  // K per partial sum (128: ~10% slower; K in one chain: 2-4x the error)

// tile [mr, 16] = the mr rows of x times one panel p [K, 16], in blocks of kDepth along K whose partial
// sums (in part) are added: each output sums K / kDepth partials of kDepth products, not one chain of K
// (closer to the float64 result, as a blocked sgemm is). kInterleaved: x is [K, mr] (row k at x + k * ldx,
// ldx = mr); else mr rows of x [.., K] with stride ldx.
template <bool kInterleaved>
RNNSERVE_AVX512 inline void group_times_panel(const float* x, int64_t ldx, int64_t mr, const float* p, int64_t K,
                                              float* tile, float* part) {
  panel_group_512<kInterleaved>(x, ldx, mr, p, std::min(K, kDepth), tile);
  for (int64_t k0 = kDepth; k0 < K; k0 += kDepth) {
    const float* xk = x + (kInterleaved ? k0 * ldx : k0);
    panel_group_512<kInterleaved>(xk, ldx, mr, p + k0 * kPanel, std::min(K - k0, kDepth), part);
    for (int64_t i = 0; i < mr; ++i)
      _mm512_store_ps(tile + i * kPanel,
                      _mm512_add_ps(_mm512_load_ps(tile + i * kPanel), _mm512_load_ps(part + i * kPanel)));
  }
}

// tile [mr, 16] into the mr rows of c (row stride ldc) at the panel's nn columns, + bias[nn] when given,
// + c with accumulate; masked vector stores (a scalar loop here cost as much as the products for K = 48,
// dt_proj).
RNNSERVE_AVX512 inline void store_tile(const float* tile, int64_t mr, float* c, int64_t ldc, int64_t nn,
                                       const float* bias, bool accumulate) {
  const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1);
  const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int64_t i = 0; i < mr; ++i) {
    float* cr = c + i * ldc;
    __m512 v = _mm512_add_ps(_mm512_load_ps(tile + i * kPanel), bv);
    if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, cr));
    _mm512_mask_storeu_ps(cr, mask, v);
  }
}

// Panels [q0, q1) x row groups [g0, g1) of gemm_rows: each panel of W [K, N] copied into panel (K x 16,
// 64-byte aligned, zero past N), then multiplied with each group's interleaved rows.
RNNSERVE_AVX512 __attribute__((noinline)) void gemm_rows_item(const float* xt, const float* w, int64_t ldw,
                                                               const float* bias, float* c, int64_t ldc, int64_t M,
                                                               int64_t K, int64_t N, bool accumulate, int64_t groups,
                                                               int64_t g0, int64_t g1, int64_t q0, int64_t q1,
                                                               float* panel) {
  alignas(64) float tile[kMaxRows512 * kPanel];
  alignas(64) float part[kMaxRows512 * kPanel];
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t n0 = q * kPanel, nn = std::min(kPanel, N - n0);
    for (int64_t k = 0; k < K; ++k) {
      const float* src = w + k * ldw + n0;
      float* dst = panel + k * kPanel;
      if (nn == kPanel) {
        _mm512_store_ps(dst, _mm512_loadu_ps(src));
      } else {
        for (int64_t j = 0; j < kPanel; ++j) dst[j] = j < nn ? src[j] : 0.0f;
      }
    }
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t m0 = M * g / groups, mr = M * (g + 1) / groups - m0;
      group_times_panel<true>(xt + m0 * K, mr, mr, panel, K, tile, part);
      store_tile(tile, mr, c + m0 * ldc + n0, ldc, nn, bias ? bias + n0 : nullptr, accumulate);
    }
  }
}

// Narrow outputs (N <= kNarrow, e.g. x_proj's 80): the whole W packed once per call into panels
// [NP, K, 16] (480 KB for 1536 x 80, L2), items of 8 rows read in place (no interleave pass, which
// the few products per row do not repay; 8 row pointers fit in registers), each row group times every
// panel, kDepth partial sums as in gemm_rows_item.
constexpr int64_t kNarrow = 128;

RNNSERVE_AVX512 __attribute__((noinline)) void gemm_narrow_item(const float* x, int64_t ldx, const float* p,
                                                                 const float* bias, float* c, int64_t ldc,
                                                                 int64_t m0, int64_t mr, int64_t K, int64_t N,
                                                                 bool accumulate) {
  alignas(64) float tile[8 * kPanel];
  alignas(64) float part[8 * kPanel];
  const int64_t NP = (N + kPanel - 1) / kPanel;
  const float* xm = x + m0 * ldx;
  for (int64_t q = 0; q < NP; ++q) {
    const float* pq = p + q * K * kPanel;
    const int64_t n0 = q * kPanel, nn = std::min(kPanel, N - n0);
    group_times_panel<false>(xm, ldx, mr, pq, K, tile, part);
    store_tile(tile, mr, c + m0 * ldc + n0, ldc, nn, bias ? bias + n0 : nullptr, accumulate);
  }
}

// Row i of x [.., K] times rsqrt(mean(x_i^2) + eps) (float accumulation, as F.rms_norm on float32).
float rms_scale(const float* x, int64_t K, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum256(acc);
  for (; k < K; ++k) ss += x[k] * x[k];
  return 1.0f / std::sqrt(ss / static_cast<float>(K) + eps);
}

// C[M, N] (+)= X' · W (+ bias) with X' = X, or with norm_w the rows of X RMS-normalised and scaled by
// norm_w [K] (the block's pre-norm, applied while the rows are interleaved: no normalised copy of X).
void gemm_rows(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* c, int64_t ldc,
               int64_t M, int64_t K, int64_t N, bool accumulate, const float* norm_w, float eps) {
  if (N <= kNarrow && norm_w == nullptr) {
    const at::Tensor packed = pack_weight(at::from_blob(const_cast<float*>(w), {K, N}, {ldw, 1}, at::kFloat), true);
    const float* p = packed.data_ptr<float>();
    parallel_items((M + 7) / 8, [&](int64_t g) {
      gemm_narrow_item(x, ldx, p, bias, c, ldc, g * 8, std::min<int64_t>(8, M - g * 8), K, N, accumulate);
    });
    return;
  }
  const int64_t groups = (M + kMaxRows512 - 1) / kMaxRows512;  // groups of 8..16 rows, as even as can be
  // Group g's rows at m0 * K, [K, mr]; the calling thread's buffer, kept between calls (a fresh 6-12 MB
  // vector per call is zeroed and page-faulted in again).
  thread_local std::vector<float> xbuf;
  if (static_cast<int64_t>(xbuf.size()) < M * K) xbuf.resize(M * K);
  float* xt = xbuf.data();
  parallel_items(groups, [&](int64_t g) {
    const int64_t m0 = M * g / groups, mr = M * (g + 1) / groups - m0;
    float* dst = xt + m0 * K;
    float r[kMaxRows512];  // each row's norm scale (1 without a norm)
    for (int64_t i = 0; i < mr; ++i) r[i] = norm_w != nullptr ? rms_scale(x + (m0 + i) * ldx, K, eps) : 1.0f;
    // k outer, rows inner: the writes run in order through dst, the mr reads stay in mr lines of L1
    // (rows outer, one float per 64-byte line written: 2048 x 768, 1 thread, ~1.9 ms against ~1.6).
    for (int64_t k = 0; k < K; ++k) {
      const float s = norm_w != nullptr ? norm_w[k] : 1.0f;
      for (int64_t i = 0; i < mr; ++i) dst[k * mr + i] = x[(m0 + i) * ldx + k] * r[i] * s;
    }
  });
  const int64_t NP = (N + kPanel - 1) / kPanel, runs = (NP + kPanelRun - 1) / kPanelRun;
  const int64_t gpb = std::max<int64_t>(1, kRowBlock / kMaxRows512), blocks = (groups + gpb - 1) / gpb;
  parallel_items(blocks * runs, [&](int64_t item) {
    thread_local std::vector<float> wbuf;
    if (static_cast<int64_t>(wbuf.size()) < K * kPanel + 16) wbuf.resize(K * kPanel + 16);
    float* panel = wbuf.data() + (16 - reinterpret_cast<uintptr_t>(wbuf.data()) / 4 % 16) % 16;  // 64-byte aligned
    const int64_t g0 = item / runs * gpb, q0 = item % runs * kPanelRun;
    gemm_rows_item(xt, w, ldw, bias, c, ldc, M, K, N, accumulate, groups, g0, std::min(groups, g0 + gpb), q0,
                   std::min(NP, q0 + kPanelRun), panel);
  });
}

// out [M, N] (+)= x' [M, K] · w_kn [K, N] (+ bias [N]), x' = x or, with norm_weight [K], x's rows
// RMS-normalised (eps) and scaled by it. x and out float32 with unit column stride (rows may be strided),
// w_kn contiguous; out may not overlap x. Without AVX-512, torch ops.
void linear_prefill(const at::Tensor& x, const at::Tensor& w_kn, const c10::optional<at::Tensor>& bias,
                    at::Tensor& out, bool accumulate, const c10::optional<at::Tensor>& norm_weight, double eps) {
  const int64_t M = x.size(0), K = x.size(1), N = w_kn.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_kn.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
                  x.device().is_cpu() && w_kn.device().is_cpu() && out.device().is_cpu(),
              "linear_prefill: float32 CPU tensors");
  TORCH_CHECK(x.dim() == 2 && w_kn.dim() == 2 && out.dim() == 2 && w_kn.size(0) == K && out.size(0) == M &&
                  out.size(1) == N,
              "linear_prefill: x ", x.sizes(), " w_kn ", w_kn.sizes(), " out ", out.sizes(), " do not fit");
  TORCH_CHECK((x.stride(1) == 1 || K <= 1) && (out.stride(1) == 1 || N <= 1) && w_kn.is_contiguous(),
              "linear_prefill: x and out need unit column stride, w_kn contiguous");
  const float* bp = vec_ptr(bias, "bias", N);
  const float* np = vec_ptr(norm_weight, "norm_weight", K);
  if (M == 0) return;
  if (!use_avx512()) {
    const at::Tensor xn =
        np ? at::rms_norm(x, {K}, norm_weight, eps) : x;
    at::Tensor prod = at::mm(xn, w_kn);
    if (bp) prod.add_(*bias);
    if (accumulate) {
      out.add_(prod);
    } else {
      out.copy_(prod);
    }
    return;
  }
  gemm_rows(x.data_ptr<float>(), x.stride(0), w_kn.data_ptr<float>(), N, bp, out.data_ptr<float>(), out.stride(0), M,
            K, N, accumulate, np, static_cast<float>(eps));
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu_prefill_linear, m) {
  m.def(
      "linear_prefill(Tensor x, Tensor w_kn, Tensor? bias, Tensor(a!) out, bool accumulate, Tensor? norm_weight, "
      "float eps) -> ()");
}

TORCH_LIBRARY_IMPL(rnnserve_cpu_prefill_linear, CPU, m) { m.impl("linear_prefill", &linear_prefill); }
