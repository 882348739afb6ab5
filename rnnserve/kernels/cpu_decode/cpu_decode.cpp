// The fused CPU decode step of Mamba-1 and Mamba-2 (float32 activations and state, AVX2 + FMA; float32
// or int8 weights), one call per model step.
//
// Built on first use by torch.utils.cpp_extension (see __init__.py) and registered as
// torch.ops.rnnserve_cpu.*. What it does per step:
//   - one C++ call for the whole model (embedding, 24 layers, final norm, head): no Python per op;
//   - the matrix products on weights packed once (pack_weight / pack_weight_int8) into 16-column panels
//     along K, through register-tiled kernels (gemm_packed); the unpacked [in, out] layout the model
//     stores still works (gemm_kn, MKL for one row) for callers that pass it;
//   - every stage's work cut into items that the calling thread and this file's own workers take from
//     a shared counter (ItemPool), so a descheduled thread holds up a stage by one item at most;
//   - conv shift, softplus, exp decay, state update (in place, by slot) and gating fused in one pass
//     per layer, vectorised over the state dimension, with denormals flushed inside those loops.
// Only scratch activations are allocated per step (a few [B, width] buffers), none per layer.
// The AVX2 math, the item pool, the weight panels and their kernels are in panels.h (shared with the
// other fused decode extensions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <thread>
#include <vector>

#include "panels.h"

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------- GEMM

// C[M, N] += X[M, K] · W[K, N] for columns [n0, n1), streaming W in the order it lies in memory: four
// rows of W at a time (four sequential streams) update a chunk of C's columns held in L1 (L2 for many
// rows). Measured here against a register-tiled kernel that walks 16-column panels of W down K (one
// cache line per row, N floats apart): the panel walk was 1.5-2x slower at 1 row and no faster at 32,
// and MKL's sgemm/sgemv (F.linear on the same layout) no faster at 1-32 rows.
void gemv_rows(const float* x, int64_t ldx, const float* w, float* c, int64_t ldc, int64_t M, int64_t K, int64_t N,
               int64_t n0, int64_t n1) {
  const int64_t NC = M <= 4 ? 1024 : 256;
  for (int64_t nc = n0; nc < n1; nc += NC) {
    const int64_t nce = std::min(n1, nc + NC);
    const int64_t nv = nc + (nce - nc) / 8 * 8;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const float* w0 = w + k * N;
      for (int r = 0; r < M; ++r) {
        const float* xr = x + r * ldx + k;
        const __m256 a0 = _mm256_broadcast_ss(xr), a1 = _mm256_broadcast_ss(xr + 1);
        const __m256 a2 = _mm256_broadcast_ss(xr + 2), a3 = _mm256_broadcast_ss(xr + 3);
        float* cr = c + r * ldc;
        for (int64_t n = nc; n < nv; n += 8) {
          __m256 acc = _mm256_loadu_ps(cr + n);
          acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + n), acc);
          acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w0 + N + n), acc);
          acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w0 + 2 * N + n), acc);
          acc = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w0 + 3 * N + n), acc);
          _mm256_storeu_ps(cr + n, acc);
        }
        for (int64_t n = nv; n < nce; ++n)
          cr[n] += xr[0] * w0[n] + xr[1] * w0[N + n] + xr[2] * w0[2 * N + n] + xr[3] * w0[3 * N + n];
      }
    }
    for (; k < K; ++k)
      for (int r = 0; r < M; ++r)
        for (int64_t n = nc; n < nce; ++n) c[r * ldc + n] += x[r * ldx + k] * w[k * N + n];
  }
}

// C[M, N] = X[M, K] · W[K, N] (+ bias[N]) (+ C when accumulate): W a contiguous [K, N] matrix (a linear
// layer's weight stored column-major). The threads split the columns in blocks of 16.
void gemm_kn(const float* x, int64_t ldx, const float* w, const float* bias, float* c, int64_t ldc, int64_t M,
             int64_t K, int64_t N, bool accumulate) {
  parallel_ranges((N + 15) / 16, 8, [&](int64_t b0, int64_t b1) {
    const int64_t lo = b0 * 16, hi = std::min(N, b1 * 16);
    for (int64_t m = 0; m < M; ++m) {
      float* cr = c + m * ldc;
      for (int64_t n = lo; n < hi; ++n) cr[n] = (accumulate ? cr[n] : 0.0f) + (bias ? bias[n] : 0.0f);
    }
    gemv_rows(x, ldx, w, c, ldc, M, K, N, lo, hi);
  });
}


// y[M, D] = rms_norm(x[M, D]) * weight (as F.rms_norm: x / sqrt(mean(x²) + eps) * w).
void rms_norm_rows(const float* x, const float* weight, float* y, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * D;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum256(acc);
    for (; i < D; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t j = 0; j < D; ++j) y[m * D + j] = xr[j] * inv * weight[j];
  }
}

// Causal depthwise conv step for channels [c0, c1) of one row: window = state[c, 0..K-2] then x[c];
// state shifted left in place; out[c] = bias + Σ w[c, k] window[k], then silu. state [C, K-1], w [C, K].
void conv_step(const float* x, float* state, const float* w, const float* bias, float* out, int64_t c0, int64_t c1,
               int64_t K) {
  const int64_t km1 = K - 1;
  for (int64_t c = c0; c < c1; ++c) {
    float* s = state + c * km1;
    const float* wc = w + c * K;
    float acc = bias ? bias[c] : 0.0f;
    for (int64_t k = 0; k < km1; ++k) acc += wc[k] * s[k];
    acc += wc[km1] * x[c];
    for (int64_t k = 0; k + 1 < km1; ++k) s[k] = s[k + 1];
    s[km1 - 1] = x[c];
    out[c] = acc;
  }
  silu_inplace(out + c0, c1 - c0);
}

const float* fptr(const Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// out (+)= x · w (+ bias): x [M, K] (rows may be strided), out [M, N] contiguous, w either packed
// [ceil(N/16), K, 16] (pack_weight; what the fused decoders pass) or a contiguous [K, N] matrix. An
// unpacked w with one row goes to MKL's sgemv, more rows to gemm_kn.
void gemm(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& out, bool accumulate) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  if (w.dim() == 3) {
    const bool int8 = w.scalar_type() == at::kChar;
    TORCH_CHECK(w.size(0) == (N + kPanel - 1) / kPanel && w.size(1) == (int8 ? K + 4 : K) && w.size(2) == kPanel,
                "packed weight ", w.sizes(), " does not fit x ", x.sizes(), " -> out ", out.sizes());
    if (int8) {
      gemm_packed(x.data_ptr<float>(), x.stride(0), w.data_ptr<int8_t>(), fptr(bias), out.data_ptr<float>(), N, M,
                  K, N, accumulate);
    } else {
      gemm_packed(x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(), fptr(bias), out.data_ptr<float>(), N, M,
                  K, N, accumulate);
    }
    return;
  }
  TORCH_CHECK(w.dim() == 2 && w.size(0) == K && w.size(1) == N, "weight ", w.sizes(), " does not fit ", x.sizes(),
              " -> ", out.sizes());
  if (M == 1) {
    if (accumulate) {
      out.addmm_(x, w);
    } else {
      at::mm_out(out, x, w);
    }
    if (bias.defined() && bias.numel()) out.add_(bias);
    return;
  }
  gemm_kn(x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(), fptr(bias), out.data_ptr<float>(), N, M, K, N,
          accumulate);
}

// The head: logits [M, V] from the normalised last hidden state. head_w packed [ceil(V/16), D, 16], or
// [D, V] (head_kn, column-major), or a tied head [V, D] (row-major) for MKL's sgemm / sgemv, which
// read it ~30% faster than a dot-product kernel here.
Tensor head_logits(const Tensor& hn, const Tensor& head_w, bool head_kn, int64_t V) {
  const int64_t M = hn.size(0);
  Tensor out = at::empty({M, V}, hn.options());
  if (head_w.dim() == 3 || head_kn) {
    gemm(hn, head_w, Tensor(), out, false);
    return out;
  }
  return at::mm_out(out, hn, head_w.t());  // head_w [V, D]
}

// Every slot id indexes a row of the state pools (the kernels write there without further checks).
void check_slots(const Tensor& slots, const Tensor& ids, at::TensorList conv_state, at::TensorList ssm_state) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && ids.scalar_type() == at::kLong && slots.numel() == ids.numel(),
              "slot_ids and input_ids must be int64 of the same length");
  TORCH_CHECK(!conv_state.empty() && conv_state.size() == ssm_state.size(), "one conv and one ssm state per layer");
  const int64_t S = std::min(conv_state[0].size(0), ssm_state[0].size(0));
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < slots.numel(); ++b)
    TORCH_CHECK(slot[b] >= 0 && slot[b] < S, "slot id ", slot[b], " out of range [0, ", S, ")");
}

Tensor embed(const Tensor& ids, const Tensor& emb) {
  const int64_t M = ids.size(0), D = emb.size(1);
  Tensor h = at::empty({M, D}, emb.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(id[m] >= 0 && id[m] < emb.size(0), "token id ", id[m], " out of range");
    std::copy_n(emb.data_ptr<float>() + id[m] * D, D, h.data_ptr<float>() + m * D);
  }
  return h;
}

// ---------------------------------------------------------------------------------------------- ops

// X [M, K] · W [K, N] through gemm_kn whatever M (for tests of the kernel alone).
Tensor linear(const Tensor& x, const Tensor& w) {
  check_f32(x, "x");
  check_f32(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "2-D contiguous inputs");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.size(0) == K, "inner dimensions differ");
  Tensor out = at::empty({M, w.size(1)}, x.options());
  gemm_kn(x.data_ptr<float>(), K, w.data_ptr<float>(), nullptr, out.data_ptr<float>(), w.size(1), M, K, w.size(1),
          false);
  return out;
}


// X [M, K] · W for a packed W (pack_weight or pack_weight_int8) with n output columns, through gemm_packed (tests).
Tensor linear_packed(const Tensor& x, const Tensor& p, int64_t n) {
  check_f32(x, "x");
  TORCH_CHECK(p.device().is_cpu() && (p.scalar_type() == at::kFloat || p.scalar_type() == at::kChar),
              "p must be float32 or int8 panels");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && p.dim() == 3 && p.is_contiguous(), "x [M, K], p [NP, K, 16]");
  Tensor out = at::empty({x.size(0), n}, x.options());
  gemm(x, p, Tensor(), out, false);
  return out;
}

// Mamba-1 decode, every layer (see models/mamba.py for the maths). Per layer l: in_w[l] [D, 2E],
// conv_w [E, K], x_w [E, R + 2N], dt_w [R, E], A [E, N], out_w [E, D]; conv_state[l] [S, E, K-1] and
// ssm_state[l] [S, E, N] updated in place at rows slots[b]. Returns logits [B, V].
Tensor mamba1_decode(const Tensor& ids, const Tensor& slots, const Tensor& emb, at::TensorList norm_w,
                     at::TensorList in_w, at::TensorList in_b, at::TensorList conv_w, at::TensorList conv_b,
                     at::TensorList x_w, at::TensorList dt_w, at::TensorList dt_b, at::TensorList A,
                     at::TensorList Dp, at::TensorList out_w, at::TensorList out_b, at::TensorList conv_state,
                     at::TensorList ssm_state, const Tensor& norm_f, const Tensor& head_w, bool head_kn,
                     double eps_d) {
  const float eps = static_cast<float>(eps_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(in_w.size());
  const int64_t E = conv_w[0].size(0), N = A[0].size(1), R = dt_w[0].size(-2), K = conv_w[0].size(1);
  const int64_t XD = R + 2 * N;
  check_slots(slots, ids, conv_state, ssm_state);
  const int64_t* slot = slots.data_ptr<int64_t>();
  Tensor h = embed(ids, emb);  // [B, D] residual stream, fp32
  Tensor hn = at::empty({B, D}, h.options());
  Tensor xz = at::empty({B, 2 * E}, h.options());
  Tensor xc = at::empty({B, E}, h.options());
  Tensor xdbl = at::empty({B, XD}, h.options());
  Tensor dt = at::empty({B, E}, h.options());
  Tensor y = at::empty({B, E}, h.options());
  float* hp = h.data_ptr<float>();
  float* hnp = hn.data_ptr<float>();
  float* xzp = xz.data_ptr<float>();
  float* xcp = xc.data_ptr<float>();
  float* xdp = xdbl.data_ptr<float>();
  float* dtp = dt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t l = 0; l < L; ++l) {
    rms_norm_rows(hp, norm_w[l].data_ptr<float>(), hnp, B, D, eps);
    gemm(hn, in_w[l], in_b[l], xz, false);
    float* cs = conv_state[l].data_ptr<float>();
    const int64_t cs_stride = conv_state[l].stride(0);
    const float* cw = conv_w[l].data_ptr<float>();
    const float* cb = fptr(conv_b[l]);
    parallel_ranges(B * (E / 64 + (E % 64 != 0)), 4, [&](int64_t t0, int64_t t1) {
      const int64_t per = E / 64 + (E % 64 != 0);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / per, c0 = (t % per) * 64, c1 = std::min(E, c0 + 64);
        conv_step(xzp + b * 2 * E, cs + slot[b] * cs_stride, cw, cb, xcp + b * E, c0, c1, K);
      }
    });
    gemm(xc, x_w[l], Tensor(), xdbl, false);
    gemm(xdbl.narrow(1, 0, R), dt_w[l], Tensor(), dt, false);
    // Selective state update, per (sequence, block of channels): Δ = softplus(dt + bias),
    // s ← exp(Δ A) s + Δ x B, y = s·C + D x, y *= silu(z).
    float* ss = ssm_state[l].data_ptr<float>();
    const int64_t ss_stride = ssm_state[l].stride(0);
    const float* Ap = A[l].data_ptr<float>();
    const float* Dv = Dp[l].data_ptr<float>();
    const float* db = dt_b[l].data_ptr<float>();
    const int64_t EB = 64, per = (E + EB - 1) / EB;
    parallel_ranges(B * per, 4, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      alignas(32) float delta[64], gate[64];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / per, e0 = (t % per) * EB, e1 = std::min(E, e0 + EB), ne = e1 - e0;
        const float* x = xcp + b * E;
        const float* z = xzp + b * 2 * E + E;
        const float* Bv = xdp + b * XD + R;
        const float* Cv = Bv + N;
        int64_t i = 0;
        for (; i + 8 <= ne; i += 8) {
          const __m256 d = _mm256_add_ps(_mm256_loadu_ps(dtp + b * E + e0 + i), _mm256_loadu_ps(db + e0 + i));
          _mm256_store_ps(delta + i, softplus256(d));
          _mm256_store_ps(gate + i, silu256(_mm256_loadu_ps(z + e0 + i)));
        }
        for (; i < ne; ++i) {
          delta[i] = softplus1(dtp[b * E + e0 + i] + db[e0 + i]);
          gate[i] = silu1(z[e0 + i]);
        }
        float* sb = ss + slot[b] * ss_stride;
        for (int64_t e = e0; e < e1; ++e) {
          const float d = delta[e - e0], xe = x[e];
          const __m256 dv = _mm256_set1_ps(d), dx = _mm256_set1_ps(d * xe);
          float* s = sb + e * N;
          const float* a = Ap + e * N;
          __m256 acc = _mm256_setzero_ps();
          int64_t n = 0;
          for (; n + 8 <= N; n += 8) {
            const __m256 decay = exp256(_mm256_mul_ps(dv, _mm256_loadu_ps(a + n)));
            const __m256 sv = _mm256_fmadd_ps(decay, _mm256_loadu_ps(s + n), _mm256_mul_ps(dx, _mm256_loadu_ps(Bv + n)));
            _mm256_storeu_ps(s + n, sv);
            acc = _mm256_fmadd_ps(sv, _mm256_loadu_ps(Cv + n), acc);
          }
          float out = hsum256(acc);
          for (; n < N; ++n) {
            const float sv = std::exp(d * a[n]) * s[n] + d * xe * Bv[n];
            s[n] = sv;
            out += sv * Cv[n];
          }
          yp[b * E + e] = (out + Dv[e] * xe) * gate[e - e0];
        }
      }
    });
    // h += out_proj(y): the GEMM accumulates into the residual stream.
    gemm(y, out_w[l], out_b[l], h, true);
  }
  rms_norm_rows(hp, norm_f.data_ptr<float>(), hnp, B, D, eps);
  return head_logits(hn, head_w, head_kn, emb.size(0));
}

// One head's state update over NV * 8 columns [q, q + 8 NV) of S [N, P] (row stride P), one pass down
// its rows: S[n] ← decay S[n] + B[n] (Δx), y += C[n] S[n], the new row stored as soon as it is made. y
// [8 NV] comes in holding D x; its NV accumulators and the rank-1 factor Δx stay in registers / L1.
template <int NV>
inline void ssm_head_cols(float* S, int64_t P, int64_t N, __m256 dec, const float* Bv, const float* Cv,
                          const float* dx, float* y) {
  __m256 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_loadu_ps(y + 8 * j);
  for (int64_t n = 0; n < N; ++n) {
    const __m256 bn = _mm256_set1_ps(Bv[n]), cn = _mm256_set1_ps(Cv[n]);
    float* row = S + n * P;
    for (int j = 0; j < NV; ++j) {
      const __m256 sv = _mm256_fmadd_ps(dec, _mm256_loadu_ps(row + 8 * j), _mm256_mul_ps(bn, _mm256_load_ps(dx + 8 * j)));
      _mm256_storeu_ps(row + 8 * j, sv);
      acc[j] = _mm256_fmadd_ps(cn, sv, acc[j]);
    }
  }
  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(y + 8 * j, acc[j]);
}

// Mamba-2 decode, every layer (see models/mamba2.py). Per layer: in_w [D, E + C + H] (z, xBC, dt),
// conv_w [C, K] with C = E + 2GN, dt_bias / A / D [H], gnorm_w [E], out_w [E, D]; conv_state [S, C, K-1]
// and ssm_state [S, H, N, P] updated in place at rows slots[b]. Returns logits [B, V].
Tensor mamba2_decode(const Tensor& ids, const Tensor& slots, const Tensor& emb, at::TensorList norm_w,
                     at::TensorList in_w, at::TensorList in_b, at::TensorList conv_w, at::TensorList conv_b,
                     at::TensorList dt_bias, at::TensorList A, at::TensorList Dp, at::TensorList gnorm_w,
                     at::TensorList out_w, at::TensorList out_b, at::TensorList conv_state, at::TensorList ssm_state,
                     const Tensor& norm_f, const Tensor& head_w, bool head_kn, double eps_d, int64_t H, int64_t P,
                     int64_t G, int64_t N, double dt_min, double dt_max) {
  const float eps = static_cast<float>(eps_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(in_w.size());
  const int64_t E = H * P, C = E + 2 * G * N, W = E + C + H, K = conv_w[0].size(1), rep = H / G;
  TORCH_CHECK(P % 8 == 0, "mamba2_decode: head_dim must be a multiple of 8");
  check_slots(slots, ids, conv_state, ssm_state);
  const int64_t* slot = slots.data_ptr<int64_t>();
  Tensor h = embed(ids, emb);
  Tensor hn = at::empty({B, D}, h.options());
  Tensor proj = at::empty({B, W}, h.options());
  Tensor xbc = at::empty({B, C}, h.options());
  Tensor y = at::empty({B, E}, h.options());
  float* hp = h.data_ptr<float>();
  float* hnp = hn.data_ptr<float>();
  float* pp = proj.data_ptr<float>();
  float* xp = xbc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float lo = static_cast<float>(dt_min), hi = static_cast<float>(dt_max);
  for (int64_t l = 0; l < L; ++l) {
    rms_norm_rows(hp, norm_w[l].data_ptr<float>(), hnp, B, D, eps);
    gemm(hn, in_w[l], in_b[l], proj, false);
    float* cs = conv_state[l].data_ptr<float>();
    const int64_t cs_stride = conv_state[l].stride(0);
    const float* cw = conv_w[l].data_ptr<float>();
    const float* cb = fptr(conv_b[l]);
    const int64_t per_c = (C + 63) / 64;
    parallel_ranges(B * per_c, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / per_c, c0 = (t % per_c) * 64, c1 = std::min(C, c0 + 64);
        conv_step(pp + b * W + E, cs + slot[b] * cs_stride, cw, cb, xp + b * C, c0, c1, K);
      }
    });
    // Per (sequence, head): Δ = clamp(softplus(dt + dt_bias)), S ← exp(Δ A) S + B (Δ x)ᵀ in place,
    // y = C S + D x, in one streaming pass over S [N, P] (ssm_head_cols: 64 columns, the whole row for
    // Mamba-2-130m's P = 64, per pass), nothing else read or written per state element.
    float* ss = ssm_state[l].data_ptr<float>();
    const int64_t ss_stride = ssm_state[l].stride(0);
    const float* Ap = A[l].data_ptr<float>();
    const float* Dv = Dp[l].data_ptr<float>();
    const float* dbias = dt_bias[l].data_ptr<float>();
    parallel_ranges(B * H, 2, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      alignas(32) float dx[64];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, hh = t % H, g = hh / rep;
        const float d = std::min(hi, std::max(lo, softplus1(pp[b * W + E + C + hh] + dbias[hh])));
        const __m256 dec = _mm256_set1_ps(std::exp(d * Ap[hh]));
        const float* x = xp + b * C + hh * P;
        const float* Bv = xp + b * C + E + g * N;
        const float* Cv = Bv + G * N;
        float* S = ss + slot[b] * ss_stride + hh * N * P;
        float* yo = yp + b * E + hh * P;
        for (int64_t q = 0; q < P; q += 64) {
          const int64_t nq = std::min<int64_t>(64, P - q);
          for (int64_t p = 0; p < nq; ++p) {
            dx[p] = d * x[q + p];
            yo[q + p] = Dv[hh] * x[q + p];
          }
          switch (nq / 8) {
            case 1: ssm_head_cols<1>(S + q, P, N, dec, Bv, Cv, dx, yo + q); break;
            case 2: ssm_head_cols<2>(S + q, P, N, dec, Bv, Cv, dx, yo + q); break;
            case 3: ssm_head_cols<3>(S + q, P, N, dec, Bv, Cv, dx, yo + q); break;
            case 4: ssm_head_cols<4>(S + q, P, N, dec, Bv, Cv, dx, yo + q); break;
            case 5: ssm_head_cols<5>(S + q, P, N, dec, Bv, Cv, dx, yo + q); break;
            case 6: ssm_head_cols<6>(S + q, P, N, dec, Bv, Cv, dx, yo + q); break;
            case 7: ssm_head_cols<7>(S + q, P, N, dec, Bv, Cv, dx, yo + q); break;
            default: ssm_head_cols<8>(S + q, P, N, dec, Bv, Cv, dx, yo + q); break;
          }
        }
      }
    });
    // Gated group norm: y ⊙ silu(z), normalised over each of the G groups, times the norm weight.
    const float* gw = gnorm_w[l].data_ptr<float>();
    const int64_t EG = E / G;
    parallel_ranges(B * G, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / G, g = t % G;
        float* yr = yp + b * E + g * EG;
        const float* z = pp + b * W + g * EG;
        float ss2 = 0.0f;
        int64_t i = 0;
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= EG; i += 8) {
          const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(yr + i), silu256(_mm256_loadu_ps(z + i)));
          _mm256_storeu_ps(yr + i, v);
          acc = _mm256_fmadd_ps(v, v, acc);
        }
        ss2 = hsum256(acc);
        for (; i < EG; ++i) {
          yr[i] *= silu1(z[i]);
          ss2 += yr[i] * yr[i];
        }
        const float inv = 1.0f / std::sqrt(ss2 / static_cast<float>(EG) + eps);
        for (int64_t j = 0; j < EG; ++j) yr[j] = yr[j] * inv * gw[g * EG + j];
      }
    });
    gemm(y, out_w[l], out_b[l], h, true);
  }
  rms_norm_rows(hp, norm_f.data_ptr<float>(), hnp, B, D, eps);
  return head_logits(hn, head_w, head_kn, emb.size(0));
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("pack_weight(Tensor w, bool kn) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor p, int n) -> Tensor");
  m.def("pack_weight_int8(Tensor q, Tensor scale) -> Tensor");
  m.def(
      "mamba1_decode(Tensor ids, Tensor slots, Tensor emb, Tensor[] norm_w, Tensor[] in_w, Tensor[] in_b, "
      "Tensor[] conv_w, Tensor[] conv_b, Tensor[] x_w, Tensor[] dt_w, Tensor[] dt_b, Tensor[] A, Tensor[] D, "
      "Tensor[] out_w, Tensor[] out_b, Tensor(a!)[] conv_state, Tensor(b!)[] ssm_state, Tensor norm_f, "
      "Tensor head_w, bool head_kn, float eps) -> Tensor");
  m.def(
      "mamba2_decode(Tensor ids, Tensor slots, Tensor emb, Tensor[] norm_w, Tensor[] in_w, Tensor[] in_b, "
      "Tensor[] conv_w, Tensor[] conv_b, Tensor[] dt_bias, Tensor[] A, Tensor[] D, Tensor[] gnorm_w, "
      "Tensor[] out_w, Tensor[] out_b, Tensor(a!)[] conv_state, Tensor(b!)[] ssm_state, Tensor norm_f, "
      "Tensor head_w, bool head_kn, float eps, int H, int P, int G, int N, float dt_min, float dt_max) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnserve_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("pack_weight", &pack_weight);
  m.impl("linear_packed", &linear_packed);
  m.impl("pack_weight_int8", &pack_weight_int8);
  m.impl("mamba1_decode", &mamba1_decode);
  m.impl("mamba2_decode", &mamba2_decode);
}
