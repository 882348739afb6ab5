// The fused CPU decode step of RWKV-4, RWKV-7, RetNet, DenseRetNet and DenseMamba (float32), one call
// per model step.
//
// Built by torch.utils.cpp_extension (see families.py) as its own extension, registered as
// torch.ops.rnnserve_cpu_rnn.*. Per step:
//   - one C++ call for the whole model (embedding, every layer, final norm, head): no Python per op;
//   - the projections through sgemm (MKL), the threads splitting the output columns, into buffers
//     allocated once per step, on the weights as the model stores them (no copies, no repacking);
//   - everything between the projections (token shift, lerps, low-rank decays and gates, the WKV-7 and
//     retention state updates in place by slot, rotation, group / per-head norms, gates, residuals)
//     in C++ loops, parallel over (sequence, head) with at::parallel_for where the work is large.
// Each model's torch decode is the reference this is tested against (tests/engine/test_cpu_decode_families.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <xmmintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using at::Tensor;

// Denormals flushed (FTZ + DAZ) for the scope of a loop body, then the caller's mode restored: a
// decaying state would otherwise spend most of its time in microcode assists.
struct FlushDenormals {
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
};

inline float sigmoid1(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu1(float x) { return x / (1.0f + std::exp(-x)); }

float* fp(const Tensor& t) { return t.data_ptr<float>(); }
const float* fptr_or_null(const Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// MKL's (or the BLAS torch links) Fortran sgemm, exported by libtorch_cpu.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
// MKL's per-thread thread count (0: back to the global setting); returns the previous one.
extern "C" int MKL_Set_Num_Threads_Local(int n);  // mkl_service.h's mkl_set_num_threads_local

// What a projection does to its own output slice right after the product (same thread, data in cache).
enum class Post { None, Tanh, Sigmoid, Silu, ReluSquare };

// One projection out[M, N] = x[M, K] · wᵀ (+ out when accumulate), then post: w a linear layer's weight
// [N, K], row-major or column-major (the CPU layout some families keep), read where it lies; x and out
// may have strided rows.
struct Job {
  Tensor x, w, out;
  bool accumulate = false;
  Post post = Post::None;
};

void apply_post(Post post, float* out, int64_t ldc, int64_t M, int64_t n0, int64_t n1) {
  if (post == Post::None) return;
  for (int64_t m = 0; m < M; ++m) {
    float* row = out + m * ldc;
    for (int64_t n = n0; n < n1; ++n) {
      const float x = row[n];
      if (post == Post::Tanh) {
        row[n] = std::tanh(x);
      } else if (post == Post::Sigmoid) {
        row[n] = sigmoid1(x);
      } else if (post == Post::Silu) {
        row[n] = silu1(x);
      } else {
        const float r = std::max(x, 0.0f);
        row[n] = r * r;
      }
    }
  }
}

// Several independent projections in one parallel region: each job's output columns are cut into one
// 16-aligned slice per thread, and thread t runs slice t of every job, each slice one single-threaded
// sgemm. One region per group instead of one per product: every region ends in a barrier, and on a
// shared machine a barrier waits for the slowest (descheduled) thread; MKL's own threading waited
// 10-20x longer than the product took there at 8-32 rows.
void linears(std::initializer_list<Job> jobs) {
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  const int64_t J = static_cast<int64_t>(jobs.size());
  for (const Job& j : jobs) {
    const Tensor &x = j.x, &w = j.w, &out = j.out;
    TORCH_CHECK(w.size(1) == x.size(1) && out.size(0) == x.size(0) && out.size(1) == w.size(0),
                "linear: shapes differ");
    TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && (w.stride(1) == 1 || w.stride(0) == 1),
                "linear: unit-stride rows (x, out) and a row- or column-major weight");
  }
  auto run = [&](int64_t item) {
    const Job& j = jobs.begin()[item % J];
    const int64_t t = item / J, M = j.x.size(0), K = j.x.size(1), N = j.w.size(0);
    const int64_t chunk = ((N + T - 1) / T + 15) / 16 * 16, n0 = t * chunk, n1 = std::min(N, n0 + chunk);
    if (n0 >= n1 || M == 0) return;
    const bool row_major = j.w.stride(1) == 1;
    const char ta = row_major ? 'T' : 'N', tb = 'N';
    const int lda = static_cast<int>(std::max<int64_t>(1, row_major ? j.w.stride(0) : j.w.stride(1)));
    const int ldb = static_cast<int>(std::max<int64_t>(1, j.x.stride(0)));
    const int ldc = static_cast<int>(std::max<int64_t>(1, j.out.stride(0)));
    const int m = static_cast<int>(n1 - n0), n = static_cast<int>(M), k = static_cast<int>(K);
    const float alpha = 1.0f, beta = j.accumulate ? 1.0f : 0.0f;
    const float* wp = j.w.data_ptr<float>();
    const float* a = row_major ? wp + n0 * lda : wp + n0;
    float* c = j.out.data_ptr<float>();
    const int saved = MKL_Set_Num_Threads_Local(1);
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, j.x.data_ptr<float>(), &ldb, &beta, c + n0, &ldc);
    MKL_Set_Num_Threads_Local(saved);
    apply_post(j.post, c, ldc, M, n0, n1);
  };
  at::parallel_for(0, T * J, J, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) run(i);
  });
}

void linear(const Tensor& x, const Tensor& w, Tensor& out, bool accumulate = false) {
  linears({Job{x, w, out, accumulate}});
}

// Rows of x [M, D] → y: LayerNorm (bias may be null) over D, as F.layer_norm (biased variance).
void layer_norm_rows(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * D;
    float* yr = y + m * D;
    float mean = 0.0f;
    for (int64_t i = 0; i < D; ++i) mean += xr[i];
    mean /= static_cast<float>(D);
    float var = 0.0f;
    for (int64_t i = 0; i < D; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const float inv = 1.0f / std::sqrt(var / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
  }
}

// y = x / sqrt(mean(x²) + eps) (* w when given), over n values (nn.RMSNorm).
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * (w ? w[i] : 1.0f);
}

Tensor embed(const Tensor& ids, const Tensor& emb) {
  const int64_t M = ids.size(0), D = emb.size(1);
  Tensor h = at::empty({M, D}, emb.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(id[m] >= 0 && id[m] < emb.size(0), "token id ", id[m], " out of range");
    std::copy_n(emb.data_ptr<float>() + id[m] * emb.stride(0), D, h.data_ptr<float>() + m * D);
  }
  return h;
}

// Every state pool a float32 tensor [S, ...] contiguous per slot; every slot id a distinct row of
// every pool (the loops below write there in parallel without further checks).
void check_states_and_slots(const Tensor& slots, const Tensor& ids, const std::vector<at::TensorList>& pools) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && ids.scalar_type() == at::kLong && slots.numel() == ids.numel() &&
                  slots.is_contiguous() && ids.is_contiguous(),
              "slot_ids and input_ids must be contiguous int64 of the same length");
  int64_t S = INT64_MAX;
  for (const auto& pool : pools)
    for (const Tensor& t : pool) {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() >= 2 && t[0].is_contiguous(),
                  "state pools must be float32 [slots, ...], contiguous per slot");
      S = std::min(S, t.size(0));
    }
  const int64_t* slot = slots.data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(S), false);
  for (int64_t b = 0; b < slots.numel(); ++b) {
    TORCH_CHECK(slot[b] >= 0 && slot[b] < S, "slot id ", slot[b], " out of range [0, ", S, ")");
    TORCH_CHECK(!seen[slot[b]], "slot id ", slot[b], " appears twice in one step");
    seen[slot[b]] = true;
  }
}

Tensor head_logits(const Tensor& hn, const Tensor& head_w) {
  Tensor out = at::empty({hn.size(0), head_w.size(0)}, hn.options());
  linear(hn, head_w, out);
  return out;
}

// x [M, K] · wᵀ for w [N, K] row- or column-major, through linear() whatever M (for tests of it alone).
Tensor linear_op(const Tensor& x, const Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.dim() == 2 && w.dim() == 2,
              "linear: 2-D float32 inputs");
  TORCH_CHECK(w.size(1) == x.size(1), "linear: inner dimensions differ");
  Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  linear(x, w, out);
  return out;
}

// ---------------------------------------------------------------------------------------------- RWKV-7

// RWKV-7 decode, every layer (see models/rwkv7.py for the maths). ln0 [2, D] (weight, bias; empty: no
// LN0), ln_out [2, D], per layer l: ln[l] = [4, D] (ln1 w, b, ln2 w, b; zero biases where none), mix[l] = [10, D] (x_r, x_w, x_k, x_v, x_a, x_g, k_k, k_a, r_k flattened, ffn x_k),
// lora_b[l] = [3, D] (w0, a0, v0; v0 unused in layer 0), ln_x[l] = [2, D]; the projections r, k, v, o
// [D, D], the low-rank pairs w1 [Rw, D] / w2 [D, Rw] (likewise a, v, g; v1/v2 of layer 0 are empty), ffn
// key [F, D] and value [D, F]. States: att_x [S, D], wkv [S, H, N, N] ([K, V]), ffn_x [S, D] updated in
// place at rows slots[b]. Returns logits [B, Vocab].
Tensor rwkv7_decode(const Tensor& ids, const Tensor& slots, const Tensor& emb, const Tensor& ln0,
                    at::TensorList ln, at::TensorList mix, at::TensorList lora_b, at::TensorList ln_x,
                    at::TensorList r_w, at::TensorList k_w, at::TensorList v_w, at::TensorList o_w,
                    at::TensorList w1, at::TensorList w2, at::TensorList a1, at::TensorList a2, at::TensorList v1,
                    at::TensorList v2, at::TensorList g1, at::TensorList g2, at::TensorList ffn_k,
                    at::TensorList ffn_v, at::TensorList att_x, at::TensorList wkv, at::TensorList ffn_x,
                    const Tensor& ln_out, const Tensor& head_w, int64_t H, double eps_d, double gn_eps_d) {
  const float eps = static_cast<float>(eps_d), gn_eps = static_cast<float>(gn_eps_d);
  const float decay_scale = std::exp(-0.5f);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(r_w.size()), N = D / H;
  const int64_t F = ffn_k[0].size(0);
  TORCH_CHECK(H * N == D, "rwkv7_decode: hidden size ", D, " is not heads x head size");
  check_states_and_slots(slots, ids, {att_x, wkv, ffn_x});
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);                  // [B, D] residual stream
  Tensor xx = at::empty({B, D}, opts);         // LN output
  Tensor lerp = at::empty({6, B, D}, opts);    // x_r, x_w, x_k, x_v, x_a, x_g
  Tensor r = at::empty({B, D}, opts), k = at::empty({B, D}, opts), v = at::empty({B, D}, opts);
  Tensor v_first = at::empty({B, D}, opts);
  Tensor wp = at::empty({B, D}, opts), ap = at::empty({B, D}, opts), vp = at::empty({B, D}, opts);
  Tensor g = at::empty({B, D}, opts), o = at::empty({B, D}, opts), hid = at::empty({B, F}, opts);
  int64_t R = 0;
  for (int64_t l = 0; l < L; ++l)
    for (const auto* lst : {&w1, &a1, &v1, &g1}) R = std::max(R, (*lst)[l].size(0));
  Tensor low = at::empty({B, 4 * R}, opts);
  float* hp = fp(h);
  float* xxp = fp(xx);
  float* lp = fp(lerp);
  if (ln0.numel()) layer_norm_rows(hp, fp(ln0), fp(ln0) + D, hp, B, D, eps);
  for (int64_t l = 0; l < L; ++l) {
    const float* lnp = fp(ln[l]);
    const float* mx = fp(mix[l]);
    const float* lb = fp(lora_b[l]);
    float* ax = fp(att_x[l]);
    float* fx = fp(ffn_x[l]);
    const int64_t ax_s = att_x[l].stride(0), fx_s = ffn_x[l].stride(0);
    // LN1, token shift (the slot's previous LN1 output, replaced by this one) and the six lerps: a few
    // µs of work, done by this thread (a parallel region would cost a barrier).
    for (int64_t b = 0; b < B; ++b) {
      float* xr = xxp + b * D;
      layer_norm_rows(hp + b * D, lnp, lnp + D, xr, 1, D, eps);
      float* prev = ax + slot[b] * ax_s;
      for (int64_t i = 0; i < D; ++i) {
        const float delta = prev[i] - xr[i];
        prev[i] = xr[i];
        for (int64_t j = 0; j < 6; ++j) lp[(j * B + b) * D + i] = xr[i] + delta * mx[j * D + i];
      }
    }
    // r, k, v and the low-rank pairs' first halves in one region ([B, rank] buffers narrowed from one
    // [B, 4 max rank] block), then the second halves in another.
    const bool first = v1[l].numel() == 0;
    Tensor wl = low.narrow(1, 0, w1[l].size(0)), al = low.narrow(1, R, a1[l].size(0));
    Tensor gl = low.narrow(1, 2 * R, g1[l].size(0)), vl = low.narrow(1, 3 * R, first ? 0 : v1[l].size(0));
    Tensor x_r = lerp[0], x_w = lerp[1], x_k = lerp[2], x_v = lerp[3], x_a = lerp[4], x_g = lerp[5];
    if (first) {
      linears({{x_r, r_w[l], r}, {x_k, k_w[l], k}, {x_v, v_w[l], v}, {x_w, w1[l], wl, false, Post::Tanh},
               {x_a, a1[l], al}, {x_g, g1[l], gl, false, Post::Sigmoid}});
      linears({{wl, w2[l], wp}, {al, a2[l], ap}, {gl, g2[l], g}});
    } else {
      linears({{x_r, r_w[l], r}, {x_k, k_w[l], k}, {x_v, v_w[l], v}, {x_w, w1[l], wl, false, Post::Tanh},
               {x_a, a1[l], al}, {x_g, g1[l], gl, false, Post::Sigmoid}, {x_v, v1[l], vl}});
      linears({{wl, w2[l], wp}, {al, a2[l], ap}, {gl, g2[l], g}, {vl, v2[l], vp}});
    }
    // Per (sequence, head): decays, κ, k, value residual, the WKV update in place, group norm, bonus.
    float* wkv_p = fp(wkv[l]);
    const int64_t wkv_s = wkv[l].stride(0);
    const float* gx = fp(ln_x[l]);
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      std::vector<float> w_(N), a_(N), kk(N), b_(N), sa(N);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, hh = t % H, off = b * D + hh * N;
        float* rr = fp(r) + off;
        float* kr = fp(k) + off;
        float* vr = fp(v) + off;
        float* vf = fp(v_first) + off;
        float* orow = fp(o) + off;
        const float* kkw = mx + 6 * D + hh * N;  // k_k
        const float* kaw = mx + 7 * D + hh * N;  // k_a
        const float* rkw = mx + 8 * D + hh * N;  // r_k
        float nrm = 0.0f;
        for (int64_t i = 0; i < N; ++i) {
          w_[i] = std::exp(-decay_scale * sigmoid1(fp(wp)[off + i] + lb[hh * N + i]));
          a_[i] = sigmoid1(fp(ap)[off + i] + lb[D + hh * N + i]);
          kk[i] = kr[i] * kkw[i];
          nrm += kk[i] * kk[i];
        }
        const float inv = 1.0f / std::max(std::sqrt(nrm), 1e-12f);  // F.normalize
        for (int64_t i = 0; i < N; ++i) {
          kk[i] *= inv;
          b_[i] = kk[i] * a_[i];
          kr[i] = kr[i] * (1.0f + (a_[i] - 1.0f) * kaw[i]);
        }
        if (first) {
          std::copy_n(vr, N, vf);
        } else {
          for (int64_t i = 0; i < N; ++i) vr[i] += (vf[i] - vr[i]) * sigmoid1(fp(vp)[off + i] + lb[2 * D + hh * N + i]);
        }
        // S [K, V]: sa = (−κ)ᵀ S; S ← diag(w) S + b saᵀ + k vᵀ; o = rᵀ S.
        float* S = wkv_p + slot[b] * wkv_s + hh * N * N;
        std::fill(sa.begin(), sa.end(), 0.0f);
        for (int64_t i = 0; i < N; ++i) {
          const float ai = -kk[i];
          const float* Si = S + i * N;
          for (int64_t j = 0; j < N; ++j) sa[j] += ai * Si[j];
        }
        std::fill(orow, orow + N, 0.0f);
        for (int64_t i = 0; i < N; ++i) {
          const float wi = w_[i], bi = b_[i], ki = kr[i], ri = rr[i];
          float* Si = S + i * N;
          for (int64_t j = 0; j < N; ++j) {
            const float s = wi * Si[j] + bi * sa[j] + ki * vr[j];
            Si[j] = s;
            orow[j] += ri * s;
          }
        }
        // GroupNorm over the head, then the bonus (Σ r ⊙ k ⊙ r_k) v.
        float mean = 0.0f, var = 0.0f, bonus = 0.0f;
        for (int64_t j = 0; j < N; ++j) mean += orow[j];
        mean /= static_cast<float>(N);
        for (int64_t j = 0; j < N; ++j) var += (orow[j] - mean) * (orow[j] - mean);
        const float ginv = 1.0f / std::sqrt(var / static_cast<float>(N) + gn_eps);
        for (int64_t j = 0; j < N; ++j) bonus += rr[j] * kr[j] * rkw[j];
        const float* gw = gx + hh * N;
        const float* gb = gx + D + hh * N;
        const float* gg = fp(g) + off;
        for (int64_t j = 0; j < N; ++j) orow[j] = ((orow[j] - mean) * ginv * gw[j] + gb[j] + bonus * vr[j]) * gg[j];
      }
    });
    linear(o, o_w[l], h, true);
    // Channel mixing: LN2, token shift, relu(k)² and the value projection into the residual.
    for (int64_t b = 0; b < B; ++b) {
      float* xr = xxp + b * D;
      layer_norm_rows(hp + b * D, lnp + 2 * D, lnp + 3 * D, xr, 1, D, eps);
      float* prev = fx + slot[b] * fx_s;
      for (int64_t i = 0; i < D; ++i) {
        const float cur = xr[i];
        xr[i] = cur + (prev[i] - cur) * mx[9 * D + i];
        prev[i] = cur;
      }
    }
    linears({{xx, ffn_k[l], hid, false, Post::ReluSquare}});
    linear(hid, ffn_v[l], h, true);
  }
  layer_norm_rows(hp, fp(ln_out), fp(ln_out) + D, xxp, B, D, eps);
  return head_logits(xx, head_w);
}

// ---------------------------------------------------------------------------------------------- RWKV-4

// RWKV-4 decode, every layer (see models/rwkv4.py). ln0 [2, D] and ln_out [2, D] (weight, bias); per layer
// ln[l] [4, D] (ln1 w, b, ln2 w, b), mix[l] [5, D] (att time_mix k, v, r; ffn time_mix k, r), wu[l] [2, A]
// (w = -exp(time_decay), u = time_first, fp32); att key / value / receptance [A, D], output [D, A]; ffn
// key [F, D], receptance [D, D], value [D, F]. States att_x [S, D], aa / bb / pp [S, A], ffn_x [S, D]
// updated in place at rows slots[b]. Returns logits [B, Vocab].
Tensor rwkv4_decode(const Tensor& ids, const Tensor& slots, const Tensor& emb, const Tensor& ln0,
                    at::TensorList ln, at::TensorList mix, at::TensorList wu, at::TensorList att_k,
                    at::TensorList att_v, at::TensorList att_r, at::TensorList att_o, at::TensorList ffn_k,
                    at::TensorList ffn_r, at::TensorList ffn_v, at::TensorList att_x, at::TensorList aa,
                    at::TensorList bb, at::TensorList pp, at::TensorList ffn_x, const Tensor& ln_out,
                    const Tensor& head_w, double eps_d) {
  const float eps = static_cast<float>(eps_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(att_k.size());
  const int64_t A = att_k[0].size(0), F = ffn_k[0].size(0);
  check_states_and_slots(slots, ids, {att_x, aa, bb, pp, ffn_x});
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);
  Tensor lerp = at::empty({3, B, D}, opts);
  Tensor r = at::empty({B, A}, opts), k = at::empty({B, A}, opts), v = at::empty({B, A}, opts);
  Tensor hid = at::empty({B, F}, opts), ff = at::empty({B, D}, opts), rf = at::empty({B, D}, opts);
  float* hp = fp(h);
  float* lp = fp(lerp);
  layer_norm_rows(hp, fp(ln0), fp(ln0) + D, hp, B, D, eps);
  // LN, token shift (the slot's previous LN output, replaced by this one) and n lerps x·μ + prev·(1 − μ),
  // by this thread (a few µs; a parallel region would cost a barrier).
  std::vector<float> xx(D);
  auto shift_mix = [&](const float* lnw, float* shift, int64_t shift_s, const float* mu, int64_t n) {
    for (int64_t b = 0; b < B; ++b) {
      layer_norm_rows(hp + b * D, lnw, lnw + D, xx.data(), 1, D, eps);
      float* prev = shift + slot[b] * shift_s;
      for (int64_t i = 0; i < D; ++i) {
        for (int64_t j = 0; j < n; ++j) lp[(j * B + b) * D + i] = xx[i] * mu[j * D + i] + prev[i] * (1 - mu[j * D + i]);
        prev[i] = xx[i];
      }
    }
  };
  for (int64_t l = 0; l < L; ++l) {
    const float* lnp = fp(ln[l]);
    const float* mx = fp(mix[l]);
    shift_mix(lnp, fp(att_x[l]), att_x[l].stride(0), mx, 3);
    Tensor x_k = lerp[0], x_v = lerp[1], x_r = lerp[2];
    linears({{x_k, att_k[l], k}, {x_v, att_v[l], v}, {x_r, att_r[l], r}});
    // The WKV step with the running max, in place (models/rwkv4.py); r ← σ(r) ⊙ wkv.
    const float* w = fp(wu[l]);
    const float* u = w + A;
    float *ap = fp(aa[l]), *bp = fp(bb[l]), *pq = fp(pp[l]);
    const int64_t as = aa[l].stride(0), bs = bb[l].stride(0), ps = pp[l].stride(0);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      FlushDenormals ftz;
      for (int64_t b = b0; b < b1; ++b) {
        float *a_ = ap + slot[b] * as, *b_ = bp + slot[b] * bs, *p_ = pq + slot[b] * ps;
        const float* kr = fp(k) + b * A;
        const float* vr = fp(v) + b * A;
        float* rr = fp(r) + b * A;
        for (int64_t c = 0; c < A; ++c) {
          const float kc = kr[c], vc = vr[c], ac = a_[c], bc = b_[c], pc = p_[c];
          const float uk = u[c] + kc;
          float q = std::max(pc, uk);
          float e1 = std::exp(pc - q), e2 = std::exp(uk - q);
          const float out = (e1 * ac + e2 * vc) / (e1 * bc + e2);
          const float pw = pc + w[c];
          q = std::max(pw, kc);
          e1 = std::exp(pw - q);
          e2 = std::exp(kc - q);
          a_[c] = e1 * ac + e2 * vc;
          b_[c] = e1 * bc + e2;
          p_[c] = q;
          rr[c] = sigmoid1(rr[c]) * out;
        }
      }
    });
    linear(r, att_o[l], h, true);
    shift_mix(lnp + 2 * D, fp(ffn_x[l]), ffn_x[l].stride(0), mx + 3 * D, 2);
    Tensor f_k = lerp[0], f_r = lerp[1];
    linears({{f_k, ffn_k[l], hid, false, Post::ReluSquare}, {f_r, ffn_r[l], rf, false, Post::Sigmoid}});
    linear(hid, ffn_v[l], ff);
    const float* rfp = fp(rf);
    const float* ffp = fp(ff);
    for (int64_t i = 0; i < B * D; ++i) hp[i] += rfp[i] * ffp[i];
  }
  Tensor xn = at::empty({B, D}, opts);
  layer_norm_rows(hp, fp(ln_out), fp(ln_out) + D, fp(xn), B, D, eps);
  return head_logits(xn, head_w);
}

// ---------------------------------------------------------------------------------------------- RetNet

// One retention step of a batch, shared by RetNet and DenseRetNet: the per-step constants (rotation
// phases and the sqrt_cn factor per sequence, γ per head; fp32 as the torch path) and the per-layer
// work on projected q, k, v.
struct Retention {
  int64_t B, H, Hkv, dk, dv, dvs, half, style, norm;
  bool feature_map, value_act;
  float scale, eps;
  std::vector<float> cosv, sinv, cn, decay;

  Retention(const int64_t* pos, int64_t B_, int64_t H_, int64_t Hkv_, int64_t dk_, int64_t dv_, int64_t style_,
            int64_t norm_, bool feature_map_, bool value_act_, float scale_, float eps_, const Tensor& inv_freq,
            const Tensor& log_gamma)
      : B(B_), H(H_), Hkv(Hkv_), dk(dk_), dv(dv_), dvs(dv_ + (norm_ == 2 ? 1 : 0)), half(dk_ / 2), style(style_),
        norm(norm_), feature_map(feature_map_), value_act(value_act_), scale(scale_), eps(eps_),
        cosv(B_ * (dk_ / 2)), sinv(B_ * (dk_ / 2)), cn(B_ * H_, 1.0f), decay(H_) {
    const float* inv = fp(inv_freq);
    const float* lg = fp(log_gamma);
    for (int64_t b = 0; b < B; ++b) {
      const float p = static_cast<float>(pos[b]);
      for (int64_t i = 0; i < half; ++i) {
        const float th = p * inv[i];
        cosv[b * half + i] = std::cos(th);
        sinv[b * half + i] = std::sin(th);
      }
      if (norm != 0)
        for (int64_t hh = 0; hh < H; ++hh)
          cn[b * H + hh] = 1.0f / std::sqrt(std::expm1((p + 1.0f) * lg[hh]) / std::expm1(lg[hh]));
    }
    for (int64_t hh = 0; hh < H; ++hh) decay[hh] = std::exp(lg[hh]);
  }

  // q [B, H dk], k [B, Hkv dk], v [B, Hkv dv] (rows ldq / ldk / ldv apart; q and k rotated in place, on
  // this thread), then per (sequence, head) in parallel: S ← γ S + kᵀ v in place at the slot's row,
  // o = scale q S, the output normalisation, the per-head RMSNorm (weight gnw or none) and the gate
  // (o ⊙ silu(g) or o ⊙ g; none when gate is null). o [B, H dv] contiguous.
  void step(float* q, int64_t ldq, float* k, int64_t ldk, float* v, int64_t ldv, const float* gate, int64_t ldg,
            bool gate_silu, const float* gnw, float* o, float* st, int64_t st_s, const int64_t* slot) const {
    std::vector<float> tmp(dk);
    for (int64_t b = 0; b < B; ++b) {
      const float* c = cosv.data() + b * half;
      const float* s = sinv.data() + b * half;
      auto rot = [&](float* x, int64_t heads) {
        for (int64_t hh = 0; hh < heads; ++hh) {
          float* xh = x + hh * dk;
          if (feature_map)
            for (int64_t i = 0; i < dk; ++i) xh[i] = silu1(xh[i]);
          std::copy_n(xh, dk, tmp.data());
          for (int64_t i = 0; i < half; ++i) {
            if (style == 0) {  // halves
              xh[i] = tmp[i] * c[i] - tmp[i + half] * s[i];
              xh[i + half] = tmp[i + half] * c[i] + tmp[i] * s[i];
            } else {  // pairs (2i, 2i+1)
              xh[2 * i] = tmp[2 * i] * c[i] - tmp[2 * i + 1] * s[i];
              xh[2 * i + 1] = tmp[2 * i + 1] * c[i] + tmp[2 * i] * s[i];
            }
          }
        }
      };
      rot(q + b * ldq, H);
      rot(k + b * ldk, Hkv);
      if (value_act)
        for (int64_t i = 0; i < Hkv * dv; ++i) v[b * ldv + i] = silu1(v[b * ldv + i]);
    }
    const int64_t rep = H / Hkv;
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      std::vector<float> acc(dvs);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, hh = t % H, kvh = hh / rep;
        const float* qh = q + b * ldq + hh * dk;
        const float* kh = k + b * ldk + kvh * dk;
        const float* vh = v + b * ldv + kvh * dv;
        float* S = st + slot[b] * st_s + hh * dk * dvs;
        const float gm = decay[hh];
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t i = 0; i < dk; ++i) {
          float* Si = S + i * dvs;
          const float ki = kh[i], qi = qh[i];
          for (int64_t j = 0; j < dv; ++j) {
            const float sv = gm * Si[j] + ki * vh[j];
            Si[j] = sv;
            acc[j] += qi * sv;
          }
          if (dvs > dv) {  // abs_sum: the key sum rides in the last column (v = 1)
            const float sv = gm * Si[dv] + ki;
            Si[dv] = sv;
            acc[dv] += qi * sv;
          }
        }
        float* oh = o + (b * H + hh) * dv;
        const float cb = cn[b * H + hh];
        const float div = norm == 2 ? std::max(1.0f, std::abs(scale * acc[dv] * cb)) : 1.0f;
        for (int64_t j = 0; j < dv; ++j) oh[j] = scale * acc[j] * cb / div;
        rms_norm(oh, gnw, oh, dv, eps);
        if (gate) {
          const float* gh = gate + b * ldg + hh * dv;
          for (int64_t j = 0; j < dv; ++j) oh[j] *= gate_silu ? silu1(gh[j]) : gh[j];
        }
      }
    });
  }
};

const int64_t* checked_positions(const Tensor& positions, int64_t B) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == B && positions.is_contiguous(),
              "positions must be contiguous int64 [B]");
  return positions.data_ptr<int64_t>();
}

// RetNet decode, every layer (see models/retnet.py). Per layer: attn_norm [D]; q [H dk, D], k and v
// [Hkv dk | Hkv dv, D], g [H dv, D] (empty: no output gate), o [D, H dv]; gnorm [dv] (empty: not affine);
// with an MLP mlp_norm [D], gate / up [I, D], down [D, I] (empty lists: none). State S [S, H, dk, dv']
// (dv' = dv + 1 with abs_sum: the last column sums the keys) updated in place at rows slots[b].
// style 0 = fla (halves rotated), 1 = torchscale (pairs); norm 0 none, 1 sqrt_cn, 2 abs_sum.
Tensor retnet_decode(const Tensor& ids, const Tensor& positions, const Tensor& slots, const Tensor& emb,
                     at::TensorList attn_norm, at::TensorList q_w, at::TensorList k_w, at::TensorList v_w,
                     at::TensorList g_w, at::TensorList o_w, at::TensorList gnorm, at::TensorList mlp_norm,
                     at::TensorList gate_w, at::TensorList up_w, at::TensorList down_w, at::TensorList state,
                     const Tensor& inv_freq, const Tensor& log_gamma, const Tensor& norm_f, const Tensor& head_w,
                     int64_t H, int64_t Hkv, int64_t dk, int64_t dv, int64_t style, int64_t norm,
                     bool feature_map, bool value_act, double scale_d, double eps_d) {
  const float eps = static_cast<float>(eps_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(q_w.size());
  const bool gated = !g_w.empty() && g_w[0].numel(), has_mlp = !gate_w.empty();
  const int64_t* pos = checked_positions(positions, B);
  check_states_and_slots(slots, ids, {state});
  const Retention ret(pos, B, H, Hkv, dk, dv, style, norm, feature_map, value_act, static_cast<float>(scale_d), eps,
                      inv_freq, log_gamma);
  TORCH_CHECK(state[0].dim() == 4 && state[0].size(1) == H && state[0].size(2) == dk && state[0].size(3) == ret.dvs,
              "retnet_decode: state shape");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);
  Tensor xn = at::empty({B, D}, opts);
  Tensor q = at::empty({B, H * dk}, opts), k = at::empty({B, Hkv * dk}, opts), v = at::empty({B, Hkv * dv}, opts);
  Tensor g = at::empty({B, gated ? H * dv : 0}, opts), o = at::empty({B, H * dv}, opts);
  const int64_t I = has_mlp ? gate_w[0].size(0) : 0;
  Tensor gt = at::empty({B, I}, opts), up = at::empty({B, I}, opts);
  float* hp = fp(h);
  float* xp = fp(xn);
  for (int64_t l = 0; l < L; ++l) {
    const float* nw = fp(attn_norm[l]);
    for (int64_t b = 0; b < B; ++b) rms_norm(hp + b * D, nw, xp + b * D, D, eps);
    if (gated) {
      linears({{xn, q_w[l], q}, {xn, k_w[l], k}, {xn, v_w[l], v}, {xn, g_w[l], g}});
    } else {
      linears({{xn, q_w[l], q}, {xn, k_w[l], k}, {xn, v_w[l], v}});
    }
    ret.step(fp(q), H * dk, fp(k), Hkv * dk, fp(v), Hkv * dv, gated ? fp(g) : nullptr, H * dv, true,
             gnorm.empty() ? nullptr : fptr_or_null(gnorm[l]), fp(o), fp(state[l]), state[l].stride(0), slot);
    linear(o, o_w[l], h, true);
    if (has_mlp) {
      const float* mw = fp(mlp_norm[l]);
      for (int64_t b = 0; b < B; ++b) rms_norm(hp + b * D, mw, xp + b * D, D, eps);
      linears({{xn, gate_w[l], gt, false, Post::Silu}, {xn, up_w[l], up}});
      float* gp = fp(gt);
      const float* upp = fp(up);
      for (int64_t i = 0; i < B * I; ++i) gp[i] *= upp[i];
      linear(gt, down_w[l], h, true);
    }
  }
  const float* nf = fp(norm_f);
  for (int64_t b = 0; b < B; ++b) rms_norm(hp + b * D, nf, xp + b * D, D, eps);
  return head_logits(xn, head_w);
}

// DenseRetNet decode, every layer (see models/dense_retnet.py). Per layer: in_norm [D]; q / k [qk, D];
// hidden [2E, D] (v_raw then gate); out [D, E]; gnorm [dv]; for fusing layers (l >= 1, m >= 1) k_sel1 /
// v_sel1 [D/32, D], k_sel2 [qk, D/32], v_sel2 [E, D/32], k_norm [qk], v_norm [E] (empty otherwise).
// q = silu(W_q x̂), k_raw = silu(W_k x̂) k_scale, [v_raw, gate] = silu(W_hidden x̂); a fusing layer adds
// silu(select(x̂)) ⊙ each of the last m layers' k_raw / v_raw (oldest first; zeros before layer 0) and
// RMS-normalises; torchscale retention with sqrt_cn, scale 1; h += W_out(norm(o) ⊙ gate). State S
// [S, H, dk, dv] updated in place at rows slots[b].
Tensor dense_retnet_decode(const Tensor& ids, const Tensor& positions, const Tensor& slots, const Tensor& emb,
                           at::TensorList in_norm, at::TensorList q_w, at::TensorList k_w, at::TensorList hid_w,
                           at::TensorList out_w, at::TensorList gnorm, at::TensorList k_sel1, at::TensorList k_sel2,
                           at::TensorList v_sel1, at::TensorList v_sel2, at::TensorList k_norm,
                           at::TensorList v_norm, at::TensorList state, const Tensor& inv_freq,
                           const Tensor& log_gamma, const Tensor& norm_f, const Tensor& head_w, int64_t H,
                           int64_t m, double k_scale_d, double eps_d) {
  const float eps = static_cast<float>(eps_d), k_scale = static_cast<float>(k_scale_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(q_w.size());
  const int64_t QK = q_w[0].size(0), E = out_w[0].size(1), dk = QK / H, dv = E / H;
  const int64_t* pos = checked_positions(positions, B);
  check_states_and_slots(slots, ids, {state});
  const Retention ret(pos, B, H, H, dk, dv, 1, 1, false, false, 1.0f, eps, inv_freq, log_gamma);
  TORCH_CHECK(state[0].dim() == 4 && state[0].size(1) == H && state[0].size(2) == dk && state[0].size(3) == dv,
              "dense_retnet_decode: state shape");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);
  Tensor xn = at::empty({B, D}, opts);
  Tensor q = at::empty({B, QK}, opts), k = at::empty({B, QK}, opts), hid = at::empty({B, 2 * E}, opts);
  Tensor kf = at::empty({B, QK}, opts), vf = at::empty({B, E}, opts), o = at::empty({B, E}, opts);
  const int64_t S1 = std::max<int64_t>(1, D / 32);
  Tensor sel = at::empty({B, 2 * S1}, opts), gk = at::empty({B, QK}, opts), gv = at::empty({B, E}, opts);
  Tensor ks = sel.narrow(1, 0, S1), vs = sel.narrow(1, S1, S1);
  // The last m layers' pre-fusion k and v for this step's tokens (oldest first), zeros before layer 0.
  Tensor past_k = at::zeros({std::max<int64_t>(m, 1), B, QK}, opts);
  Tensor past_v = at::zeros({std::max<int64_t>(m, 1), B, E}, opts);
  float* hp = fp(h);
  float* xp = fp(xn);
  float* hd = fp(hid);
  for (int64_t l = 0; l < L; ++l) {
    const bool fuse = m > 0 && l > 0;
    for (int64_t b = 0; b < B; ++b) rms_norm(hp + b * D, fp(in_norm[l]), xp + b * D, D, eps);
    if (fuse) {
      linears({{xn, q_w[l], q, false, Post::Silu}, {xn, k_w[l], k, false, Post::Silu},
               {xn, hid_w[l], hid, false, Post::Silu}, {xn, k_sel1[l], ks, false, Post::Silu},
               {xn, v_sel1[l], vs, false, Post::Silu}});
      linears({{ks, k_sel2[l], gk, false, Post::Silu}, {vs, v_sel2[l], gv, false, Post::Silu}});
    } else {
      linears({{xn, q_w[l], q, false, Post::Silu}, {xn, k_w[l], k, false, Post::Silu},
               {xn, hid_w[l], hid, false, Post::Silu}});
    }
    float* kp = fp(k);
    for (int64_t i = 0; i < B * QK; ++i) kp[i] *= k_scale;
    float *kin = kp, *vin = hd;  // v_raw: the first E columns of hid (rows 2E apart)
    int64_t ldv = 2 * E;
    if (fuse) {
      float *kfp = fp(kf), *vfp = fp(vf);
      const float *gkp = fp(gk), *gvp = fp(gv), *pk = fp(past_k), *pv = fp(past_v);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < QK; ++i) {
          float acc = kp[b * QK + i];
          for (int64_t j = 0; j < m; ++j) acc = acc + gkp[b * QK + i] * pk[(j * B + b) * QK + i];
          kfp[b * QK + i] = acc;
        }
        for (int64_t i = 0; i < E; ++i) {
          float acc = hd[b * 2 * E + i];
          for (int64_t j = 0; j < m; ++j) acc = acc + gvp[b * E + i] * pv[(j * B + b) * E + i];
          vfp[b * E + i] = acc;
        }
        rms_norm(kfp + b * QK, fp(k_norm[l]), kfp + b * QK, QK, eps);
        rms_norm(vfp + b * E, fp(v_norm[l]), vfp + b * E, E, eps);
      }
      kin = kfp;
      vin = vfp;
      ldv = E;
    }
    if (m > 0) {  // this layer's pre-fusion k and v join the window (the oldest leaves)
      for (int64_t j = 0; j + 1 < m; ++j) {
        past_k[j].copy_(past_k[j + 1]);
        past_v[j].copy_(past_v[j + 1]);
      }
      past_k[m - 1].copy_(k);
      past_v[m - 1].copy_(hid.narrow(1, 0, E));
    }
    ret.step(fp(q), QK, kin, QK, vin, ldv, hd + E, 2 * E, false, fptr_or_null(gnorm[l]), fp(o), fp(state[l]),
             state[l].stride(0), slot);
    linear(o, out_w[l], h, true);
  }
  const float* nf = fp(norm_f);
  for (int64_t b = 0; b < B; ++b) rms_norm(hp + b * D, nf, xp + b * D, D, eps);
  return head_logits(xn, head_w);
}

// ---------------------------------------------------------------------------------------------- DenseMamba

inline float softplus1(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// DenseMamba decode, every layer (see models/dense_mamba.py): Mamba-1 layers (norm_w [D], in [2E, D],
// conv [E, K] + bias, x_proj [R + 2N, E], dt_proj [E, R], dt_bias / D [E], A [E, N], out [D, E]; in / out
// biases may be empty) whose pre-gate SSM output y gets, on fusing layers (l >= 1, m >= 1),
// + silu(sel2 silu(sel1 x̂)) ⊙ each of the last m layers' pre-fusion y (oldest first, zeros before layer
// 0), then an RMSNorm (y_norm [E]); h += out(y ⊙ silu(z)). conv_state [S, E, K-1] and ssm_state [S, E, N]
// updated in place at rows slots[b]. Returns logits [B, Vocab].
Tensor dense_mamba_decode(const Tensor& ids, const Tensor& slots, const Tensor& emb, at::TensorList norm_w,
                          at::TensorList in_w, at::TensorList in_b, at::TensorList conv_w, at::TensorList conv_b,
                          at::TensorList x_w, at::TensorList dt_w, at::TensorList dt_b, at::TensorList A,
                          at::TensorList Dp, at::TensorList out_w, at::TensorList out_b, at::TensorList sel1,
                          at::TensorList sel2, at::TensorList y_norm, at::TensorList conv_state,
                          at::TensorList ssm_state, const Tensor& norm_f, const Tensor& head_w, int64_t m,
                          double eps_d) {
  const float eps = static_cast<float>(eps_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(in_w.size());
  const int64_t E = in_w[0].size(0) / 2, N = A[0].size(1), R = dt_w[0].size(1), K = conv_w[0].size(1);
  check_states_and_slots(slots, ids, {conv_state, ssm_state});
  TORCH_CHECK(conv_state[0].dim() == 3 && conv_state[0].size(1) == E && conv_state[0].size(2) == K - 1 &&
                  ssm_state[0].dim() == 3 && ssm_state[0].size(1) == E && ssm_state[0].size(2) == N,
              "dense_mamba_decode: state shapes");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);
  Tensor hn = at::empty({B, D}, opts), xz = at::empty({B, 2 * E}, opts), xc = at::empty({B, E}, opts);
  Tensor xdbl = at::empty({B, R + 2 * N}, opts), dt = at::empty({B, E}, opts), y = at::empty({B, E}, opts);
  Tensor yf = at::empty({B, E}, opts), gy = at::empty({B, E}, opts);
  const int64_t S1 = std::max<int64_t>(1, D / 32);
  Tensor sel = at::empty({B, S1}, opts);
  Tensor past = at::zeros({std::max<int64_t>(m, 1), B, E}, opts);  // the last m layers' pre-fusion y
  Tensor delta = xdbl.narrow(1, 0, R);
  float *hp = fp(h), *hnp = fp(hn), *xzp = fp(xz), *xcp = fp(xc), *xdp = fp(xdbl), *dtp = fp(dt);
  float *yp = fp(y), *yfp = fp(yf), *gyp = fp(gy), *pastp = fp(past);
  for (int64_t l = 0; l < L; ++l) {
    const bool fuse = m > 0 && l > 0;
    for (int64_t b = 0; b < B; ++b) rms_norm(hp + b * D, fp(norm_w[l]), hnp + b * D, D, eps);
    if (fuse) {
      linears({{hn, in_w[l], xz}, {hn, sel1[l], sel, false, Post::Silu}});
    } else {
      linear(hn, in_w[l], xz);
    }
    if (const float* ib = fptr_or_null(in_b[l]))
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < 2 * E; ++i) xzp[b * 2 * E + i] += ib[i];
    // Conv step (window = the slot's K-1 previous inputs, then x), shifted in place, silu.
    const float* cw = fp(conv_w[l]);
    const float* cb = fptr_or_null(conv_b[l]);
    float* cs = fp(conv_state[l]);
    const int64_t cs_s = conv_state[l].stride(0);
    for (int64_t b = 0; b < B; ++b) {
      float* st = cs + slot[b] * cs_s;
      for (int64_t c = 0; c < E; ++c) {
        float* sc = st + c * (K - 1);
        const float xv = xzp[b * 2 * E + c];
        float acc = cb ? cb[c] : 0.0f;
        for (int64_t k = 0; k < K - 1; ++k) acc += cw[c * K + k] * sc[k];
        acc += cw[c * K + K - 1] * xv;
        for (int64_t k = 0; k + 2 < K; ++k) sc[k] = sc[k + 1];
        if (K > 1) sc[K - 2] = xv;
        xcp[b * E + c] = silu1(acc);
      }
    }
    linear(xc, x_w[l], xdbl);
    if (fuse) {
      linears({{delta, dt_w[l], dt}, {sel, sel2[l], gy, false, Post::Silu}});
    } else {
      linear(delta, dt_w[l], dt);
    }
    // Selective state update per (sequence, channel block): Δ = softplus(dt + bias), s ← exp(Δ A) s + Δ B x,
    // y = s·C + D x (before the gate).
    float* ss = fp(ssm_state[l]);
    const int64_t ss_s = ssm_state[l].stride(0);
    const float *Ap = fp(A[l]), *Dv = fp(Dp[l]), *db = fp(dt_b[l]);
    const int64_t EB = 64, per = (E + EB - 1) / EB;
    at::parallel_for(0, B * per, 1, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / per, e0 = (t % per) * EB, e1 = std::min(E, e0 + EB);
        const float* Bv = xdp + b * (R + 2 * N) + R;
        const float* Cv = Bv + N;
        float* sb = ss + slot[b] * ss_s;
        for (int64_t e = e0; e < e1; ++e) {
          const float d = softplus1(dtp[b * E + e] + db[e]), xe = xcp[b * E + e];
          float* s_ = sb + e * N;
          const float* a = Ap + e * N;
          float out = 0.0f;
          for (int64_t n = 0; n < N; ++n) {
            const float sv = std::exp(d * a[n]) * s_[n] + d * Bv[n] * xe;
            s_[n] = sv;
            out += sv * Cv[n];
          }
          yp[b * E + e] = out + Dv[e] * xe;
        }
      }
    });
    // Dense fusion, then this layer's pre-fusion y joins the window (the oldest leaves); gate.
    if (fuse) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t e = 0; e < E; ++e) {
          float acc = yp[b * E + e];
          for (int64_t j = 0; j < m; ++j) acc = acc + gyp[b * E + e] * pastp[(j * B + b) * E + e];
          yfp[b * E + e] = acc;
        }
        rms_norm(yfp + b * E, fp(y_norm[l]), yfp + b * E, E, eps);
      }
    } else {
      std::copy_n(yp, B * E, yfp);
    }
    if (m > 0) {
      std::copy(pastp + B * E, pastp + m * B * E, pastp);
      std::copy_n(yp, B * E, pastp + (m - 1) * B * E);
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t e = 0; e < E; ++e) yfp[b * E + e] *= silu1(xzp[b * 2 * E + E + e]);
    linear(yf, out_w[l], h, true);
    if (const float* ob = fptr_or_null(out_b[l]))
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < D; ++i) hp[b * D + i] += ob[i];
  }
  for (int64_t b = 0; b < B; ++b) rms_norm(hp + b * D, fp(norm_f), hnp + b * D, D, eps);
  return head_logits(hn, head_w);
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu_rnn, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def(
      "rwkv4_decode(Tensor ids, Tensor slots, Tensor emb, Tensor ln0, Tensor[] ln, Tensor[] mix, Tensor[] wu, "
      "Tensor[] att_k, Tensor[] att_v, Tensor[] att_r, Tensor[] att_o, Tensor[] ffn_k, Tensor[] ffn_r, "
      "Tensor[] ffn_v, Tensor(a!)[] att_x, Tensor(b!)[] aa, Tensor(c!)[] bb, Tensor(d!)[] pp, Tensor(e!)[] ffn_x, "
      "Tensor ln_out, Tensor head_w, float eps) -> Tensor");
  m.def(
      "rwkv7_decode(Tensor ids, Tensor slots, Tensor emb, Tensor ln0, Tensor[] ln, Tensor[] mix, Tensor[] lora_b, "
      "Tensor[] ln_x, Tensor[] r_w, Tensor[] k_w, Tensor[] v_w, Tensor[] o_w, Tensor[] w1, Tensor[] w2, "
      "Tensor[] a1, Tensor[] a2, Tensor[] v1, Tensor[] v2, Tensor[] g1, Tensor[] g2, Tensor[] ffn_k, "
      "Tensor[] ffn_v, Tensor(a!)[] att_x, Tensor(b!)[] wkv, Tensor(c!)[] ffn_x, Tensor ln_out, Tensor head_w, "
      "int H, float eps, float gn_eps) -> Tensor");
  m.def(
      "retnet_decode(Tensor ids, Tensor positions, Tensor slots, Tensor emb, Tensor[] attn_norm, Tensor[] q_w, "
      "Tensor[] k_w, Tensor[] v_w, Tensor[] g_w, Tensor[] o_w, Tensor[] gnorm, Tensor[] mlp_norm, "
      "Tensor[] gate_w, Tensor[] up_w, Tensor[] down_w, Tensor(a!)[] state, Tensor inv_freq, Tensor log_gamma, "
      "Tensor norm_f, Tensor head_w, int H, int Hkv, int dk, int dv, int style, int norm, bool feature_map, "
      "bool value_act, float scale, float eps) -> Tensor");
  m.def(
      "dense_retnet_decode(Tensor ids, Tensor positions, Tensor slots, Tensor emb, Tensor[] in_norm, Tensor[] q_w, "
      "Tensor[] k_w, Tensor[] hid_w, Tensor[] out_w, Tensor[] gnorm, Tensor[] k_sel1, Tensor[] k_sel2, "
      "Tensor[] v_sel1, Tensor[] v_sel2, Tensor[] k_norm, Tensor[] v_norm, Tensor(a!)[] state, Tensor inv_freq, "
      "Tensor log_gamma, Tensor norm_f, Tensor head_w, int H, int m, float k_scale, float eps) -> Tensor");
  m.def(
      "dense_mamba_decode(Tensor ids, Tensor slots, Tensor emb, Tensor[] norm_w, Tensor[] in_w, Tensor[] in_b, "
      "Tensor[] conv_w, Tensor[] conv_b, Tensor[] x_w, Tensor[] dt_w, Tensor[] dt_b, Tensor[] A, Tensor[] D, "
      "Tensor[] out_w, Tensor[] out_b, Tensor[] sel1, Tensor[] sel2, Tensor[] y_norm, Tensor(a!)[] conv_state, "
      "Tensor(b!)[] ssm_state, Tensor norm_f, Tensor head_w, int m, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnserve_cpu_rnn, CPU, m) {
  m.impl("linear", &linear_op);
  m.impl("rwkv4_decode", &rwkv4_decode);
  m.impl("rwkv7_decode", &rwkv7_decode);
  m.impl("retnet_decode", &retnet_decode);
  m.impl("dense_retnet_decode", &dense_retnet_decode);
  m.impl("dense_mamba_decode", &dense_mamba_decode);
}
