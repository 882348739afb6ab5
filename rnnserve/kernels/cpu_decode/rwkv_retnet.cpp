// The fused CPU decode step of RWKV-4, RWKV-7, RetNet, DenseRetNet and DenseMamba (float32 activations
// and state; float32 or int8 weights), one call per model step.
//
// Built by torch.utils.cpp_extension (see families.py) as its own extension, registered as
// torch.ops.rnnserve_cpu_rnn.*. Per step:
//   - one C++ call for the whole model (embedding, every layer, final norm, head): no Python per op;
//   - every projection on weights packed once into 16-column panels (panels.h: pack_weight, or
//     pack_weight_int8 for --quantization int8's layers) through panels.h's register-tiled kernels,
//     the same the Mamba step uses; a stage's independent projections (RWKV-7's r, k, v and low-rank
//     downs) are one job of the item pool, and each projection's activation (tanh, sigmoid, silu,
//     relu²), bias or residual add is applied to its tile as it is stored;
//   - everything between the projections (token shift, lerps, decays and gates, the WKV-4 / WKV-7 and
//     retention state updates in place by slot, rotation, norms, gates, residuals) in AVX2 loops, the
//     state updates parallel over (sequence, head) items of the pool, each head's state read from
//     memory once (WKV-7's second pass finds it in L1), denormals flushed; nothing allocated per layer.
// Each model's torch decode is the reference this is tested against (tests/engine/test_cpu_decode_families.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "panels.h"

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------- math

inline float sigmoid1(float x) { return 1.0f / (1.0f + std::exp(-x)); }

inline __m256 sigmoid256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// tanh(x) = 1 - 2 / (e^2x + 1); exp256 saturates, so large |x| gives ±1.
inline __m256 tanh256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp256(_mm256_add_ps(x, x));
  return _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
}

float* fp(const Tensor& t) { return t.data_ptr<float>(); }
const float* fptr_or_null(const Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// Σ x[i] y[i] over n floats (n a multiple of 8).
inline float dot8(const float* x, const float* y, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc);
  return hsum256(acc);
}

// ---------------------------------------------------------------------------------------------- projections

// What a projection does to its output tile as it stores it.
enum class Post : int64_t { None = 0, Tanh = 1, Sigmoid = 2, Silu = 3, ReluSquare = 4 };

inline __m256 post256(Post post, __m256 v) {
  switch (post) {
    case Post::Tanh: return tanh256(v);
    case Post::Sigmoid: return sigmoid256(v);
    case Post::Silu: return silu256(v);
    case Post::ReluSquare: {
      const __m256 r = _mm256_max_ps(v, _mm256_setzero_ps());
      return _mm256_mul_ps(r, r);
    }
    default: return v;
  }
}

inline float post1(Post post, float x) {
  switch (post) {
    case Post::Tanh: return std::tanh(x);
    case Post::Sigmoid: return sigmoid1(x);
    case Post::Silu: return silu1(x);
    case Post::ReluSquare: {
      const float r = std::max(x, 0.0f);
      return r * r;
    }
    default: return x;
  }
}

// Rows of a float32 matrix: row m at p + m * ld, cols floats wide (unit stride).
struct Rows {
  float* p;
  int64_t ld, cols;
  Rows cols_at(int64_t c0, int64_t n) const { return {p + c0, ld, n}; }
};

Rows rows(const Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && (t.stride(1) == 1 || t.size(1) <= 1),
              "a float32 [rows, cols] buffer with unit-stride rows");
  return {t.data_ptr<float>(), t.stride(0), t.size(1)};
}

// K of a packed weight (its panels' rows, less the int8 panels' 4 rows of scales).
int64_t packed_k(const Tensor& p) { return p.size(1) - (p.scalar_type() == at::kChar ? 4 : 0); }

// One projection of a stage: out (+)= x · W (+ bias), then post; W packed by pack_weight (float panels
// [ceil(N/16), K, 16]) or pack_weight_int8 (int8 panels [ceil(N/16), K + 4, 16]); K = x.cols, N = out.cols.
struct Proj {
  Rows x;
  const Tensor* w;
  Rows out;
  Post post = Post::None;
  bool accumulate = false;
  const float* bias = nullptr;
};

// Rows [m0, m0 + mr) of one 16-column tile (tile [mr, 16]) stored into columns [n0, n0 + nn) of the
// projection's output through its bias, residual and activation.
inline void store_tile(const Proj& j, const float* tile, int64_t m0, int64_t mr, int64_t n0, int64_t nn) {
  for (int64_t i = 0; i < mr; ++i) {
    float* cr = j.out.p + (m0 + i) * j.out.ld + n0;
    const float* t = tile + i * kPanel;
    if (nn == kPanel) {
      for (int64_t h = 0; h < kPanel; h += 8) {
        __m256 v = _mm256_load_ps(t + h);
        if (j.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(j.bias + n0 + h));
        if (j.accumulate) v = _mm256_add_ps(_mm256_loadu_ps(cr + h), v);
        _mm256_storeu_ps(cr + h, post256(j.post, v));
      }
    } else {
      for (int64_t c = 0; c < nn; ++c)
        cr[c] = post1(j.post, (j.accumulate ? cr[c] : 0.0f) + t[c] + (j.bias ? j.bias[n0 + c] : 0.0f));
    }
  }
}

// Panels [q0, q1) of one projection for all M rows: gemm_packed's loop (panels.h), each group of up to
// tile_rows() rows (AVX-512: 16, so 8 rows read a panel once; AVX2: 5) reading the whole panel from L2.
// (Walking a float panel in chunks of 256 rows of K, so that each chunk stays in L1 for every group,
// measured no faster here at 32 rows with the AVX2 tiles.)
template <class T>
void proj_panels(const Proj& j, int64_t M, int64_t q0, int64_t q1) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  const int64_t K = j.x.cols, N = j.out.cols, rows = tile_rows(), groups = (M + rows - 1) / rows;
  const int64_t panel_size = (kInt8 ? K + 4 : K) * kPanel;
  const T* p = j.w->data_ptr<T>();
  alignas(64) float tile[kMaxRows512 * kPanel];
  for (int64_t q = q0; q < q1; ++q) {
    const T* pq = p + q * panel_size;
    const int64_t n0 = q * kPanel, nn = std::min(kPanel, N - n0);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = M * g / groups, mr = M * (g + 1) / groups - m0;
      panel_tile_rows(j.x.p + m0 * j.x.ld, j.x.ld, pq, K, mr, tile);
      store_tile(j, tile, m0, mr, n0, nn);
    }
  }
}

// A stage's independent projections over the same M rows as one job of the item pool: an item is one
// panel (four for one row, whose panels are quick) of one projection, so the threads share out every
// projection's panels with one wait at the end instead of one per product.
void projs(int64_t M, std::initializer_list<Proj> jobs) {
  constexpr int64_t kMaxJobs = 8;
  TORCH_CHECK(static_cast<int64_t>(jobs.size()) <= kMaxJobs, "projs: at most 8 projections per stage");
  const int64_t per = M == 1 ? 4 : 1;
  int64_t first[kMaxJobs + 1] = {0};
  int64_t J = 0;
  for (const Proj& j : jobs) {
    const Tensor& w = *j.w;
    const bool int8 = w.scalar_type() == at::kChar;
    const int64_t K = j.x.cols, N = j.out.cols, NP = (N + kPanel - 1) / kPanel;
    TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && (int8 || w.scalar_type() == at::kFloat) && w.size(0) == NP &&
                    w.size(1) == (int8 ? K + 4 : K) && w.size(2) == kPanel,
                "packed weight ", w.sizes(), " does not fit ", K, " inputs -> ", N, " outputs");
    first[J + 1] = first[J] + (NP + per - 1) / per;
    ++J;
  }
  if (M == 0 || first[J] == 0) return;
  parallel_items(first[J], [&](int64_t item) {
    int64_t j = 0;
    while (first[j + 1] <= item) ++j;
    const Proj& pj = jobs.begin()[j];
    const int64_t NP = (pj.out.cols + kPanel - 1) / kPanel;
    const int64_t q0 = (item - first[j]) * per, q1 = std::min(NP, q0 + per);
    if (pj.w->scalar_type() == at::kChar) {
      proj_panels<int8_t>(pj, M, q0, q1);
    } else {
      proj_panels<float>(pj, M, q0, q1);
    }
  });
}

// ---------------------------------------------------------------------------------------------- helpers

// One row x [D] → y: LayerNorm (bias may be null), as F.layer_norm (biased variance); y may be x.
void layer_norm_row(const float* x, const float* w, const float* b, float* y, int64_t D, float eps) {
  const int64_t D8 = D / 8 * 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < D8; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
  float mean = hsum256(acc);
  for (int64_t i = D8; i < D; ++i) mean += x[i];
  mean /= static_cast<float>(D);
  const __m256 mv = _mm256_set1_ps(mean);
  acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < D8; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv);
    acc = _mm256_fmadd_ps(d, d, acc);
  }
  float var = hsum256(acc);
  for (int64_t i = D8; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(var / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

// y = x / sqrt(mean(x²) + eps) (* w when given), over n values (nn.RMSNorm); y may be x.
void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  const int64_t n8 = n / 8 * 8;
  float ss = dot8(x, x, n8);
  for (int64_t i = n8; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * (w ? w[i] : 1.0f);
}

// rms_norm of each of M rows of D (x and y contiguous), the rows shared out to the pool.
void rms_norm_rows(const float* x, const float* w, float* y, int64_t M, int64_t D, float eps) {
  parallel_ranges(M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) rms_norm(x + m * D, w, y + m * D, D, eps);
  });
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

// logits [M, V] = hn · head (packed [ceil(V/16), D, 16], or int8 panels).
Tensor head_logits(const Tensor& hn, const Tensor& head_w, int64_t V) {
  Tensor out = at::empty({hn.size(0), V}, hn.options());
  projs(hn.size(0), {{rows(hn), &head_w, rows(out)}});
  return out;
}

// post(x [M, K] · W) for a packed W with n output columns, through projs (tests of the projections).
Tensor linear_packed(const Tensor& x, const Tensor& p, int64_t n, int64_t post) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be float32 [M, K]");
  TORCH_CHECK(post >= 0 && post <= 4, "post: 0 none, 1 tanh, 2 sigmoid, 3 silu, 4 relu squared");
  Tensor out = at::empty({x.size(0), n}, x.options());
  projs(x.size(0), {{rows(x), &p, rows(out), static_cast<Post>(post)}});
  return out;
}

const int64_t* checked_positions(const Tensor& positions, int64_t B) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == B && positions.is_contiguous(),
              "positions must be contiguous int64 [B]");
  return positions.data_ptr<int64_t>();
}

// ---------------------------------------------------------------------------------------------- RWKV-7

// RWKV-7 decode, every layer (see models/rwkv7.py for the maths). ln0 [2, D] (weight, bias; empty: no
// LN0), ln_out [2, D], per layer l: ln[l] [4, D] (ln1 w, b, ln2 w, b; zero biases where none), mix[l]
// [10, D] (x_r, x_w, x_k, x_v, x_a, x_g, k_k, k_a, r_k flattened, ffn x_k), lora_b[l] [3, D] (w0, a0,
// v0; v0 unused in layer 0), ln_x[l] [2, D]; packed (pack_weight / pack_weight_int8) the projections r,
// k, v, o [D -> D], the low-rank pairs w1 [D -> Rw] / w2 [Rw -> D] (likewise a, v, g; v1 / v2 of layer
// 0 are empty), ffn key [D -> F] and value [F -> D], the head [D -> Vocab]. States: att_x [S, D], wkv
// [S, H, N, N] ([K, V]), ffn_x [S, D] updated in place at rows slots[b]. Returns logits [B, Vocab].
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
  const int64_t F = packed_k(ffn_v[0]);
  TORCH_CHECK(H * N == D, "rwkv7_decode: hidden size ", D, " is not heads x head size");
  TORCH_CHECK(N % 8 == 0 && N <= 256, "rwkv7_decode: head size ", N, " must be a multiple of 8, at most 256");
  check_states_and_slots(slots, ids, {att_x, wkv, ffn_x});
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);                // [B, D] residual stream
  Tensor xx = at::empty({B, D}, opts);       // LN2 output, token-shifted
  Tensor lerp = at::empty({6, B, D}, opts);  // x_r, x_w, x_k, x_v, x_a, x_g
  Tensor r = at::empty({B, D}, opts), k = at::empty({B, D}, opts), v = at::empty({B, D}, opts);
  Tensor v_first = at::empty({B, D}, opts);
  Tensor wp = at::empty({B, D}, opts), ap = at::empty({B, D}, opts), vp = at::empty({B, D}, opts);
  Tensor g = at::empty({B, D}, opts), o = at::empty({B, D}, opts), hid = at::empty({B, F}, opts);
  int64_t R = 0;  // the largest low-rank dimension (the up-projections' K)
  for (int64_t l = 0; l < L; ++l)
    for (const auto* lst : {&w2, &a2, &v2, &g2})
      if ((*lst)[l].numel()) R = std::max(R, packed_k((*lst)[l]));
  Tensor low = at::empty({B, 4 * R}, opts);  // [B, 4 R]: the w, a, g, v low-rank activations
  float* hp = fp(h);
  float* xxp = fp(xx);
  float* lp = fp(lerp);
  float *rp = fp(r), *kp = fp(k), *vp_ = fp(v), *vfp = fp(v_first), *wpp = fp(wp), *app = fp(ap), *vpp = fp(vp);
  float *gp = fp(g), *op = fp(o);
  if (ln0.numel())
    for (int64_t b = 0; b < B; ++b) layer_norm_row(hp + b * D, fp(ln0), fp(ln0) + D, hp + b * D, D, eps);
  const Rows lr = rows(low);
  for (int64_t l = 0; l < L; ++l) {
    const float* lnp = fp(ln[l]);
    const float* mx = fp(mix[l]);
    const float* lb = fp(lora_b[l]);
    float* ax = fp(att_x[l]);
    float* fx = fp(ffn_x[l]);
    const int64_t ax_s = att_x[l].stride(0), fx_s = ffn_x[l].stride(0);
    // Per sequence: LN1, token shift (the slot's previous LN1 output, replaced by this one), six lerps.
    parallel_items(B, [&](int64_t b) {
      alignas(32) float xr[4096];
      float* x = D <= 4096 ? xr : lp + b * D;  // (a wider model normalises into x_r's row, then lerps)
      layer_norm_row(hp + b * D, lnp, lnp + D, x, D, eps);
      float* prev = ax + slot[b] * ax_s;
      for (int64_t i = 0; i < D; ++i) {
        const float cur = x[i], delta = prev[i] - cur;
        prev[i] = cur;
        for (int64_t j = 0; j < 6; ++j) lp[(j * B + b) * D + i] = cur + delta * mx[j * D + i];
      }
    });
    // r, k, v and the low-rank pairs' first halves in one stage ([B, rank] column blocks of low), then
    // the second halves in another.
    const bool first = v1[l].numel() == 0;
    const int64_t rw = packed_k(w2[l]), ra = packed_k(a2[l]), rg = packed_k(g2[l]);
    const Rows wl = lr.cols_at(0, rw), al = lr.cols_at(R, ra), gl = lr.cols_at(2 * R, rg);
    const Rows x_r{lp, D, D}, x_w{lp + B * D, D, D}, x_k{lp + 2 * B * D, D, D}, x_v{lp + 3 * B * D, D, D};
    const Rows x_a{lp + 4 * B * D, D, D}, x_g{lp + 5 * B * D, D, D};
    if (first) {
      projs(B, {{x_r, &r_w[l], rows(r)}, {x_k, &k_w[l], rows(k)}, {x_v, &v_w[l], rows(v)},
                {x_w, &w1[l], wl, Post::Tanh}, {x_a, &a1[l], al}, {x_g, &g1[l], gl, Post::Sigmoid}});
      projs(B, {{wl, &w2[l], rows(wp)}, {al, &a2[l], rows(ap)}, {gl, &g2[l], rows(g)}});
    } else {
      const Rows vl = lr.cols_at(3 * R, packed_k(v2[l]));
      projs(B, {{x_r, &r_w[l], rows(r)}, {x_k, &k_w[l], rows(k)}, {x_v, &v_w[l], rows(v)},
                {x_w, &w1[l], wl, Post::Tanh}, {x_a, &a1[l], al}, {x_g, &g1[l], gl, Post::Sigmoid},
                {x_v, &v1[l], vl}});
      projs(B, {{wl, &w2[l], rows(wp)}, {al, &a2[l], rows(ap)}, {gl, &g2[l], rows(g)}, {vl, &v2[l], rows(vp)}});
    }
    // Per (sequence, head): decays, κ, k, value residual, the WKV update in place, group norm, bonus.
    float* wkv_p = fp(wkv[l]);
    const int64_t wkv_s = wkv[l].stride(0);
    const float* gx = fp(ln_x[l]);
    parallel_ranges(B * H, 2, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      alignas(32) float w_[256], kk[256], b_[256];
      const __m256 one = _mm256_set1_ps(1.0f), neg_ds = _mm256_set1_ps(-decay_scale);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, hh = t % H, off = b * D + hh * N, col = hh * N;
        float* rr = rp + off;
        float* kr = kp + off;
        float* vr = vp_ + off;
        float* vf = vfp + off;
        float* orow = op + off;
        const float* kkw = mx + 6 * D + col;  // k_k
        const float* kaw = mx + 7 * D + col;  // k_a
        const float* rkw = mx + 8 * D + col;  // r_k
        __m256 nrm = _mm256_setzero_ps();
        for (int64_t i = 0; i < N; i += 8) {
          const __m256 wv = exp256(
              _mm256_mul_ps(neg_ds, sigmoid256(_mm256_add_ps(_mm256_loadu_ps(wpp + off + i), _mm256_loadu_ps(lb + col + i)))));
          _mm256_store_ps(w_ + i, wv);
          const __m256 av = sigmoid256(_mm256_add_ps(_mm256_loadu_ps(app + off + i), _mm256_loadu_ps(lb + D + col + i)));
          const __m256 kv = _mm256_loadu_ps(kr + i);
          const __m256 kkv = _mm256_mul_ps(kv, _mm256_loadu_ps(kkw + i));
          _mm256_store_ps(kk + i, kkv);
          _mm256_store_ps(b_ + i, av);  // a, until κ is normalised below
          nrm = _mm256_fmadd_ps(kkv, kkv, nrm);
          // k ← k ⊙ (1 + (a − 1) ⊙ k_a)
          _mm256_storeu_ps(kr + i, _mm256_mul_ps(kv, _mm256_fmadd_ps(_mm256_sub_ps(av, one), _mm256_loadu_ps(kaw + i), one)));
        }
        const __m256 inv = _mm256_set1_ps(1.0f / std::max(std::sqrt(hsum256(nrm)), 1e-12f));  // F.normalize
        for (int64_t i = 0; i < N; i += 8) {
          const __m256 kn = _mm256_mul_ps(_mm256_load_ps(kk + i), inv);
          _mm256_store_ps(b_ + i, _mm256_mul_ps(kn, _mm256_load_ps(b_ + i)));  // b = κ ⊙ a
          _mm256_store_ps(kk + i, _mm256_sub_ps(_mm256_setzero_ps(), kn));     // −κ
        }
        if (first) {
          std::copy_n(vr, N, vf);
        } else {
          for (int64_t i = 0; i < N; i += 8) {
            const __m256 vv = _mm256_loadu_ps(vr + i);
            const __m256 mixv = sigmoid256(_mm256_add_ps(_mm256_loadu_ps(vpp + off + i), _mm256_loadu_ps(lb + 2 * D + col + i)));
            _mm256_storeu_ps(vr + i, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(vf + i), vv), mixv, vv));
          }
        }
        // S [K, V], 32 columns at a time: sa = (−κ)ᵀ S, then S ← diag(w) S + b saᵀ + k vᵀ and o = rᵀ S
        // (the 64 x 32 block is in L1 for the second pass).
        float* S = wkv_p + slot[b] * wkv_s + hh * N * N;
        for (int64_t j0 = 0; j0 < N; j0 += 32) {
          const int nv = static_cast<int>(std::min<int64_t>(32, N - j0) / 8);
          __m256 sa[4], acc[4], vv[4];
          for (int c = 0; c < nv; ++c) {
            sa[c] = _mm256_setzero_ps();
            acc[c] = _mm256_setzero_ps();
            vv[c] = _mm256_loadu_ps(vr + j0 + 8 * c);
          }
          for (int64_t i = 0; i < N; ++i) {
            const __m256 ai = _mm256_set1_ps(kk[i]);
            const float* Si = S + i * N + j0;
            for (int c = 0; c < nv; ++c) sa[c] = _mm256_fmadd_ps(ai, _mm256_loadu_ps(Si + 8 * c), sa[c]);
          }
          for (int64_t i = 0; i < N; ++i) {
            const __m256 wi = _mm256_set1_ps(w_[i]), bi = _mm256_set1_ps(b_[i]);
            const __m256 ki = _mm256_set1_ps(kr[i]), ri = _mm256_set1_ps(rr[i]);
            float* Si = S + i * N + j0;
            for (int c = 0; c < nv; ++c) {
              const __m256 s = _mm256_fmadd_ps(wi, _mm256_loadu_ps(Si + 8 * c),
                                               _mm256_fmadd_ps(bi, sa[c], _mm256_mul_ps(ki, vv[c])));
              _mm256_storeu_ps(Si + 8 * c, s);
              acc[c] = _mm256_fmadd_ps(ri, s, acc[c]);
            }
          }
          for (int c = 0; c < nv; ++c) _mm256_storeu_ps(orow + j0 + 8 * c, acc[c]);
        }
        // GroupNorm over the head, then the bonus (Σ r ⊙ k ⊙ r_k) v and the gate.
        __m256 sum = _mm256_setzero_ps(), bon = _mm256_setzero_ps();
        for (int64_t j = 0; j < N; j += 8) {
          sum = _mm256_add_ps(sum, _mm256_loadu_ps(orow + j));
          bon = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(rr + j), _mm256_loadu_ps(kr + j)), _mm256_loadu_ps(rkw + j), bon);
        }
        const float mean = hsum256(sum) / static_cast<float>(N), bonus = hsum256(bon);
        const __m256 mv = _mm256_set1_ps(mean);
        __m256 var = _mm256_setzero_ps();
        for (int64_t j = 0; j < N; j += 8) {
          const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(orow + j), mv);
          var = _mm256_fmadd_ps(d, d, var);
        }
        const __m256 ginv = _mm256_set1_ps(1.0f / std::sqrt(hsum256(var) / static_cast<float>(N) + gn_eps));
        const __m256 bv = _mm256_set1_ps(bonus);
        const float* gw = gx + col;
        const float* gb = gx + D + col;
        const float* gg = gp + off;
        for (int64_t j = 0; j < N; j += 8) {
          const __m256 nrmd = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(orow + j), mv), ginv),
                                              _mm256_loadu_ps(gw + j), _mm256_loadu_ps(gb + j));
          const __m256 out = _mm256_fmadd_ps(bv, _mm256_loadu_ps(vr + j), nrmd);
          _mm256_storeu_ps(orow + j, _mm256_mul_ps(out, _mm256_loadu_ps(gg + j)));
        }
      }
    });
    projs(B, {{rows(o), &o_w[l], rows(h), Post::None, true}});
    // Channel mixing: LN2, token shift, relu(k)² and the value projection into the residual.
    parallel_items(B, [&](int64_t b) {
      float* xr = xxp + b * D;
      layer_norm_row(hp + b * D, lnp + 2 * D, lnp + 3 * D, xr, D, eps);
      float* prev = fx + slot[b] * fx_s;
      for (int64_t i = 0; i < D; ++i) {
        const float cur = xr[i];
        xr[i] = cur + (prev[i] - cur) * mx[9 * D + i];
        prev[i] = cur;
      }
    });
    projs(B, {{rows(xx), &ffn_k[l], rows(hid), Post::ReluSquare}});
    projs(B, {{rows(hid), &ffn_v[l], rows(h), Post::None, true}});
  }
  for (int64_t b = 0; b < B; ++b) layer_norm_row(hp + b * D, fp(ln_out), fp(ln_out) + D, xxp + b * D, D, eps);
  return head_logits(xx, head_w, emb.size(0));
}

// ---------------------------------------------------------------------------------------------- RWKV-4

// RWKV-4 decode, every layer (see models/rwkv4.py). ln0 [2, D] and ln_out [2, D] (weight, bias); per layer
// ln[l] [4, D] (ln1 w, b, ln2 w, b), mix[l] [5, D] (att time_mix k, v, r; ffn time_mix k, r), wu[l] [2, A]
// (w = -exp(time_decay), u = time_first, fp32); packed: att key / value / receptance [D -> A], output
// [A -> D]; ffn key [D -> F], receptance [D -> D], value [F -> D]; the head [D -> Vocab]. States att_x
// [S, D], aa / bb / pp [S, A], ffn_x [S, D] updated in place at rows slots[b]. Returns logits [B, Vocab].
Tensor rwkv4_decode(const Tensor& ids, const Tensor& slots, const Tensor& emb, const Tensor& ln0,
                    at::TensorList ln, at::TensorList mix, at::TensorList wu, at::TensorList att_k,
                    at::TensorList att_v, at::TensorList att_r, at::TensorList att_o, at::TensorList ffn_k,
                    at::TensorList ffn_r, at::TensorList ffn_v, at::TensorList att_x, at::TensorList aa,
                    at::TensorList bb, at::TensorList pp, at::TensorList ffn_x, const Tensor& ln_out,
                    const Tensor& head_w, double eps_d) {
  const float eps = static_cast<float>(eps_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(att_k.size());
  const int64_t A = wu[0].size(1), F = packed_k(ffn_v[0]);
  check_states_and_slots(slots, ids, {att_x, aa, bb, pp, ffn_x});
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);
  Tensor lerp = at::empty({3, B, D}, opts);
  Tensor r = at::empty({B, A}, opts), k = at::empty({B, A}, opts), v = at::empty({B, A}, opts);
  Tensor hid = at::empty({B, F}, opts), ff = at::empty({B, D}, opts), rf = at::empty({B, D}, opts);
  float* hp = fp(h);
  float* lp = fp(lerp);
  for (int64_t b = 0; b < B; ++b) layer_norm_row(hp + b * D, fp(ln0), fp(ln0) + D, hp + b * D, D, eps);
  // Per sequence: LN, token shift (the slot's previous LN output, replaced by this one) and n lerps
  // x·μ + prev·(1 − μ).
  auto shift_mix = [&](const float* lnw, float* shift, int64_t shift_s, const float* mu, int64_t n) {
    parallel_items(B, [&](int64_t b) {
      alignas(32) float xs[4096];
      float* x = D <= 4096 ? xs : lp + (n - 1) * B * D + b * D;  // (a wider model: the last lerp's row)
      layer_norm_row(hp + b * D, lnw, lnw + D, x, D, eps);
      float* prev = shift + slot[b] * shift_s;
      for (int64_t i = 0; i < D; ++i) {
        const float cur = x[i], pv = prev[i];
        for (int64_t j = 0; j < n; ++j) lp[(j * B + b) * D + i] = cur * mu[j * D + i] + pv * (1 - mu[j * D + i]);
        prev[i] = cur;
      }
    });
  };
  const Rows l0{lp, D, D}, l1{lp + B * D, D, D}, l2{lp + 2 * B * D, D, D};
  for (int64_t l = 0; l < L; ++l) {
    const float* lnp = fp(ln[l]);
    const float* mx = fp(mix[l]);
    shift_mix(lnp, fp(att_x[l]), att_x[l].stride(0), mx, 3);
    // k, v and σ(r) in one stage.
    projs(B, {{l0, &att_k[l], rows(k)}, {l1, &att_v[l], rows(v)}, {l2, &att_r[l], rows(r), Post::Sigmoid}});
    // The WKV step with the running max, in place (models/rwkv4.py); r ← σ(r) ⊙ wkv. Per (sequence,
    // block of 256 channels), 8 channels per vector.
    const float* w = fp(wu[l]);
    const float* u = w + A;
    float *ap = fp(aa[l]), *bp = fp(bb[l]), *pq = fp(pp[l]);
    const int64_t as = aa[l].stride(0), bs = bb[l].stride(0), ps = pp[l].stride(0);
    const int64_t CB = 256, per = (A + CB - 1) / CB;
    float *kb = fp(k), *vb = fp(v), *rb = fp(r);
    parallel_items(B * per, [&](int64_t t) {
      FlushDenormals ftz;
      const int64_t b = t / per, c0 = (t % per) * CB, c1 = std::min(A, c0 + CB);
      float *a_ = ap + slot[b] * as, *b_ = bp + slot[b] * bs, *p_ = pq + slot[b] * ps;
      const float* kr = kb + b * A;
      const float* vr = vb + b * A;
      float* rr = rb + b * A;
      int64_t c = c0;
      for (; c + 8 <= c1; c += 8) {
        const __m256 kc = _mm256_loadu_ps(kr + c), vc = _mm256_loadu_ps(vr + c), ac = _mm256_loadu_ps(a_ + c);
        const __m256 bc = _mm256_loadu_ps(b_ + c), pc = _mm256_loadu_ps(p_ + c);
        const __m256 uk = _mm256_add_ps(_mm256_loadu_ps(u + c), kc);
        __m256 q = _mm256_max_ps(pc, uk);
        __m256 e1 = exp256(_mm256_sub_ps(pc, q)), e2 = exp256(_mm256_sub_ps(uk, q));
        const __m256 out = _mm256_div_ps(_mm256_fmadd_ps(e1, ac, _mm256_mul_ps(e2, vc)), _mm256_fmadd_ps(e1, bc, e2));
        const __m256 pw = _mm256_add_ps(pc, _mm256_loadu_ps(w + c));
        q = _mm256_max_ps(pw, kc);
        e1 = exp256(_mm256_sub_ps(pw, q));
        e2 = exp256(_mm256_sub_ps(kc, q));
        _mm256_storeu_ps(a_ + c, _mm256_fmadd_ps(e1, ac, _mm256_mul_ps(e2, vc)));
        _mm256_storeu_ps(b_ + c, _mm256_fmadd_ps(e1, bc, e2));
        _mm256_storeu_ps(p_ + c, q);
        _mm256_storeu_ps(rr + c, _mm256_mul_ps(_mm256_loadu_ps(rr + c), out));
      }
      for (; c < c1; ++c) {
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
        rr[c] *= out;
      }
    });
    projs(B, {{rows(r), &att_o[l], rows(h), Post::None, true}});
    shift_mix(lnp + 2 * D, fp(ffn_x[l]), ffn_x[l].stride(0), mx + 3 * D, 2);
    projs(B, {{l0, &ffn_k[l], rows(hid), Post::ReluSquare}, {l1, &ffn_r[l], rows(rf), Post::Sigmoid}});
    projs(B, {{rows(hid), &ffn_v[l], rows(ff)}});
    const float* rfp = fp(rf);
    const float* ffp = fp(ff);
    for (int64_t i = 0; i < B * D; ++i) hp[i] += rfp[i] * ffp[i];
  }
  Tensor xn = at::empty({B, D}, opts);
  for (int64_t b = 0; b < B; ++b) layer_norm_row(hp + b * D, fp(ln_out), fp(ln_out) + D, fp(xn) + b * D, D, eps);
  return head_logits(xn, head_w, emb.size(0));
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
    TORCH_CHECK(dk <= 1024, "retention: key head size ", dk, " above 1024");
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

  // q [B, H dk], k [B, Hkv dk], v [B, Hkv dv] (rows ldq / ldk / ldv apart; q and k rotated in place, per
  // sequence), then per (sequence, head): S ← γ S + kᵀ v in place at the slot's row, o = scale q S (one
  // pass over S, 32 columns at a time in registers), the output normalisation, the per-head RMSNorm
  // (weight gnw or none) and the gate (o ⊙ silu(g) or o ⊙ g; none when gate is null). o [B, H dv].
  void step(float* q, int64_t ldq, float* k, int64_t ldk, float* v, int64_t ldv, const float* gate, int64_t ldg,
            bool gate_silu, const float* gnw, float* o, float* st, int64_t st_s, const int64_t* slot) const {
    parallel_items(B, [&](int64_t b) {
      alignas(32) float tmp[1024];
      const float* c = cosv.data() + b * half;
      const float* s = sinv.data() + b * half;
      auto rot = [&](float* x, int64_t heads) {
        for (int64_t hh = 0; hh < heads; ++hh) {
          float* xh = x + hh * dk;
          if (feature_map)
            for (int64_t i = 0; i < dk; ++i) xh[i] = silu1(xh[i]);
          std::copy_n(xh, dk, tmp);
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
    });
    const int64_t rep = H / Hkv, dv8 = dv / 8 * 8;
    parallel_ranges(B * H, 2, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, hh = t % H, kvh = hh / rep;
        const float* qh = q + b * ldq + hh * dk;
        const float* kh = k + b * ldk + kvh * dk;
        const float* vh = v + b * ldv + kvh * dv;
        float* S = st + slot[b] * st_s + hh * dk * dvs;
        float* oh = o + (b * H + hh) * dv;
        const float gm = decay[hh];
        const __m256 gv = _mm256_set1_ps(gm);
        for (int64_t j0 = 0; j0 < dv8; j0 += 32) {
          const int nv = static_cast<int>(std::min<int64_t>(32, dv8 - j0) / 8);
          __m256 acc[4], vv[4];
          for (int c = 0; c < nv; ++c) {
            acc[c] = _mm256_setzero_ps();
            vv[c] = _mm256_loadu_ps(vh + j0 + 8 * c);
          }
          for (int64_t i = 0; i < dk; ++i) {
            const __m256 ki = _mm256_set1_ps(kh[i]), qi = _mm256_set1_ps(qh[i]);
            float* Si = S + i * dvs + j0;
            for (int c = 0; c < nv; ++c) {
              const __m256 sv = _mm256_fmadd_ps(gv, _mm256_loadu_ps(Si + 8 * c), _mm256_mul_ps(ki, vv[c]));
              _mm256_storeu_ps(Si + 8 * c, sv);
              acc[c] = _mm256_fmadd_ps(qi, sv, acc[c]);
            }
          }
          for (int c = 0; c < nv; ++c) _mm256_storeu_ps(oh + j0 + 8 * c, acc[c]);
        }
        // Columns past the last multiple of 8, and with abs_sum the key sum in the last column (v = 1).
        float ksum = 0.0f;
        for (int64_t j = dv8; j < dvs; ++j) {
          const float vj = j < dv ? vh[j] : 1.0f;
          float a = 0.0f;
          for (int64_t i = 0; i < dk; ++i) {
            const float sv = gm * S[i * dvs + j] + kh[i] * vj;
            S[i * dvs + j] = sv;
            a += qh[i] * sv;
          }
          if (j < dv) {
            oh[j] = a;
          } else {
            ksum = a;
          }
        }
        const float cb = cn[b * H + hh];
        const float div = norm == 2 ? std::max(1.0f, std::abs(scale * ksum * cb)) : 1.0f;
        const float f = scale * cb / div;
        for (int64_t j = 0; j < dv; ++j) oh[j] *= f;
        rms_norm(oh, gnw, oh, dv, eps);
        if (gate) {
          const float* gh = gate + b * ldg + hh * dv;
          int64_t j = 0;
          for (; j < dv8; j += 8) {
            const __m256 gj = _mm256_loadu_ps(gh + j);
            _mm256_storeu_ps(oh + j, _mm256_mul_ps(_mm256_loadu_ps(oh + j), gate_silu ? silu256(gj) : gj));
          }
          for (; j < dv; ++j) oh[j] *= gate_silu ? silu1(gh[j]) : gh[j];
        }
      }
    });
  }
};

// RetNet decode, every layer (see models/retnet.py). Per layer: attn_norm [D]; packed q [D -> H dk], k and
// v [D -> Hkv dk | Hkv dv], g [D -> H dv] (empty: no output gate), o [H dv -> D]; gnorm [dv] (empty: not
// affine); with an MLP mlp_norm [D], packed gate / up [D -> I], down [I -> D] (empty lists: none); the
// head packed [D -> Vocab]. State S [S, H, dk, dv'] (dv' = dv + 1 with abs_sum: the last column sums the
// keys) updated in place at rows slots[b]. style 0 = fla (halves rotated), 1 = torchscale (pairs); norm 0
// none, 1 sqrt_cn, 2 abs_sum.
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
  const int64_t I = has_mlp ? packed_k(down_w[0]) : 0;
  Tensor gt = at::empty({B, I}, opts), up = at::empty({B, I}, opts);
  float* hp = fp(h);
  float* xp = fp(xn);
  const Rows xr = rows(xn);
  for (int64_t l = 0; l < L; ++l) {
    rms_norm_rows(hp, fp(attn_norm[l]), xp, B, D, eps);
    if (gated) {
      projs(B, {{xr, &q_w[l], rows(q)}, {xr, &k_w[l], rows(k)}, {xr, &v_w[l], rows(v)}, {xr, &g_w[l], rows(g)}});
    } else {
      projs(B, {{xr, &q_w[l], rows(q)}, {xr, &k_w[l], rows(k)}, {xr, &v_w[l], rows(v)}});
    }
    ret.step(fp(q), H * dk, fp(k), Hkv * dk, fp(v), Hkv * dv, gated ? fp(g) : nullptr, H * dv, true,
             gnorm.empty() ? nullptr : fptr_or_null(gnorm[l]), fp(o), fp(state[l]), state[l].stride(0), slot);
    projs(B, {{rows(o), &o_w[l], rows(h), Post::None, true}});
    if (has_mlp) {
      rms_norm_rows(hp, fp(mlp_norm[l]), xp, B, D, eps);
      projs(B, {{xr, &gate_w[l], rows(gt), Post::Silu}, {xr, &up_w[l], rows(up)}});
      float* gp = fp(gt);
      const float* upp = fp(up);
      for (int64_t i = 0; i < B * I; ++i) gp[i] *= upp[i];
      projs(B, {{rows(gt), &down_w[l], rows(h), Post::None, true}});
    }
  }
  rms_norm_rows(hp, fp(norm_f), xp, B, D, eps);
  return head_logits(xn, head_w, emb.size(0));
}

// DenseRetNet decode, every layer (see models/dense_retnet.py). Per layer: in_norm [D]; packed q / k
// [D -> qk]; hidden [D -> 2E] (v_raw then gate); out [E -> D]; gnorm [dv]; for fusing layers (l >= 1,
// m >= 1) packed k_sel1 / v_sel1 [D -> S1], k_sel2 [S1 -> qk], v_sel2 [S1 -> E], and k_norm [qk], v_norm
// [E] (empty otherwise). q = silu(W_q x̂), k_raw = silu(W_k x̂) k_scale, [v_raw, gate] = silu(W_hidden x̂);
// a fusing layer adds silu(select(x̂)) ⊙ each of the last m layers' k_raw / v_raw (oldest first; zeros
// before layer 0) and RMS-normalises; torchscale retention with sqrt_cn, scale 1; h += W_out(norm(o) ⊙
// gate). State S [S, H, dk, dv] updated in place at rows slots[b].
Tensor dense_retnet_decode(const Tensor& ids, const Tensor& positions, const Tensor& slots, const Tensor& emb,
                           at::TensorList in_norm, at::TensorList q_w, at::TensorList k_w, at::TensorList hid_w,
                           at::TensorList out_w, at::TensorList gnorm, at::TensorList k_sel1, at::TensorList k_sel2,
                           at::TensorList v_sel1, at::TensorList v_sel2, at::TensorList k_norm,
                           at::TensorList v_norm, at::TensorList state, const Tensor& inv_freq,
                           const Tensor& log_gamma, const Tensor& norm_f, const Tensor& head_w, int64_t H,
                           int64_t m, double k_scale_d, double eps_d) {
  const float eps = static_cast<float>(eps_d), k_scale = static_cast<float>(k_scale_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(q_w.size());
  TORCH_CHECK(state[0].dim() == 4 && state[0].size(1) == H, "dense_retnet_decode: state [S, H, dk, dv]");
  const int64_t dk = state[0].size(2), dv = state[0].size(3), QK = H * dk, E = H * dv;
  const int64_t* pos = checked_positions(positions, B);
  check_states_and_slots(slots, ids, {state});
  const Retention ret(pos, B, H, H, dk, dv, 1, 1, false, false, 1.0f, eps, inv_freq, log_gamma);
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);
  Tensor xn = at::empty({B, D}, opts);
  Tensor q = at::empty({B, QK}, opts), k = at::empty({B, QK}, opts), hid = at::empty({B, 2 * E}, opts);
  Tensor kf = at::empty({B, QK}, opts), vf = at::empty({B, E}, opts), o = at::empty({B, E}, opts);
  const int64_t S1 = m > 0 && L > 1 ? packed_k(k_sel2[1]) : 1;  // the selectors' width
  Tensor sel = at::empty({B, 2 * S1}, opts), gk = at::empty({B, QK}, opts), gv = at::empty({B, E}, opts);
  const Rows ks = rows(sel).cols_at(0, S1), vs = rows(sel).cols_at(S1, S1);
  // The last m layers' pre-fusion k and v for this step's tokens (oldest first), zeros before layer 0.
  Tensor past_k = at::zeros({std::max<int64_t>(m, 1), B, QK}, opts);
  Tensor past_v = at::zeros({std::max<int64_t>(m, 1), B, E}, opts);
  float* hp = fp(h);
  float* xp = fp(xn);
  float* hd = fp(hid);
  float *kp = fp(k), *pk = fp(past_k), *pv = fp(past_v);
  const Rows xr = rows(xn);
  for (int64_t l = 0; l < L; ++l) {
    const bool fuse = m > 0 && l > 0;
    rms_norm_rows(hp, fp(in_norm[l]), xp, B, D, eps);
    if (fuse) {
      projs(B, {{xr, &q_w[l], rows(q), Post::Silu}, {xr, &k_w[l], rows(k), Post::Silu},
                {xr, &hid_w[l], rows(hid), Post::Silu}, {xr, &k_sel1[l], ks, Post::Silu},
                {xr, &v_sel1[l], vs, Post::Silu}});
      projs(B, {{ks, &k_sel2[l], rows(gk), Post::Silu}, {vs, &v_sel2[l], rows(gv), Post::Silu}});
    } else {
      projs(B, {{xr, &q_w[l], rows(q), Post::Silu}, {xr, &k_w[l], rows(k), Post::Silu},
                {xr, &hid_w[l], rows(hid), Post::Silu}});
    }
    for (int64_t i = 0; i < B * QK; ++i) kp[i] *= k_scale;
    float *kin = kp, *vin = hd;  // v_raw: the first E columns of hid (rows 2E apart)
    int64_t ldv = 2 * E;
    if (fuse) {
      float *kfp = fp(kf), *vfp = fp(vf);
      const float *gkp = fp(gk), *gvp = fp(gv);
      const float *knw = fp(k_norm[l]), *vnw = fp(v_norm[l]);
      parallel_items(B, [&](int64_t b) {
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
        rms_norm(kfp + b * QK, knw, kfp + b * QK, QK, eps);
        rms_norm(vfp + b * E, vnw, vfp + b * E, E, eps);
      });
      kin = kfp;
      vin = vfp;
      ldv = E;
    }
    if (m > 0) {  // this layer's pre-fusion k and v join the window (the oldest leaves)
      std::copy(pk + B * QK, pk + m * B * QK, pk);
      std::copy(pv + B * E, pv + m * B * E, pv);
      std::copy_n(kp, B * QK, pk + (m - 1) * B * QK);
      for (int64_t b = 0; b < B; ++b) std::copy_n(hd + b * 2 * E, E, pv + ((m - 1) * B + b) * E);
    }
    ret.step(fp(q), QK, kin, QK, vin, ldv, hd + E, 2 * E, false, fptr_or_null(gnorm[l]), fp(o), fp(state[l]),
             state[l].stride(0), slot);
    projs(B, {{rows(o), &out_w[l], rows(h), Post::None, true}});
  }
  rms_norm_rows(hp, fp(norm_f), xp, B, D, eps);
  return head_logits(xn, head_w, emb.size(0));
}

// ---------------------------------------------------------------------------------------------- DenseMamba

// DenseMamba decode, every layer (see models/dense_mamba.py): Mamba-1 layers (norm_w [D], packed in
// [D -> 2E], conv [E, K] + bias, x_proj [E -> R + 2N], dt_proj [R -> E], dt_bias / D [E], A [E, N], out
// [E -> D]; in / out biases may be empty) whose pre-gate SSM output y gets, on fusing layers (l >= 1,
// m >= 1), + silu(sel2 silu(sel1 x̂)) ⊙ each of the last m layers' pre-fusion y (oldest first, zeros
// before layer 0), then an RMSNorm (y_norm [E]); h += out(y ⊙ silu(z)). conv_state [S, E, K-1] and
// ssm_state [S, E, N] updated in place at rows slots[b]. Returns logits [B, Vocab].
Tensor dense_mamba_decode(const Tensor& ids, const Tensor& slots, const Tensor& emb, at::TensorList norm_w,
                          at::TensorList in_w, at::TensorList in_b, at::TensorList conv_w, at::TensorList conv_b,
                          at::TensorList x_w, at::TensorList dt_w, at::TensorList dt_b, at::TensorList A,
                          at::TensorList Dp, at::TensorList out_w, at::TensorList out_b, at::TensorList sel1,
                          at::TensorList sel2, at::TensorList y_norm, at::TensorList conv_state,
                          at::TensorList ssm_state, const Tensor& norm_f, const Tensor& head_w, int64_t m,
                          double eps_d) {
  const float eps = static_cast<float>(eps_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(in_w.size());
  const int64_t E = conv_w[0].size(0), N = A[0].size(1), R = packed_k(dt_w[0]), K = conv_w[0].size(1);
  const int64_t XD = R + 2 * N;
  check_states_and_slots(slots, ids, {conv_state, ssm_state});
  TORCH_CHECK(conv_state[0].dim() == 3 && conv_state[0].size(1) == E && conv_state[0].size(2) == K - 1 &&
                  ssm_state[0].dim() == 3 && ssm_state[0].size(1) == E && ssm_state[0].size(2) == N,
              "dense_mamba_decode: state shapes");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const auto opts = emb.options();
  Tensor h = embed(ids, emb);
  Tensor hn = at::empty({B, D}, opts), xz = at::empty({B, 2 * E}, opts), xc = at::empty({B, E}, opts);
  Tensor xdbl = at::empty({B, XD}, opts), dt = at::empty({B, E}, opts), y = at::empty({B, E}, opts);
  Tensor yf = at::empty({B, E}, opts), gy = at::empty({B, E}, opts);
  const int64_t S1 = m > 0 && L > 1 ? packed_k(sel2[1]) : 1;  // the selector's width
  Tensor sel = at::empty({B, S1}, opts);
  Tensor past = at::zeros({std::max<int64_t>(m, 1), B, E}, opts);  // the last m layers' pre-fusion y
  const Rows delta = rows(xdbl).cols_at(0, R);
  float *hp = fp(h), *hnp = fp(hn), *xzp = fp(xz), *xcp = fp(xc), *xdp = fp(xdbl), *dtp = fp(dt);
  float *yp = fp(y), *yfp = fp(yf), *gyp = fp(gy), *pastp = fp(past);
  const Rows hr = rows(hn);
  const int64_t EB = 64, per = (E + EB - 1) / EB;  // channel blocks of the conv and the scan
  for (int64_t l = 0; l < L; ++l) {
    const bool fuse = m > 0 && l > 0;
    rms_norm_rows(hp, fp(norm_w[l]), hnp, B, D, eps);
    const float* ib = fptr_or_null(in_b[l]);
    if (fuse) {
      projs(B, {{hr, &in_w[l], rows(xz), Post::None, false, ib}, {hr, &sel1[l], rows(sel), Post::Silu}});
    } else {
      projs(B, {{hr, &in_w[l], rows(xz), Post::None, false, ib}});
    }
    // Conv step (window = the slot's K-1 previous inputs, then x), shifted in place, silu.
    const float* cw = fp(conv_w[l]);
    const float* cb = fptr_or_null(conv_b[l]);
    float* cs = fp(conv_state[l]);
    const int64_t cs_s = conv_state[l].stride(0);
    parallel_items(B * per, [&](int64_t t) {
      const int64_t b = t / per, c0 = (t % per) * EB, c1 = std::min(E, c0 + EB);
      float* st = cs + slot[b] * cs_s;
      for (int64_t c = c0; c < c1; ++c) {
        float* sc = st + c * (K - 1);
        const float xv = xzp[b * 2 * E + c];
        float acc = cb ? cb[c] : 0.0f;
        for (int64_t k = 0; k < K - 1; ++k) acc += cw[c * K + k] * sc[k];
        acc += cw[c * K + K - 1] * xv;
        for (int64_t k = 0; k + 2 < K; ++k) sc[k] = sc[k + 1];
        if (K > 1) sc[K - 2] = xv;
        xcp[b * E + c] = silu1(acc);
      }
    });
    projs(B, {{rows(xc), &x_w[l], rows(xdbl)}});
    if (fuse) {
      projs(B, {{delta, &dt_w[l], rows(dt)}, {rows(sel), &sel2[l], rows(gy), Post::Silu}});
    } else {
      projs(B, {{delta, &dt_w[l], rows(dt)}});
    }
    // Selective state update per (sequence, block of channels): Δ = softplus(dt + bias),
    // s ← exp(Δ A) s + Δ B x, y = s·C + D x (before the gate); 8 state entries per vector.
    float* ss = fp(ssm_state[l]);
    const int64_t ss_s = ssm_state[l].stride(0);
    const float *Ap = fp(A[l]), *Dv = fp(Dp[l]), *db = fp(dt_b[l]);
    const int64_t N8 = N / 8 * 8;
    parallel_ranges(B * per, 2, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / per, e0 = (t % per) * EB, e1 = std::min(E, e0 + EB);
        const float* Bv = xdp + b * XD + R;
        const float* Cv = Bv + N;
        float* sb = ss + slot[b] * ss_s;
        for (int64_t e = e0; e < e1; ++e) {
          const float d = softplus1(dtp[b * E + e] + db[e]), xe = xcp[b * E + e];
          const __m256 dv = _mm256_set1_ps(d), dx = _mm256_set1_ps(d * xe);
          float* s_ = sb + e * N;
          const float* a = Ap + e * N;
          __m256 acc = _mm256_setzero_ps();
          for (int64_t n = 0; n < N8; n += 8) {
            const __m256 decay = exp256(_mm256_mul_ps(dv, _mm256_loadu_ps(a + n)));
            const __m256 sv =
                _mm256_fmadd_ps(decay, _mm256_loadu_ps(s_ + n), _mm256_mul_ps(dx, _mm256_loadu_ps(Bv + n)));
            _mm256_storeu_ps(s_ + n, sv);
            acc = _mm256_fmadd_ps(sv, _mm256_loadu_ps(Cv + n), acc);
          }
          float out = hsum256(acc);
          for (int64_t n = N8; n < N; ++n) {
            const float sv = std::exp(d * a[n]) * s_[n] + d * Bv[n] * xe;
            s_[n] = sv;
            out += sv * Cv[n];
          }
          yp[b * E + e] = out + Dv[e] * xe;
        }
      }
    });
    // Dense fusion, then this layer's pre-fusion y joins the window (the oldest leaves); gate.
    const float* ynw = fuse ? fp(y_norm[l]) : nullptr;
    parallel_items(B, [&](int64_t b) {
      if (fuse) {
        for (int64_t e = 0; e < E; ++e) {
          float acc = yp[b * E + e];
          for (int64_t j = 0; j < m; ++j) acc = acc + gyp[b * E + e] * pastp[(j * B + b) * E + e];
          yfp[b * E + e] = acc;
        }
        rms_norm(yfp + b * E, ynw, yfp + b * E, E, eps);
      } else {
        std::copy_n(yp + b * E, E, yfp + b * E);
      }
    });
    if (m > 0) {
      std::copy(pastp + B * E, pastp + m * B * E, pastp);
      std::copy_n(yp, B * E, pastp + (m - 1) * B * E);
    }
    parallel_items(B, [&](int64_t b) {
      float* yr = yfp + b * E;
      const float* z = xzp + b * 2 * E + E;
      int64_t e = 0;
      for (; e + 8 <= E; e += 8) _mm256_storeu_ps(yr + e, _mm256_mul_ps(_mm256_loadu_ps(yr + e), silu256(_mm256_loadu_ps(z + e))));
      for (; e < E; ++e) yr[e] *= silu1(z[e]);
    });
    projs(B, {{rows(yf), &out_w[l], rows(h), Post::None, true, fptr_or_null(out_b[l])}});
  }
  rms_norm_rows(hp, fp(norm_f), hnp, B, D, eps);
  return head_logits(hn, head_w, emb.size(0));
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu_rnn, m) {
  m.def("pack_weight(Tensor w, bool kn) -> Tensor");
  m.def("pack_weight_int8(Tensor q, Tensor scale) -> Tensor");
  m.def("linear_packed(Tensor x, Tensor p, int n, int post) -> Tensor");
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
  m.impl("pack_weight", &pack_weight);
  m.impl("pack_weight_int8", &pack_weight_int8);
  m.impl("linear_packed", &linear_packed);
  m.impl("rwkv4_decode", &rwkv4_decode);
  m.impl("rwkv7_decode", &rwkv7_decode);
  m.impl("retnet_decode", &retnet_decode);
  m.impl("dense_retnet_decode", &dense_retnet_decode);
  m.impl("dense_mamba_decode", &dense_mamba_decode);
}
