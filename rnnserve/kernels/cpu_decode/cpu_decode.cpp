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
// Only scratch activations are allocated per step (a few [B, width] buffers), none per layer; Mamba-2's
// Mamba2Model (a torch custom class holding the weights and state pools) keeps its scratch between
// steps and is called with the token and slot ids alone.
// The AVX2 math, the item pool, the weight panels and their kernels are in panels.h (shared with the
// other fused decode extensions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
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

// The width-4 causal conv step of 8 channels [c, c + 8) of one row, vectorised across the channels:
// s the row's state at channel c ([8, 3] interleaved: s[3i + k] = window k of channel c + i), x [8] the
// new inputs, wt [4, C] the conv weight transposed (wt[k * C] = w[c, k]). out[i] = silu(bias + Σ_k
// wt[k] window_k + wt[3] x), and the state shifted in place: [s1, s2, x] per channel, i.e. the old 24
// floats moved down by one with x written at every third place.
inline void conv4_x8(const float* x, float* s, const float* wt, int64_t C, const float* bias, float* out) {
  const __m256i idx = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  const __m256 s0 = _mm256_i32gather_ps(s, idx, 4), s1 = _mm256_i32gather_ps(s + 1, idx, 4);
  const __m256 s2 = _mm256_i32gather_ps(s + 2, idx, 4), xv = _mm256_loadu_ps(x);
  __m256 acc = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(wt), s0));
  acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(wt + C), s1));
  acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(wt + 2 * C), s2));
  acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(wt + 3 * C), xv));
  _mm256_storeu_ps(out, silu256(acc));
  // s[1..24) shifted down (s[24] is not read: lane 7 of the third vector is x[7] anyway), x blended in.
  const __m256 o0 = _mm256_loadu_ps(s + 1), o1 = _mm256_loadu_ps(s + 9);
  const __m256 o2 = _mm256_maskload_ps(s + 17, _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0));
  const __m256 x0 = _mm256_permutevar8x32_ps(xv, _mm256_setr_epi32(0, 0, 0, 0, 0, 1, 0, 0));
  const __m256 x1 = _mm256_permutevar8x32_ps(xv, _mm256_setr_epi32(2, 0, 0, 3, 0, 0, 4, 0));
  const __m256 x2 = _mm256_permutevar8x32_ps(xv, _mm256_setr_epi32(0, 5, 0, 0, 6, 0, 0, 7));
  _mm256_storeu_ps(s, _mm256_blend_ps(o0, x0, 0x24));       // lanes 2, 5
  _mm256_storeu_ps(s + 8, _mm256_blend_ps(o1, x1, 0x49));   // lanes 0, 3, 6
  _mm256_storeu_ps(s + 16, _mm256_blend_ps(o2, x2, 0x92));  // lanes 1, 4, 7
}

// The conv step of channels [c0, c1) of one row (x the row's conv input [C], state its [C, K-1], out
// [C]): blocks of 8 through conv4_x8 when K = 4 (wt [4, C]), the rest through conv_step (w [C, K]).
inline void conv_channels(const float* x, float* state, const float* w, const float* wt, const float* bias,
                          float* out, int64_t c0, int64_t c1, int64_t C, int64_t K) {
  int64_t c = c0;
  if (K == 4) {
    for (; c + 8 <= c1; c += 8) conv4_x8(x + c, state + 3 * c, wt + c, C, bias ? bias + c : nullptr, out + c);
  }
  if (c < c1) conv_step(x, state, w, bias, out, c, c1, K);
}

// A Mamba-2 model's decode weights (see models/mamba2.py), per layer l: norm_w [D], in_w (packed, or
// [D, E + C + H]: z, xBC, dt), in_b, conv_w [C, K] and conv_wt [K, C] (its transpose, for conv4_x8; empty
// unless K = 4), conv_b [C] or empty, dt_bias / A / D [H], gnorm_w [E], out_w (packed, or [E, D]),
// out_b; C = E + 2GN, E = HP.
struct Mamba2Weights {
  Tensor emb;
  std::vector<Tensor> norm_w, in_w, in_b, conv_w, conv_wt, conv_b, dt_bias, A, D, gnorm_w, out_w, out_b;
  Tensor norm_f, head_w;
  bool head_kn = false;
  float eps = 0.0f, dt_min = 0.0f, dt_max = 0.0f;
  int64_t H = 0, P = 0, G = 0, N = 0;
};

// conv_w [C, K] -> [K, C] per layer when K = 4 (what conv4_x8 reads), else empty tensors.
std::vector<Tensor> transposed_conv(at::TensorList conv_w) {
  std::vector<Tensor> out;
  for (const Tensor& w : conv_w) out.push_back(w.size(1) == 4 ? w.t().contiguous() : Tensor());
  return out;
}

Mamba2Weights mamba2_weights(const Tensor& emb, at::TensorList norm_w, at::TensorList in_w, at::TensorList in_b,
                             at::TensorList conv_w, at::TensorList conv_b, at::TensorList dt_bias, at::TensorList A,
                             at::TensorList Dp, at::TensorList gnorm_w, at::TensorList out_w, at::TensorList out_b,
                             const Tensor& norm_f, const Tensor& head_w, bool head_kn, double eps, int64_t H,
                             int64_t P, int64_t G, int64_t N, double dt_min, double dt_max) {
  const size_t L = in_w.size();
  TORCH_CHECK(L > 0 && norm_w.size() == L && in_b.size() == L && conv_w.size() == L && conv_b.size() == L &&
                  dt_bias.size() == L && A.size() == L && Dp.size() == L && gnorm_w.size() == L &&
                  out_w.size() == L && out_b.size() == L,
              "mamba2: one of each weight per layer");
  TORCH_CHECK(P % 8 == 0, "mamba2_decode: head_dim must be a multiple of 8");
  TORCH_CHECK(H % G == 0, "mamba2_decode: the heads must split evenly into the groups");
  Mamba2Weights w;
  w.emb = emb;
  w.norm_w = norm_w.vec();
  w.in_w = in_w.vec();
  w.in_b = in_b.vec();
  w.conv_w = conv_w.vec();
  w.conv_wt = transposed_conv(conv_w);
  w.conv_b = conv_b.vec();
  w.dt_bias = dt_bias.vec();
  w.A = A.vec();
  w.D = Dp.vec();
  w.gnorm_w = gnorm_w.vec();
  w.out_w = out_w.vec();
  w.out_b = out_b.vec();
  w.norm_f = norm_f;
  w.head_w = head_w;
  w.head_kn = head_kn;
  w.eps = static_cast<float>(eps);
  w.dt_min = static_cast<float>(dt_min);
  w.dt_max = static_cast<float>(dt_max);
  w.H = H;
  w.P = P;
  w.G = G;
  w.N = N;
  const int64_t C = H * P + 2 * G * N;
  for (size_t l = 0; l < L; ++l)
    TORCH_CHECK(conv_w[l].dim() == 2 && conv_w[l].size(0) == C && conv_w[l].is_contiguous(), "mamba2: conv_w [",
                C, ", K] contiguous per layer");
  return w;
}

// One decode step of every layer: logits [B, V]; conv_state[l] [S, C, K-1] and ssm_state[l] [S, H, N, P]
// updated in place at rows slots[b]. scratch holds the step's activations between calls (grown when B
// needs more), so a step allocates only the logits.
Tensor mamba2_step(const Mamba2Weights& w, const Tensor& ids, const Tensor& slots, at::TensorList conv_state,
                   at::TensorList ssm_state, Tensor& scratch) {
  const float eps = w.eps, lo = w.dt_min, hi = w.dt_max;
  const int64_t H = w.H, P = w.P, G = w.G, N = w.N;
  const int64_t B = ids.size(0), D = w.emb.size(1), L = static_cast<int64_t>(w.in_w.size());
  const int64_t E = H * P, C = E + 2 * G * N, W = E + C + H, K = w.conv_w[0].size(1), rep = H / G;
  TORCH_CHECK(static_cast<int64_t>(conv_state.size()) == L, "mamba2: one conv and one ssm state per layer");
  check_slots(slots, ids, conv_state, ssm_state);
  const int64_t* slot = slots.data_ptr<int64_t>();
  // The activations, one buffer: h [B, D] (the fp32 residual stream), hn [B, D], proj [B, W], xbc [B, C],
  // y [B, E].
  const int64_t need = B * (2 * D + W + C + E);
  if (!scratch.defined() || scratch.numel() < need) scratch = at::empty({need}, w.emb.options());
  float* hp = scratch.data_ptr<float>();
  float* hnp = hp + B * D;
  float* pp = hnp + B * D;
  float* xp = pp + B * W;
  float* yp = xp + B * C;
  const Tensor h = scratch.narrow(0, 0, B * D).view({B, D});
  const Tensor hn = scratch.narrow(0, B * D, B * D).view({B, D});
  Tensor proj = scratch.narrow(0, 2 * B * D, B * W).view({B, W});
  const Tensor y = scratch.narrow(0, 2 * B * D + B * W + B * C, B * E).view({B, E});
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* embp = w.emb.data_ptr<float>();
  for (int64_t m = 0; m < B; ++m) {
    TORCH_CHECK(id[m] >= 0 && id[m] < w.emb.size(0), "token id ", id[m], " out of range");
    std::copy_n(embp + id[m] * D, D, hp + m * D);
  }
  for (int64_t l = 0; l < L; ++l) {
    rms_norm_rows(hp, w.norm_w[l].data_ptr<float>(), hnp, B, D, eps);
    gemm(hn, w.in_w[l], w.in_b[l], proj, false);
    float* cs = conv_state[l].data_ptr<float>();
    const int64_t cs_stride = conv_state[l].stride(0);
    const float* cw = w.conv_w[l].data_ptr<float>();
    const float* cwt = K == 4 ? w.conv_wt[l].data_ptr<float>() : nullptr;
    const float* cb = fptr(w.conv_b[l]);
    // The conv of the B and C channels [E, C) first (every head of a group reads them); each head's own
    // x channels are convolved in its state-update item below, just before they are used.
    parallel_ranges(B, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        conv_channels(pp + b * W + E, cs + slot[b] * cs_stride, cw, cwt, cb, xp + b * C, E, C, C, K);
    });
    // Per (sequence, head): the conv of its P x channels, Δ = clamp(softplus(dt + dt_bias)),
    // S ← exp(Δ A) S + B (Δ x)ᵀ in place, y = C S + D x, in one streaming pass over S [N, P]
    // (ssm_head_cols: 64 columns, the whole row for Mamba-2-130m's P = 64, per pass), nothing else read
    // or written per state element. Items of B*H/16 heads (at least 2): about 16 items, so a thread
    // streams a run of consecutive heads (whole slots from batch 16 on, contiguous in the pool when the
    // slots are) rather than jumping every 2 heads; measured 5-8% faster steps than 2-head items at
    // batch 8 and 32 (2 threads, alternated in one process), the same items at batch 1.
    float* ss = ssm_state[l].data_ptr<float>();
    const int64_t ss_stride = ssm_state[l].stride(0);
    const float* Ap = w.A[l].data_ptr<float>();
    const float* Dv = w.D[l].data_ptr<float>();
    const float* dbias = w.dt_bias[l].data_ptr<float>();
    parallel_ranges(B * H, std::max<int64_t>(2, B * H / 16), [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      alignas(32) float dx[64];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, hh = t % H, g = hh / rep;
        conv_channels(pp + b * W + E, cs + slot[b] * cs_stride, cw, cwt, cb, xp + b * C, hh * P, (hh + 1) * P, C,
                      K);
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
    const float* gw = w.gnorm_w[l].data_ptr<float>();
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
        const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(ss2 / static_cast<float>(EG) + eps));
        const float* gwg = gw + g * EG;
        int64_t j = 0;
        for (; j + 8 <= EG; j += 8)
          _mm256_storeu_ps(yr + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(yr + j), inv), _mm256_loadu_ps(gwg + j)));
        for (; j < EG; ++j) yr[j] = yr[j] * _mm256_cvtss_f32(inv) * gwg[j];
      }
    });
    Tensor hm = h;
    gemm(y, w.out_w[l], w.out_b[l], hm, true);
  }
  rms_norm_rows(hp, w.norm_f.data_ptr<float>(), hnp, B, D, eps);
  return head_logits(hn, w.head_w, w.head_kn, w.emb.size(0));
}

// Mamba-2 decode, every layer, weights passed per call (see Mamba2Weights for the shapes). Returns
// logits [B, V]. The serving path holds the weights in a Mamba2Model instead.
Tensor mamba2_decode(const Tensor& ids, const Tensor& slots, const Tensor& emb, at::TensorList norm_w,
                     at::TensorList in_w, at::TensorList in_b, at::TensorList conv_w, at::TensorList conv_b,
                     at::TensorList dt_bias, at::TensorList A, at::TensorList Dp, at::TensorList gnorm_w,
                     at::TensorList out_w, at::TensorList out_b, at::TensorList conv_state, at::TensorList ssm_state,
                     const Tensor& norm_f, const Tensor& head_w, bool head_kn, double eps_d, int64_t H, int64_t P,
                     int64_t G, int64_t N, double dt_min, double dt_max) {
  const Mamba2Weights w = mamba2_weights(emb, norm_w, in_w, in_b, conv_w, conv_b, dt_bias, A, Dp, gnorm_w, out_w,
                                         out_b, norm_f, head_w, head_kn, eps_d, H, P, G, N, dt_min, dt_max);
  Tensor scratch;
  return mamba2_step(w, ids, slots, conv_state, ssm_state, scratch);
}

// The Mamba-2 decode with its weights and state pools held on the C++ side
// (torch.classes.rnnserve_cpu.Mamba2Model): a step passes only the token and slot ids, where
// mamba2_decode's ~300 tensor arguments cost ~0.15 ms of dispatch per step (measured on a 24-layer
// model). set_states rebinds the pools when the caller's pool swaps a tensor.
struct Mamba2Model : torch::CustomClassHolder {
  Mamba2Weights w;
  std::vector<Tensor> conv_state, ssm_state;
  Tensor scratch;

  Mamba2Model(Tensor emb, std::vector<Tensor> norm_w, std::vector<Tensor> in_w, std::vector<Tensor> in_b,
              std::vector<Tensor> conv_w, std::vector<Tensor> conv_b, std::vector<Tensor> dt_bias,
              std::vector<Tensor> A, std::vector<Tensor> Dp, std::vector<Tensor> gnorm_w, std::vector<Tensor> out_w,
              std::vector<Tensor> out_b, std::vector<Tensor> conv_state_, std::vector<Tensor> ssm_state_,
              Tensor norm_f, Tensor head_w, bool head_kn, double eps, int64_t H, int64_t P, int64_t G, int64_t N,
              double dt_min, double dt_max)
      : w(mamba2_weights(emb, norm_w, in_w, in_b, conv_w, conv_b, dt_bias, A, Dp, gnorm_w, out_w, out_b, norm_f,
                         head_w, head_kn, eps, H, P, G, N, dt_min, dt_max)) {
    set_states(std::move(conv_state_), std::move(ssm_state_));
  }

  void set_states(std::vector<Tensor> conv, std::vector<Tensor> ssm) {
    TORCH_CHECK(conv.size() == w.in_w.size() && ssm.size() == w.in_w.size(), "one conv and one ssm state per layer");
    for (size_t l = 0; l < conv.size(); ++l) {
      check_f32(conv[l], "conv_state");
      check_f32(ssm[l], "ssm_state");
      TORCH_CHECK(conv[l][0].is_contiguous() && ssm[l][0].is_contiguous(), "state pools contiguous per slot");
    }
    conv_state = std::move(conv);
    ssm_state = std::move(ssm);
  }

  Tensor step(const Tensor& ids, const Tensor& slots) {
    return mamba2_step(w, ids, slots, conv_state, ssm_state, scratch);
  }
};

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
  m.class_<Mamba2Model>("Mamba2Model")
      .def(torch::init<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>, Tensor, Tensor, bool, double, int64_t, int64_t, int64_t, int64_t, double,
                       double>())
      .def("set_states", &Mamba2Model::set_states)
      .def("step", &Mamba2Model::step);
}

TORCH_LIBRARY_IMPL(rnnserve_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("pack_weight", &pack_weight);
  m.impl("linear_packed", &linear_packed);
  m.impl("pack_weight_int8", &pack_weight_int8);
  m.impl("mamba1_decode", &mamba1_decode);
  m.impl("mamba2_decode", &mamba2_decode);
}
