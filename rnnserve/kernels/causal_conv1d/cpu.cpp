// Varlen causal depthwise conv for prefill on the CPU (float32, AVX2 + FMA), with the optional silu:
// the packed batch in one call, each sequence continuing from its slot's cached K-1 inputs and leaving
// its last K-1 inputs there (in place).
//
//   y[t, c] = act(bias[c] + Σ_k w[c, k] · u[t - (K-1) + k, c])
//
// where u is the sequence preceded by its cache. Work items are (sequence, run of 32 tokens), all
// channels: input rows are read straight from x (a row-strided view is fine), the K-1 rows before a
// sequence's first token from the cache. Items run on the item pool of panels.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panels.h"

namespace {

constexpr int64_t kRows = 32;  // tokens per work item
constexpr int64_t kMaxK = 8;   // conv width bound

// x [T, C] (unit column stride, any row stride); weight [C, K]; bias [C] or None; conv_state [S, C, K-1]
// (read at slot_ids, each sequence's last K-1 inputs written back); cu_seqlens [nseq + 1] host ints;
// slot_ids [nseq] int64. Returns y [T, C]. Empty sequences leave their slot untouched.
at::Tensor causal_conv1d_varlen(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                at::Tensor& conv_state, at::IntArrayRef cu_seqlens, const at::Tensor& slot_ids,
                                bool silu) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1,
              "causal_conv1d_varlen: x must be a float32 CPU [T, C] tensor with unit column stride");
  const int64_t T = x.size(0), Cn = x.size(1), K = weight.size(1), L = K - 1;
  TORCH_CHECK(K >= 2 && K <= kMaxK, "causal_conv1d_varlen: conv width ", K, " not in [2, ", kMaxK, "]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2 && weight.size(0) == Cn,
              "causal_conv1d_varlen: weight must be float32 [C, K]");
  const at::Tensor w = weight.contiguous();
  const float* wp = w.data_ptr<float>();
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == Cn && bias->is_contiguous(),
                "causal_conv1d_varlen: bias must be a contiguous float32 [C] tensor");
    bp = bias->data_ptr<float>();
  }
  TORCH_CHECK(conv_state.scalar_type() == at::kFloat && conv_state.dim() == 3 && conv_state.size(1) == Cn &&
                  conv_state.size(2) == L,
              "causal_conv1d_varlen: conv_state must be float32 [S, C, K-1]");
  const int64_t nseq = static_cast<int64_t>(cu_seqlens.size()) - 1;
  TORCH_CHECK(nseq >= 0 && cu_seqlens[0] == 0 && cu_seqlens[nseq] == T,
              "causal_conv1d_varlen: cu_seqlens must run from 0 to the token count ", T);
  for (int64_t b = 0; b < nseq; ++b) {
    TORCH_CHECK(cu_seqlens[b + 1] >= cu_seqlens[b], "causal_conv1d_varlen: cu_seqlens must not decrease");
  }
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong && slot_ids.dim() == 1 && slot_ids.size(0) == nseq,
              "causal_conv1d_varlen: slot_ids must be int64 [", nseq, "]");
  const at::Tensor slots = slot_ids.contiguous();
  const int64_t* slotp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < nseq; ++b) {
    TORCH_CHECK(slotp[b] >= 0 && slotp[b] < conv_state.size(0), "causal_conv1d_varlen: slot ", slotp[b],
                " out of range");
  }
  const float* xp = x.data_ptr<float>();
  const int64_t sx = x.stride(0);
  float* cs = conv_state.data_ptr<float>();
  const int64_t cs0 = conv_state.stride(0), cs1 = conv_state.stride(1), cs2 = conv_state.stride(2);

  at::Tensor y = at::empty({T, Cn}, x.options());
  float* yp = y.data_ptr<float>();

  // Work items are (sequence, run of kRows tokens) over every channel: an item reads input rows in
  // memory order (whole rows, which the hardware prefetcher follows), where (sequence, channel block)
  // items read 256 bytes per row at the row stride and waited on memory. Rows before a sequence's first
  // token come from its cache, copied first into pre [nseq, K-1, C] (row-major like x).
  std::vector<float> wt(K * Cn);  // the weights tap-major [K, C]
  for (int64_t c = 0; c < Cn; ++c)
    for (int64_t k = 0; k < K; ++k) wt[k * Cn + c] = wp[c * K + k];
  std::vector<float> pre(std::max<int64_t>(nseq, 1) * L * Cn);
  struct Item {
    int64_t b, t0, t1;  // sequence, token range within it
  };
  std::vector<Item> items;
  for (int64_t b = 0; b < nseq; ++b) {
    const float* slot = cs + slotp[b] * cs0;
    for (int64_t k = 0; k < L; ++k)
      for (int64_t c = 0; c < Cn; ++c) pre[(b * L + k) * Cn + c] = slot[c * cs1 + k * cs2];
    const int64_t len = cu_seqlens[b + 1] - cu_seqlens[b];
    for (int64_t t0 = 0; t0 < len; t0 += kRows) items.push_back({b, t0, std::min(len, t0 + kRows)});
  }
  const int64_t full = Cn / 8 * 8;
  parallel_items(static_cast<int64_t>(items.size()), [&](int64_t n) {
    const Item it = items[n];
    const int64_t start = cu_seqlens[it.b];
    // Input row j of the sequence preceded by its cache (j in [-(K-1), len)), all channels.
    auto row = [&](int64_t j) -> const float* {
      return j < 0 ? pre.data() + (it.b * L + j + L) * Cn : xp + (start + j) * sx;
    };
    for (int64_t t = it.t0; t < it.t1; ++t) {
      const float* rows[kMaxK];
      for (int64_t k = 0; k < K; ++k) rows[k] = row(t - L + k);
      float* out = yp + (start + t) * Cn;
      for (int64_t c = 0; c < full; c += 8) {
        __m256 acc = bp ? _mm256_loadu_ps(bp + c) : _mm256_setzero_ps();
        for (int64_t k = 0; k < K; ++k)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt.data() + k * Cn + c), _mm256_loadu_ps(rows[k] + c), acc);
        if (silu) acc = silu256(acc);
        _mm256_storeu_ps(out + c, acc);
      }
      for (int64_t c = full; c < Cn; ++c) {
        float acc = bp ? bp[c] : 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += wt[k * Cn + c] * rows[k][c];
        out[c] = silu ? silu1(acc) : acc;
      }
    }
  });
  // The new caches: each non-empty sequence's last K-1 input rows (cache rows first when the sequence is
  // shorter than that), after every item has read the old ones.
  for (int64_t b = 0; b < nseq; ++b) {
    const int64_t start = cu_seqlens[b], len = cu_seqlens[b + 1] - start;
    if (len == 0) continue;
    float* slot = cs + slotp[b] * cs0;
    for (int64_t k = 0; k < L; ++k) {
      const int64_t j = len - L + k;
      const float* src = j < 0 ? pre.data() + (b * L + j + L) * Cn : xp + (start + j) * sx;
      for (int64_t c = 0; c < Cn; ++c) slot[c * cs1 + k * cs2] = src[c];
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu_conv, m) {
  m.def(
      "causal_conv1d_varlen(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_state, int[] cu_seqlens, "
      "Tensor slot_ids, bool silu) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnserve_cpu_conv, CPU, m) { m.impl("causal_conv1d_varlen", &causal_conv1d_varlen); }
