// The fused CPU decode step of the LLaMA-layout Transformer baseline (models/transformer.py): float32
// activations and KV cache, float32 or int8 weights (weight-only, per-channel scales), AVX2 + FMA, one
// call per model step.
//
// Built on first use by torch.utils.cpp_extension (see transformer.py next to this file) and registered
// as torch.ops.rnnserve_cpu_llama.*. Per step:
//   - embedding, RoPE angles (once per step, every layer uses them), then per layer: RMSNorm, one GEMM
//     for q, k and v together, RoPE on q and k, the new key and value written into the engine's paged
//     KV cache in place (kv_cache.py's layout, at the step's slot mapping), attention over the
//     sequence's cached positions read through its block table, o_proj accumulated into the residual,
//     RMSNorm, one GEMM for gate and up, SwiGLU, down_proj accumulated into the residual; final norm
//     and the head;
//   - every matrix product through panels.h's packed 16-column panels (gemm_panels; fp32 or int8
//     panels), and the attention cut into (sequence, KV head) items for panels.h's item pool;
//   - GQA: the query heads that share a KV head are one item, so each cached key and value row is read
//     once for all of them.
// Only scratch activations are allocated per step (a few [B, width] buffers), none per layer.
#include "panels.h"

#include <torch/library.h>

#include <limits>

namespace {

// ------------------------------------------------------------------------------------------ helpers

// Σ a[i] b[i] over n floats (two accumulator chains, scalar tail).
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  if (i + 8 <= n) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    i += 8;
  }
  float s = hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0..n) += a * x[0..n).
inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// y[M, D] = x / sqrt(mean(x²) + eps) * weight, per row (models/transformer.py's RMSNorm in fp32).
void rms_norm(const float* x, const float* weight, float* y, int64_t M, int64_t D, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * D;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, D) / static_cast<float>(D) + eps);
    for (int64_t j = 0; j < D; ++j) y[m * D + j] = weight[j] * (xr[j] * inv);
  }
}

// RoPE (rotate-half layout, every dimension rotating) of heads [n, hd] in place with one row's
// cos / sin [hd / 2]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
inline void rope_heads(float* x, int64_t n, int64_t hd, const float* cs, const float* sn) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < n; ++h) {
    float* x1 = x + h * hd;
    float* x2 = x1 + half;
    for (int64_t i = 0; i < half; ++i) {
      const float a = x1[i], b = x2[i];
      x1[i] = a * cs[i] - b * sn[i];
      x2[i] = b * cs[i] + a * sn[i];
    }
  }
}

// Softmax of s[0..n) in place (max subtracted; exp through exp256).
inline void softmax(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum256(acc);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

// ----------------------------------------------------------------------------------------- attention

// Where one step's sequences keep their keys and values: a layer's cache [NB, bs, Hkv, hd] (position p
// of sequence b in row tables[b, p / bs] * bs + p % bs), lengths after this step.
struct PagedView {
  const int32_t* tables;  // [B, max_blocks]
  int64_t table_stride;
  const int32_t* lens;  // [B], >= 1, the new token included
  int64_t bs, Hkv, hd;
};

// One (sequence b, KV head g) item: the `group` query heads q [group, hd] that read KV head g attend
// over positions [0, lens[b]) -> out [group, hd]. scores: scratch [group, lens[b]].
void attend(const PagedView& v, const float* kc, const float* vc, int64_t b, int64_t g, int64_t group,
            const float* q, float scale, float* scores, float* out) {
  const int64_t L = v.lens[b], hd = v.hd, row = v.Hkv * hd;
  const int32_t* table = v.tables + b * v.table_stride;
  for (int64_t p0 = 0; p0 < L; p0 += v.bs) {  // one block of keys at a time
    const float* kb = kc + static_cast<int64_t>(table[p0 / v.bs]) * v.bs * row + g * hd;
    for (int64_t p = p0; p < std::min(L, p0 + v.bs); ++p) {
      const float* key = kb + (p - p0) * row;
      for (int64_t i = 0; i < group; ++i) scores[i * L + p] = dot(q + i * hd, key, hd) * scale;
    }
  }
  for (int64_t i = 0; i < group; ++i) softmax(scores + i * L, L);
  std::fill_n(out, group * hd, 0.0f);
  for (int64_t p0 = 0; p0 < L; p0 += v.bs) {
    const float* vb = vc + static_cast<int64_t>(table[p0 / v.bs]) * v.bs * row + g * hd;
    for (int64_t p = p0; p < std::min(L, p0 + v.bs); ++p) {
      const float* val = vb + (p - p0) * row;
      for (int64_t i = 0; i < group; ++i) axpy(scores[i * L + p], val, out + i * hd, hd);
    }
  }
}

// Per-thread score scratch, grow-only (a step's longest sequence times the query heads of one group).
float* score_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// --------------------------------------------------------------------------------------------- ops

// A bias tensor's data, or null for an empty one (no bias).
const float* bias_ptr(const Tensor& t) {
  if (!t.numel()) return nullptr;
  check_f32(t, "a bias");
  return t.data_ptr<float>();
}

// The step's paged-cache metadata is what the kernels index without further checks: check it once.
void check_kv(const Tensor& tables, const Tensor& lens, const Tensor& slot_mapping, const Tensor& positions,
              int64_t B, int64_t num_rows, int64_t bs, int64_t num_blocks) {
  TORCH_CHECK(tables.scalar_type() == at::kInt && tables.dim() == 2 && tables.size(0) == B && tables.stride(1) == 1,
              "block_tables must be int32 [B, max_blocks] with unit column stride");
  TORCH_CHECK(lens.scalar_type() == at::kInt && lens.numel() == B && lens.is_contiguous(), "seq_lens: int32 [B]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == B && slot_mapping.is_contiguous(),
              "slot_mapping: int64 [B] (one new token per sequence)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == B && positions.is_contiguous(),
              "positions: int64 [B]");
  const int32_t* t = tables.data_ptr<int32_t>();
  const int32_t* len = lens.data_ptr<int32_t>();
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= tables.size(1) * bs, "seq_lens[", b, "] = ", len[b], " out of range");
    TORCH_CHECK(slot[b] >= 0 && slot[b] < num_rows, "slot_mapping[", b, "] = ", slot[b], " out of range");
    for (int64_t k = 0; k < (len[b] + bs - 1) / bs; ++k) {
      const int32_t blk = t[b * tables.stride(0) + k];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block_tables[", b, ", ", k, "] = ", blk, " out of range");
    }
  }
}

// A LLaMA-layout decode, every layer. Per layer l: norm1_w / norm2_w [D]; qkv_w packed panels of
// [q; k; v] ([(H + 2 Hkv) hd, D] as a linear weight) and its bias (empty when none); o_w [H hd -> D];
// gu_w packed [gate; up] ([2I, D]); down_w [I -> D]; k_cache[l], v_cache[l] [NB, bs, Hkv, hd] written in
// place at slot_mapping [B] and read through block_tables [B, max_blocks] up to seq_lens [B].
// inv_freq [hd / 2] (RoPE); positions [B]. Returns logits [B, V].
Tensor llama_decode(const Tensor& ids, const Tensor& positions, const Tensor& emb, at::TensorList norm1_w,
                    at::TensorList qkv_w, at::TensorList qkv_b, at::TensorList o_w, at::TensorList o_b,
                    at::TensorList norm2_w, at::TensorList gu_w, at::TensorList gu_b, at::TensorList down_w,
                    at::TensorList down_b, at::TensorList k_cache, at::TensorList v_cache, const Tensor& block_tables,
                    const Tensor& seq_lens, const Tensor& slot_mapping, const Tensor& inv_freq, const Tensor& norm_f,
                    const Tensor& head_w, int64_t V, double eps_d, int64_t H, int64_t Hkv, int64_t hd,
                    int64_t I, double scale_d) {
  const float eps = static_cast<float>(eps_d), scale = static_cast<float>(scale_d);
  const int64_t B = ids.size(0), D = emb.size(1), L = static_cast<int64_t>(qkv_w.size());
  const int64_t QD = H * hd, KD = Hkv * hd, W = QD + 2 * KD, group = H / Hkv, half = hd / 2;
  TORCH_CHECK(H % Hkv == 0 && hd % 2 == 0, "llama_decode: H a multiple of Hkv, an even head_dim");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous(), "input_ids: int64 [B]");
  TORCH_CHECK(k_cache.size() == static_cast<size_t>(L) && v_cache.size() == static_cast<size_t>(L),
              "one key and one value cache per layer");
  const int64_t NB = k_cache[0].size(0), bs = k_cache[0].size(1);
  for (int64_t l = 0; l < L; ++l) {
    for (const Tensor& c : {k_cache[l], v_cache[l]}) {
      check_f32(c, "the KV cache");
      TORCH_CHECK(c.is_contiguous() && c.dim() == 4 && c.size(0) == NB && c.size(1) == bs && c.size(2) == Hkv &&
                      c.size(3) == hd,
                  "KV cache ", c.sizes(), " is not a contiguous [", NB, ", ", bs, ", ", Hkv, ", ", hd, "]");
    }
  }
  check_f32(inv_freq, "inv_freq");
  TORCH_CHECK(inv_freq.numel() == half && inv_freq.is_contiguous(), "inv_freq: [head_dim / 2]");
  check_kv(block_tables, seq_lens, slot_mapping, positions, B, NB * bs, bs, NB);
  const PagedView view{block_tables.data_ptr<int32_t>(), block_tables.stride(0), seq_lens.data_ptr<int32_t>(), bs,
                       Hkv, hd};
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();

  Tensor h = at::empty({B, D}, emb.options());  // residual stream, fp32
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(id[b] >= 0 && id[b] < emb.size(0), "token id ", id[b], " out of range");
    std::copy_n(emb.data_ptr<float>() + id[b] * D, D, h.data_ptr<float>() + b * D);
  }
  // RoPE angles once per step: cos / sin [B, hd / 2] of position * inv_freq (fp32, as rope_cos_sin).
  std::vector<float> cs(B * half), sn(B * half);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* fr = inv_freq.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = static_cast<float>(pos[b]) * fr[i];
      cs[b * half + i] = std::cos(a);
      sn[b * half + i] = std::sin(a);
    }
  }
  Tensor hn = at::empty({B, D}, h.options());
  Tensor qkv = at::empty({B, W}, h.options());  // [B, q | k | v]
  Tensor att = at::empty({B, QD}, h.options());
  Tensor gu = at::empty({B, 2 * I}, h.options());  // [B, gate | up]
  Tensor act = at::empty({B, I}, h.options());
  float* hp = h.data_ptr<float>();
  float* hnp = hn.data_ptr<float>();
  float* qp = qkv.data_ptr<float>();
  float* ap = att.data_ptr<float>();
  float* gp = gu.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, view.lens[b]);

  for (int64_t l = 0; l < L; ++l) {
    rms_norm(hp, norm1_w[l].data_ptr<float>(), hnp, B, D, eps);
    gemm_panels(hn, qkv_w[l], bias_ptr(qkv_b[l]), qkv, false);
    float* kc = k_cache[l].data_ptr<float>();
    float* vc = v_cache[l].data_ptr<float>();
    // RoPE on q and k, then the new key and value into the cache rows the step's slot mapping names
    // (before any item reads them: each sequence attends to its own new token).
    for (int64_t b = 0; b < B; ++b) {
      float* r = qp + b * W;
      rope_heads(r, H + Hkv, hd, cs.data() + b * half, sn.data() + b * half);  // q heads, then k heads
      std::copy_n(r + QD, KD, kc + slot[b] * KD);
      std::copy_n(r + QD + KD, KD, vc + slot[b] * KD);
    }
    parallel_items(B * Hkv, [&](int64_t t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      float* scores = score_scratch(group * max_len);
      attend(view, kc, vc, b, g, group, qp + b * W + g * group * hd, scale, scores, ap + b * QD + g * group * hd);
    });
    gemm_panels(att, o_w[l], bias_ptr(o_b[l]), h, true);  // h += o_proj(attention)
    rms_norm(hp, norm2_w[l].data_ptr<float>(), hnp, B, D, eps);
    gemm_panels(hn, gu_w[l], bias_ptr(gu_b[l]), gu, false);
    parallel_ranges(B, 1, [&](int64_t b0, int64_t b1) {  // SwiGLU: silu(gate) * up
      for (int64_t b = b0; b < b1; ++b) {
        const float* g = gp + b * 2 * I;
        const float* u = g + I;
        float* a = actp + b * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8)
          _mm256_storeu_ps(a + i, _mm256_mul_ps(silu256(_mm256_loadu_ps(g + i)), _mm256_loadu_ps(u + i)));
        for (; i < I; ++i) a[i] = silu1(g[i]) * u[i];
      }
    });
    gemm_panels(act, down_w[l], bias_ptr(down_b[l]), h, true);  // h += down_proj(act)
  }
  rms_norm(hp, norm_f.data_ptr<float>(), hnp, B, D, eps);
  Tensor logits = at::empty({B, V}, h.options());
  gemm_panels(hn, head_w, nullptr, logits, false);
  return logits;
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu_llama, m) {
  m.def("pack_weight(Tensor w, bool kn) -> Tensor");
  m.def("pack_weight_int8(Tensor q, Tensor scale) -> Tensor");
  m.def(
      "llama_decode(Tensor ids, Tensor positions, Tensor emb, Tensor[] norm1_w, Tensor[] qkv_w, Tensor[] qkv_b, "
      "Tensor[] o_w, Tensor[] o_b, Tensor[] norm2_w, Tensor[] gu_w, Tensor[] gu_b, Tensor[] down_w, "
      "Tensor[] down_b, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor slot_mapping, Tensor inv_freq, Tensor norm_f, Tensor head_w, int V, float eps, int H, int Hkv, "
      "int hd, int I, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnserve_cpu_llama, CPU, m) {
  m.impl("pack_weight", &pack_weight);
  m.impl("pack_weight_int8", &pack_weight_int8);
  m.impl("llama_decode", &llama_decode);
}
