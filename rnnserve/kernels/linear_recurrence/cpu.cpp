// The chunked (SSD) prefill of the scalar-decay linear recurrence on the CPU (float32, AVX-512): the
// packed varlen batch in one call, every sequence resumed from its slot's state and its final state
// written back in place. Per head h (group g = h / R) and token t, with x_t = v_t ⊙ v_scale_t:
//
//   S_t = exp(a_t) S_{t-1} + k_tᵀ x_t,   o_t = scale · q_t S_t + D_h v_t          (S [K, V])
//
// Mamba-2 passes v = x, v_scale = Δ, a = Δ A and its D skip, so neither Δ x nor y + D x is ever a
// [T, H, P] tensor; RetNet passes neither (v_scale, D absent).
//
// Per chunk of L tokens (never across a sequence boundary), A_i = a_0 + ... + a_i (double) and
//   o_i   = scale · (exp(A_i) q_i S_in + Σ_{j<=i} (q_i·k_j) exp(A_i - A_j) x_j) + D v_i
//   S_out = exp(A_{l-1}) S_in + Σ_j exp(A_{l-1} - A_j) k_jᵀ x_j
// Two phases, each a set of items on panels.h's item pool:
//   1. per (chunk, group): kT [K, L] (the chunk's k transposed, zero past its length) and the scores
//      q kᵀ [L, L], shared by the group's R heads;
//   2. per (sequence, head): the walk over the sequence's chunks with the head's state S [K, V] in a
//      local buffer (L1/L2): three small matrix products per chunk (q S, P x, kT x) through one
//      register-tiled AVX-512 kernel (mm below), the decays through a vector exp.
// The torch path (chunk.py) makes [NC, G, R, L, L] decay and score tensors and carries the state
// through ~30 small addcmul calls per layer; this is one pass per head.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "panels.h"

namespace {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }

// C[r, 0:16 NV] ← (acc ? cs[r] C[r, 0:16 NV] : 0) + Σ_j A[r, j] B[j, 0:16 NV] for RT rows (cs null: 1): RT x NV
// accumulators in registers, A's element broadcast, B's row loaded once per j for all RT rows; `last`
// masks B's and C's last vector.
template <int RT, int NV>
inline void tile(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t J,
                 __mmask16 last, bool acc, const float* cs) {
  __m512 c[RT][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r) {
    const __m512 s = _mm512_set1_ps(cs ? cs[r] : 1.0f);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      c[r][v] = acc ? _mm512_mul_ps(s, _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff, C + r * ldc + 16 * v))
                    : _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < J; ++j) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xffff, B + j * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < RT; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, v == NV - 1 ? last : 0xffff, c[r][v]);
}

template <int RT>
inline void tile_nv(int nv, float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
                    int64_t J, __mmask16 last, bool acc, const float* cs) {
  switch (nv) {
    case 1: tile<RT, 1>(C, ldc, A, lda, B, ldb, J, last, acc, cs); break;
    case 2: tile<RT, 2>(C, ldc, A, lda, B, ldb, J, last, acc, cs); break;
    case 3: tile<RT, 3>(C, ldc, A, lda, B, ldb, J, last, acc, cs); break;
    default: tile<RT, 4>(C, ldc, A, lda, B, ldb, J, last, acc, cs); break;
  }
}

constexpr int kRows = 6;  // rows per register tile: 6 x 4 accumulators + 4 B vectors + 1 broadcast

// C [R, n] ← (acc ? diag(cs) C : 0) + A [R, J] · B [J, n], all row-major with the given row strides (cs
// [R], or null for 1). causal: row i sums only j <= i (A is lower triangular; each tile of rows stops at
// its last row's diagonal).
void mm(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb, int64_t R, int64_t J,
        int64_t n, bool acc, bool causal, const float* cs = nullptr) {
  for (int64_t c0 = 0; c0 < n; c0 += 64) {
    const int64_t cols = std::min<int64_t>(64, n - c0);
    const int nv = static_cast<int>((cols + 15) / 16);
    const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
    for (int64_t r0 = 0; r0 < R; r0 += kRows) {
      const int rt = static_cast<int>(std::min<int64_t>(kRows, R - r0));
      const int64_t j_end = causal ? std::min(J, r0 + rt) : J;
      float* c = C + r0 * ldc + c0;
      const float* a = A + r0 * lda;
      const float* b = B + c0;
      const float* s = cs ? cs + r0 : nullptr;
      switch (rt) {
        case 1: tile_nv<1>(nv, c, ldc, a, lda, b, ldb, j_end, last, acc, s); break;
        case 2: tile_nv<2>(nv, c, ldc, a, lda, b, ldb, j_end, last, acc, s); break;
        case 3: tile_nv<3>(nv, c, ldc, a, lda, b, ldb, j_end, last, acc, s); break;
        case 4: tile_nv<4>(nv, c, ldc, a, lda, b, ldb, j_end, last, acc, s); break;
        case 5: tile_nv<5>(nv, c, ldc, a, lda, b, ldb, j_end, last, acc, s); break;
        default: tile_nv<6>(nv, c, ldc, a, lda, b, ldb, j_end, last, acc, s); break;
      }
    }
  }
}

void check_f32_rows(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be float32 on the CPU");
  TORCH_CHECK(t.dim() == dim && t.stride(-1) == 1, name, " must be ", dim, "-D with unit stride along its last dim");
}

// q, k [T, G, K]; v [T, H, V]; v_scale [T, H] or absent; log_decay [T, H] (<= 0), or absent with
// decay_rate [H] and v_scale: log_decay = v_scale ⊙ decay_rate (Mamba-2's Δ A); D [H] or absent;
// state [S, H, K, V] (each slot's [H, K, V] contiguous), read at and written back to slot_ids[b];
// bounds: the B + 1 host sequence boundaries. Returns o [T, H, V].
at::Tensor ssd_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& log_decay,
                      const std::optional<at::Tensor>& decay_rate,
                      const std::optional<at::Tensor>& D, at::Tensor state, at::IntArrayRef bounds,
                      const at::Tensor& slot_ids, double scale_d, int64_t L) {
  check_f32_rows(q, "q", 3);
  check_f32_rows(k, "k", 3);
  check_f32_rows(v, "v", 3);
  const int64_t T = q.size(0), G = q.size(1), K = q.size(2), H = v.size(1), V = v.size(2);
  TORCH_CHECK(k.sizes() == q.sizes() && v.size(0) == T && H % G == 0, "q, k [T, G, K] and v [T, H, V], H % G == 0");
  TORCH_CHECK(L >= 1 && L <= 64, "chunk size must be in [1, 64]");
  const bool has_vs = v_scale.has_value() && v_scale->defined();
  const bool has_d = D.has_value() && D->defined();
  const bool has_ld = log_decay.has_value() && log_decay->defined();
  if (has_ld) {
    check_f32_rows(*log_decay, "log_decay", 2);
    TORCH_CHECK(log_decay->size(0) == T && log_decay->size(1) == H, "log_decay must be [T, H]");
  } else {
    TORCH_CHECK(has_vs && decay_rate.has_value() && decay_rate->defined() &&
                    decay_rate->scalar_type() == at::kFloat && decay_rate->is_contiguous() && decay_rate->numel() == H,
                "without log_decay, v_scale [T, H] and a float32 decay_rate [H] are needed");
  }
  if (has_vs) {
    check_f32_rows(*v_scale, "v_scale", 2);
    TORCH_CHECK(v_scale->size(0) == T && v_scale->size(1) == H, "v_scale must be [T, H]");
  }
  if (has_d) TORCH_CHECK(D->scalar_type() == at::kFloat && D->is_contiguous() && D->numel() == H, "D must be [H]");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 4 && state.size(1) == H && state.size(2) == K &&
                  state.size(3) == V && state.stride(3) == 1 && state.stride(2) == V && state.stride(1) == K * V,
              "state must be float32 [S, H, K, V], each slot contiguous");
  const int64_t B = static_cast<int64_t>(bounds.size()) - 1;
  TORCH_CHECK(B >= 0 && slot_ids.scalar_type() == at::kLong && slot_ids.numel() == B, "one int64 slot per sequence");
  TORCH_CHECK(bounds[0] == 0 && bounds[B] == T, "bounds must run from 0 to T");
  const int64_t* slot = slot_ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(bounds[b + 1] >= bounds[b], "bounds must not decrease");
    TORCH_CHECK(slot[b] >= 0 && slot[b] < state.size(0), "slot id ", slot[b], " out of range");
  }
  const int64_t R = H / G;
  const float scale = static_cast<float>(scale_d);

  // Chunks of every sequence in order: (first token, length); first_chunk[b] indexes them.
  std::vector<int64_t> c_t0, c_len, first_chunk(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    first_chunk[b] = static_cast<int64_t>(c_t0.size());
    for (int64_t t = bounds[b]; t < bounds[b + 1]; t += L) {
      c_t0.push_back(t);
      c_len.push_back(std::min(L, bounds[b + 1] - t));
    }
  }
  const int64_t NC = static_cast<int64_t>(c_t0.size());
  first_chunk[B] = NC;

  at::Tensor out = at::empty({T, H, V}, v.options());
  if (T == 0) return out;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* ldp = has_ld ? log_decay->data_ptr<float>() : nullptr;
  const float* rate = has_ld ? nullptr : decay_rate->data_ptr<float>();
  const float* vsp = has_vs ? v_scale->data_ptr<float>() : nullptr;
  const float* dp = has_d ? D->data_ptr<float>() : nullptr;
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), ls0 = has_ld ? log_decay->stride(0) : 0,
                ls1 = has_ld ? log_decay->stride(1) : 0;
  const int64_t ss0 = has_vs ? v_scale->stride(0) : 0, ss1 = has_vs ? v_scale->stride(1) : 0;
  float* op = out.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  const int64_t st0 = state.stride(0);

  // Phase 1: kT [NC, G, K, L] and scores [NC, G, L, L].
  std::vector<float> kT(static_cast<size_t>(NC * G * K * L)), scores(static_cast<size_t>(NC * G * L * L));
  parallel_items(NC * G, [&](int64_t item) {
    const int64_t c = item / G, g = item % G, t0 = c_t0[c], l = c_len[c];
    float* kt = kT.data() + item * K * L;
    for (int64_t d = 0; d < K; ++d) {
      for (int64_t j = 0; j < l; ++j) kt[d * L + j] = kp[(t0 + j) * ks0 + g * ks1 + d];
      for (int64_t j = l; j < L; ++j) kt[d * L + j] = 0.0f;
    }
    mm(scores.data() + item * L * L, L, qp + t0 * qs0 + g * qs1, qs0, kt, L, l, K, L, false, false);
  });

  // Phase 2: per (sequence, block of kHeads heads), the chunks in order and, per chunk, the block's heads:
  // the chunk's q, kT and scores are read from L1/L2 by every head of the block, and its v rows are read
  // a block's width (kHeads * V floats) at a time. Without a scale or a D skip (Mamba-2's prefill: the D
  // skip goes with the gated norm) the chunk's output rows are written straight into `out`.
  const bool direct = scale == 1.0f && !dp;
  constexpr int64_t kHeads = 4;
  const int64_t blocks = (H + kHeads - 1) / kHeads;
  parallel_items(B * blocks, [&](int64_t item) {
    FlushDenormals ftz;
    const int64_t b = item / blocks, h0 = (item % blocks) * kHeads, h1 = std::min(H, h0 + kHeads);
    std::vector<float> S_all(static_cast<size_t>((h1 - h0) * K * V)), P(static_cast<size_t>(L * L)),
        xs(static_cast<size_t>(L * V)), xe(static_cast<size_t>(L * V)), y(direct ? 0 : static_cast<size_t>(L * V));
    std::vector<float> row_decay(static_cast<size_t>(std::max(L, K)));
    alignas(64) double cum[64 + 16] = {};  // A_i, then zeros: the P rows read 16 at a time
    float* state_b = sp + slot[b] * st0;
    std::copy_n(state_b + h0 * K * V, (h1 - h0) * K * V, S_all.data());
    for (int64_t c = first_chunk[b]; c < first_chunk[b + 1]; ++c) for (int64_t h = h0; h < h1; ++h) {
      const int64_t g = h / R;
      const float d_h = dp ? dp[h] : 0.0f;
      float* S = S_all.data() + (h - h0) * K * V;
      const int64_t t0 = c_t0[c], l = c_len[c];
      double acc = 0.0;
      for (int64_t i = 0; i < l; ++i)
        cum[i] = acc += ldp ? ldp[(t0 + i) * ls0 + h * ls1] : vsp[(t0 + i) * ss0 + h * ss1] * rate[h];
      for (int64_t i = l; i < 64 + 16; ++i) cum[i] = 0.0;
      const double last = cum[l - 1];
      // xs = v ⊙ v_scale (the intra-chunk product), xe = exp(A_{l-1} - A_j) xs (the state update).
      for (int64_t i = 0; i < l; ++i) {
        const float* vrow = vp + (t0 + i) * vs0 + h * vs1;
        const float s = vsp ? vsp[(t0 + i) * ss0 + h * ss1] : 1.0f;
        const float se = s * static_cast<float>(std::exp(last - cum[i]));
        for (int64_t e = 0; e < V; ++e) {
          xs[i * V + e] = vrow[e] * s;
          xe[i * V + e] = vrow[e] * se;
        }
      }
      // Inter-chunk: q_i S_in, scaled by exp(A_i) when the intra-chunk sum is added to it below.
      float* yc = direct ? op + (t0 * H + h) * V : y.data();
      const int64_t ldy = direct ? H * V : V;
      const float* qc = qp + t0 * qs0 + g * qs1;
      mm(yc, ldy, qc, qs0, S, V, l, K, V, false, false);
      for (int64_t i = 0; i < l; ++i) row_decay[i] = static_cast<float>(std::exp(cum[i]));
      // Intra-chunk: P_ij = (q_i·k_j) exp(A_i - A_j) for j <= i, 0 above (up to the row tile's end).
      const float* sc = scores.data() + (c * G + g) * L * L;
      for (int64_t i = 0; i < l; ++i) {
        const __m512d ci = _mm512_set1_pd(cum[i]);
        for (int64_t j0 = 0; j0 < l; j0 += 16) {
          float* prow = P.data() + i * L + j0;
          if (j0 > i) {
            _mm512_mask_storeu_ps(prow, tail_mask(l - j0), _mm512_setzero_ps());
            continue;
          }
          const __mmask16 m = tail_mask(i + 1 - j0);  // j0 .. i
          const __m256 lo = _mm512_cvtpd_ps(_mm512_sub_pd(ci, _mm512_load_pd(cum + j0)));
          const __m256 hi = _mm512_cvtpd_ps(_mm512_sub_pd(ci, _mm512_load_pd(cum + j0 + 8)));
          const __m512 diff = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
          const __m512 p = _mm512_maskz_mul_ps(m, exp512(_mm512_maskz_mov_ps(m, diff)), _mm512_maskz_loadu_ps(m, sc + i * L + j0));
          _mm512_mask_storeu_ps(prow, tail_mask(l - j0), p);
        }
      }
      mm(yc, ldy, P.data(), L, xs.data(), V, l, l, V, true, true, row_decay.data());
      if (!direct) {
        for (int64_t i = 0; i < l; ++i) {
          const float* vrow = vp + (t0 + i) * vs0 + h * vs1;
          float* orow = op + ((t0 + i) * H + h) * V;
          for (int64_t e = 0; e < V; ++e) orow[e] = scale * y[i * V + e] + d_h * vrow[e];
        }
      }
      // State: S_out = exp(A_{l-1}) S_in + kT xe.
      std::fill_n(row_decay.data(), K, static_cast<float>(std::exp(last)));
      mm(S, V, kT.data() + (c * G + g) * K * L, L, xe.data(), V, K, l, V, true, false, row_decay.data());
    }
    std::copy_n(S_all.data(), (h1 - h0) * K * V, state_b + h0 * K * V);
  });
  return out;
}

// Mamba-2's output tail, in place on y [T, E] (contiguous): y ← w ⊙ rms_norm_per_group((y + D x) ⊙ silu(z)),
// D [H] per head of E / H channels (with x [T, E], or both absent), each of the G groups of E / G channels
// normalised on its own; z and x may be row-strided (column views of in_proj's and the conv's outputs).
// One pass per row, items of 16 rows; torch's form makes seven [T, E] temporaries.
at::Tensor gated_rms_norm_(at::Tensor y, const at::Tensor& z, const at::Tensor& w, double eps_d, int64_t groups,
                           const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& D) {
  check_f32_rows(y, "y", 2);
  check_f32_rows(z, "z", 2);
  const int64_t T = y.size(0), E = y.size(1);
  TORCH_CHECK(y.is_contiguous() && z.size(0) == T && z.size(1) == E, "y [T, E] contiguous and z [T, E]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == E, "weight must be float32 [E]");
  TORCH_CHECK(groups >= 1 && E % groups == 0, "E must be a multiple of groups");
  const bool skip = x.has_value() && x->defined() && D.has_value() && D->defined();
  int64_t P = E;
  if (skip) {
    check_f32_rows(*x, "x", 2);
    TORCH_CHECK(x->size(0) == T && x->size(1) == E, "x must be [T, E]");
    TORCH_CHECK(D->scalar_type() == at::kFloat && D->is_contiguous() && D->numel() >= 1 && E % D->numel() == 0,
                "D must be float32 [H] with E a multiple of H");
    P = E / D->numel();
  }
  const int64_t gs = E / groups, zs = z.stride(0), xs = skip ? x->stride(0) : 0;
  const float eps = static_cast<float>(eps_d);
  float* yp = y.data_ptr<float>();
  const float *zp = z.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* xp = skip ? x->data_ptr<float>() : nullptr;
  const float* dp = skip ? D->data_ptr<float>() : nullptr;
  parallel_ranges(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = yp + t * E;
      const float* zrow = zp + t * zs;
      if (skip) {
        const float* xrow = xp + t * xs;
        for (int64_t h0 = 0; h0 < E; h0 += P) {
          const __m512 d = _mm512_set1_ps(dp[h0 / P]);
          for (int64_t e = h0; e < h0 + P; e += 16) {
            const __mmask16 m = tail_mask(h0 + P - e);
            const __m512 v = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, xrow + e), _mm512_maskz_loadu_ps(m, row + e));
            _mm512_mask_storeu_ps(row + e, m, v);
          }
        }
      }
      for (int64_t g0 = 0; g0 < E; g0 += gs) {
        __m512 ss = _mm512_setzero_ps();
        for (int64_t e = g0; e < g0 + gs; e += 16) {
          const __mmask16 m = tail_mask(g0 + gs - e);
          const __m512 zv = _mm512_maskz_loadu_ps(m, zrow + e);
          const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                           _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), zv))));
          const __m512 h = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + e), _mm512_mul_ps(zv, sig));
          _mm512_mask_storeu_ps(row + e, m, h);
          ss = _mm512_fmadd_ps(h, h, ss);
        }
        const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(gs) + eps));
        for (int64_t e = g0; e < g0 + gs; e += 16) {
          const __mmask16 m = tail_mask(g0 + gs - e);
          const __m512 h = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + e), r);
          _mm512_mask_storeu_ps(row + e, m, _mm512_mul_ps(h, _mm512_maskz_loadu_ps(m, wp + e)));
        }
      }
    }
  });
  return y;
}

// Mamba-2's step sizes Δ = clamp(softplus(dt + dt_bias), lo, hi) [T, H] contiguous, from in_proj's dt
// columns dt [T, H] (row-strided); dt_bias [H]. softplus as torch's (x itself above 20), 8 heads a vector.
at::Tensor mamba2_delta(const at::Tensor& dt, const at::Tensor& dt_bias, double lo, double hi) {
  check_f32_rows(dt, "dt", 2);
  const int64_t T = dt.size(0), H = dt.size(1);
  TORCH_CHECK(dt_bias.scalar_type() == at::kFloat && dt_bias.is_contiguous() && dt_bias.numel() == H,
              "dt_bias must be float32 [H]");
  at::Tensor delta = at::empty({T, H}, dt.options());
  const float *dp = dt.data_ptr<float>(), *bp = dt_bias.data_ptr<float>();
  float* op = delta.data_ptr<float>();
  const int64_t ds = dt.stride(0);
  const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  const __m256 vlo = _mm256_set1_ps(flo), vhi = _mm256_set1_ps(fhi);
  for (int64_t t = 0; t < T; ++t) {
    int64_t h = 0;
    for (; h + 8 <= H; h += 8) {  // panels.h's softplus256 (absolute error < 1e-7 against log1p)
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(dp + t * ds + h), _mm256_loadu_ps(bp + h));
      _mm256_storeu_ps(op + t * H + h, _mm256_min_ps(_mm256_max_ps(softplus256(v), vlo), vhi));
    }
    for (; h < H; ++h) op[t * H + h] = std::min(std::max(softplus1(dp[t * ds + h] + bp[h]), flo), fhi);
  }
  return delta;
}

// The residual stream between two layers: h += delta (in place, h and delta [T, D] contiguous), then the
// next layer's RMSNorm w ⊙ h / rms(h) into a new [T, D], one pass per row (torch's form is an add and
// a decomposed norm: five passes).
at::Tensor add_rms_norm_(at::Tensor h, const at::Tensor& delta, const at::Tensor& w, double eps_d) {
  check_f32_rows(h, "h", 2);
  check_f32_rows(delta, "delta", 2);
  const int64_t T = h.size(0), D = h.size(1);
  TORCH_CHECK(h.is_contiguous() && delta.is_contiguous() && delta.sizes() == h.sizes(), "h, delta [T, D] contiguous");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "weight must be float32 [D]");
  at::Tensor out = at::empty_like(h);
  float *hp = h.data_ptr<float>(), *op = out.data_ptr<float>();
  const float *dp = delta.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float eps = static_cast<float>(eps_d);
  parallel_ranges(T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = hp + t * D;
      const float* drow = dp + t * D;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t e = 0; e < D; e += 16) {
        const __mmask16 m = tail_mask(D - e);
        const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, row + e), _mm512_maskz_loadu_ps(m, drow + e));
        _mm512_mask_storeu_ps(row + e, m, v);
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + eps));
      for (int64_t e = 0; e < D; e += 16) {
        const __mmask16 m = tail_mask(D - e);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + e), r);
        _mm512_mask_storeu_ps(op + t * D + e, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, wp + e)));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu_ssd, m) {
  m.def(
      "ssd_varlen(Tensor q, Tensor k, Tensor v, Tensor? v_scale, Tensor? log_decay, Tensor? decay_rate, Tensor? D, "
      "Tensor(a!) state, "
      "int[] bounds, Tensor slot_ids, float scale, int chunk) -> Tensor");
  m.def(
      "gated_rms_norm_(Tensor(a!) y, Tensor z, Tensor weight, float eps, int groups, Tensor? x, Tensor? D) -> "
      "Tensor(a!)");
  m.def("mamba2_delta(Tensor dt, Tensor dt_bias, float lo, float hi) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) h, Tensor delta, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnserve_cpu_ssd, CPU, m) {
  m.impl("ssd_varlen", &ssd_varlen);
  m.impl("gated_rms_norm_", &gated_rms_norm_);
  m.impl("mamba2_delta", &mamba2_delta);
  m.impl("add_rms_norm_", &add_rms_norm_);
}
