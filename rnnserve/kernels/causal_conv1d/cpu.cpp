// Varlen causal depthwise conv for prefill on the CPU (float32, AVX2 + FMA), with the optional silu:
// the packed batch in one call, each sequence continuing from its slot's cached K-1 inputs and leaving
// its last K-1 inputs there (in place).
//
//   y[t, c] = act(bias[c] + Σ_k w[c, k] · u[t - (K-1) + k, c])
//
// where u is the sequence preceded by its cache. Work items are (sequence, block of 64 channels); one
// item reads each input row once, straight from x (a row-strided view is fine), and takes the K-1 rows
// before a sequence's first token from the cache. Items run on the item pool of panels.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panels.h"

namespace {

constexpr int64_t kBlock = 64;  // channels per work item
constexpr int64_t kMaxK = 8;    // conv width bound for the local arrays

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

  std::vector<int64_t> seqs;  // the non-empty sequences
  for (int64_t b = 0; b < nseq; ++b) {
    if (cu_seqlens[b + 1] > cu_seqlens[b]) seqs.push_back(b);
  }
  const int64_t blocks = (Cn + kBlock - 1) / kBlock;
  parallel_items(static_cast<int64_t>(seqs.size()) * blocks, [&](int64_t item) {
    const int64_t b = seqs[item / blocks];
    const int64_t c0 = (item % blocks) * kBlock, nc = std::min(kBlock, Cn - c0);
    const int64_t start = cu_seqlens[b], len = cu_seqlens[b + 1] - start;
    // The block's cache as rows [K-1, 64] (oldest first) and its weights as [K, 64] (tap-major).
    alignas(32) float cache[(kMaxK - 1) * kBlock];
    alignas(32) float wt[kMaxK * kBlock];
    alignas(32) float bb[kBlock];
    float* slot = cs + slotp[b] * cs0 + c0 * cs1;
    for (int64_t i = 0; i < nc; ++i) {
      for (int64_t k = 0; k < L; ++k) cache[k * kBlock + i] = slot[i * cs1 + k * cs2];
      for (int64_t k = 0; k < K; ++k) wt[k * kBlock + i] = wp[(c0 + i) * K + k];
      bb[i] = bp ? bp[c0 + i] : 0.0f;
    }
    // Input row j of the sequence preceded by its cache (j in [-(K-1), len)), this block's channels.
    auto row = [&](int64_t j) -> const float* { return j < 0 ? cache + (j + L) * kBlock : xp + (start + j) * sx + c0; };
    const int64_t full = nc / 8 * 8;
    for (int64_t t = 0; t < len; ++t) {
      const float* rows[kMaxK];
      for (int64_t k = 0; k < K; ++k) rows[k] = row(t - L + k);
      float* out = yp + (start + t) * Cn + c0;
      for (int64_t i = 0; i < full; i += 8) {
        __m256 acc = _mm256_load_ps(bb + i);
        for (int64_t k = 0; k < K; ++k) acc = _mm256_fmadd_ps(_mm256_load_ps(wt + k * kBlock + i), _mm256_loadu_ps(rows[k] + i), acc);
        if (silu) acc = silu256(acc);
        _mm256_storeu_ps(out + i, acc);
      }
      for (int64_t i = full; i < nc; ++i) {
        float acc = bb[i];
        for (int64_t k = 0; k < K; ++k) acc += wt[k * kBlock + i] * rows[k][i];
        out[i] = silu ? silu1(acc) : acc;
      }
    }
    // The new cache: the last K-1 input rows (cache rows first when the sequence is shorter than that).
    for (int64_t k = 0; k < L; ++k) {
      const float* src = row(len - L + k);
      for (int64_t i = 0; i < nc; ++i) slot[i * cs1 + k * cs2] = src[i];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu_conv, m) {
  m.def(
      "causal_conv1d_varlen(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_state, int[] cu_seqlens, "
      "Tensor slot_ids, bool silu) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnserve_cpu_conv, CPU, m) { m.impl("causal_conv1d_varlen", &causal_conv1d_varlen); }
