// Mamba-1 selective scan for prefill on the CPU (float32, AVX2 + FMA): the packed varlen batch in one
// call, every sequence resumed from its slot's state and its final state written back in place.
//
// Per token t, channel e and state index n (see README.md):
//   Δ = softplus(dt + dt_bias),  s ← exp(Δ A) ⊙ s + (Δ x) B,  y = (s·C + D x) ⊙ silu(z)
//
// Work items are (sequence, block of 64 channels); one item walks its sequence's tokens in order and
// keeps its block's state, transposed to [N, 64] so that 8 channels fill a vector and the N-loop needs
// no horizontal sums, in a 4 KiB local array (L1) for the whole sequence. Nothing of size [T, E, N] is
// ever made: Δ, exp(Δ A), the D skip and the gate are computed and used in registers. Items run on the
// item pool of panels.h (the caller plus at::get_num_threads() - 1 workers).
// With AVX-512 and N = 16 an item is (sequence, 16 channels) instead and its state never leaves the
// registers (scan16_avx512).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "panels.h"

namespace {

constexpr int64_t kBlock = 64;  // channels per work item (8 vectors of 8)
constexpr float kLog2e = 1.44269504088896341f;
constexpr int64_t kMaxN = 64;  // state size bound for the local state arrays (2 x 16 KiB)

// 2^t for 8 floats t <= 0 (the decays: t = Δ A log2(e) with Δ > 0, A < 0): t = n + f with n an
// integer and |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n added to
// the exponent bits. Below -126 it gives 2^-126 (a normal float, 1e-38) instead of less: the state
// is scaled by it, the same as by 0 at float precision. 13 instructions against exp256's 21: this runs
// once per (token, channel, state index), the scan's innermost work.
inline __m256 exp2_neg256(__m256 t) {
  t = _mm256_max_ps(t, _mm256_set1_ps(-126.0f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);  // ln2^6 / 6!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

// ------------------------------------------------------------------------------------------ AVX-512
// Where the CPU has AVX-512 and N = 16 (every Mamba-1 checkpoint), a work item is (sequence, 16
// channels) and its whole [16, 16] state stays in 16 of the 32 vector registers for the sequence: no
// state loads or stores per token and half the instructions of the AVX2 loop. Compiled for AVX-512
// through the target attribute and run only when the CPU reports it, so the extension still builds
// and runs with -mavx2 alone.

// exp2_neg256 on 16 floats, 2^n applied by vscalefps (one instruction for the conversion, shift and
// add, and exact) instead of through the exponent bits.
RNNSERVE_AVX512 inline __m512 exp2_neg512(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// log256, softplus256 and silu256 of panels.h on 16 floats (with its exp512): the same operations (so the
// same results), masks for the AVX2 blends. On both 8-float halves through the AVX2 forms, softplus and silu
// took about a third of scan16's instructions.
RNNSERVE_AVX512 inline __m512 log512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i xi = _mm512_castps_si512(x);
  const __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(xi, 23), _mm512_set1_epi32(127));
  x = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(xi, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)));
  __m512 ef = _mm512_add_ps(_mm512_cvtepi32_ps(e), one);  // x = m * 2^ef with m in [0.5, 1)
  const __mmask16 small = _mm512_cmp_ps_mask(x, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  ef = _mm512_mask_sub_ps(ef, small, ef, one);
  const __m512 xm1 = _mm512_sub_ps(x, one);
  x = _mm512_mask_add_ps(xm1, small, xm1, x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(7.0376836292E-2f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.1514610310E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.1676998740E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.2420140846E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.4249322787E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-1.6668057665E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(2.0000714765E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(-2.4999993993E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(3.3333331174E-1f));
  y = _mm512_mul_ps(_mm512_mul_ps(y, x), z);
  y = _mm512_fmadd_ps(ef, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
  x = _mm512_add_ps(x, y);
  return _mm512_fmadd_ps(ef, _mm512_set1_ps(0.693359375f), x);
}

RNNSERVE_AVX512 inline __m512 softplus512(__m512 x) {
  const __m512 absx = _mm512_abs_ps(x);
  const __m512 sp = _mm512_add_ps(
      _mm512_max_ps(x, _mm512_setzero_ps()),
      log512(_mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), absx)))));
  return _mm512_mask_mov_ps(sp, _mm512_cmp_ps_mask(x, _mm512_set1_ps(20.0f), _CMP_GT_OQ), x);
}

RNNSERVE_AVX512 inline __m512 silu512(__m512 x) {
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

struct Scan16Args {
  const float *x, *dt, *z, *B, *C;  // rows of the packed batch, at this item's first channel (B, C: at 0)
  int64_t sx, sdt, sz, sB, sC;      // their row strides
  const float* A2;                  // [16 n, 16 e] A log2(e), transposed
  const float *D, *bias;            // [16] or null
  float* state;                     // the slot's [E, 16] state at this item's first channel
  float* y;                         // y rows at this item's first channel, row stride E
  int64_t E, t0, t1;
  bool softplus;
};

// One sequence's tokens [t0, t1) for 16 channels, N = 16.
RNNSERVE_AVX512 void scan16_avx512(const Scan16Args& a) {
  FlushDenormals ftz;
  alignas(64) float tmp[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 16; ++n) tmp[n * 16 + i] = a.state[i * 16 + n];
  __m512 st[16];
#pragma GCC unroll 16
  for (int n = 0; n < 16; ++n) st[n] = _mm512_load_ps(tmp + n * 16);
  const __m512 Dv = a.D ? _mm512_loadu_ps(a.D) : _mm512_setzero_ps();
  const __m512 bv = a.bias ? _mm512_loadu_ps(a.bias) : _mm512_setzero_ps();
  for (int64_t t = a.t0; t < a.t1; ++t) {
    __m512 d = _mm512_add_ps(_mm512_loadu_ps(a.dt + t * a.sdt), bv);
    if (a.softplus) d = softplus512(d);
    const __m512 xv = _mm512_loadu_ps(a.x + t * a.sx);
    const __m512 dx = _mm512_mul_ps(d, xv);
    const float* Bt = a.B + t * a.sB;
    const float* Ct = a.C + t * a.sC;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int n = 0; n < 16; n += 2) {
      const __m512 d0 = exp2_neg512(_mm512_mul_ps(d, _mm512_load_ps(a.A2 + n * 16)));
      const __m512 d1 = exp2_neg512(_mm512_mul_ps(d, _mm512_load_ps(a.A2 + (n + 1) * 16)));
      st[n] = _mm512_fmadd_ps(d0, st[n], _mm512_mul_ps(dx, _mm512_set1_ps(Bt[n])));
      st[n + 1] = _mm512_fmadd_ps(d1, st[n + 1], _mm512_mul_ps(dx, _mm512_set1_ps(Bt[n + 1])));
      acc0 = _mm512_fmadd_ps(st[n], _mm512_set1_ps(Ct[n]), acc0);
      acc1 = _mm512_fmadd_ps(st[n + 1], _mm512_set1_ps(Ct[n + 1]), acc1);
    }
    __m512 out = _mm512_fmadd_ps(Dv, xv, _mm512_add_ps(acc0, acc1));
    if (a.z) out = _mm512_mul_ps(out, silu512(_mm512_loadu_ps(a.z + t * a.sz)));
    _mm512_storeu_ps(a.y + t * a.E, out);
  }
#pragma GCC unroll 16
  for (int n = 0; n < 16; ++n) _mm512_store_ps(tmp + n * 16, st[n]);
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 16; ++n) a.state[i * 16 + n] = tmp[n * 16 + i];
}

// Row-major [rows, cols] float32 with unit column stride; rows may be strided (views of a wider GEMM
// output, e.g. x and z of in_proj's [T, 2E]).
const float* rows_ptr(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "selective_scan_varlen: ", name,
              " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "selective_scan_varlen: ", name,
              " has shape ", t.sizes(), ", expected [", rows, ", ", cols, "]");
  TORCH_CHECK(t.stride(1) == 1 || cols == 1, "selective_scan_varlen: ", name, " needs unit column stride");
  return t.data_ptr<float>();
}

// x, dt, z [T, E]; A [E, N]; B, C [T, N]; D, dt_bias [E] or None; ssm_state [S, E, N] (read at
// slot_ids, final states written back); cu_seqlens [nseq + 1] host ints; slot_ids [nseq] int64.
// Returns y [T, E]. Empty sequences leave their slot untouched.
at::Tensor selective_scan_varlen(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                 const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                                 at::Tensor& ssm_state, at::IntArrayRef cu_seqlens, const at::Tensor& slot_ids,
                                 bool dt_softplus) {
  const int64_t T = x.size(0), E = x.size(1), N = A.size(1);
  const int64_t nseq = static_cast<int64_t>(cu_seqlens.size()) - 1;
  TORCH_CHECK(nseq >= 0 && cu_seqlens[0] == 0 && cu_seqlens[nseq] == T,
              "selective_scan_varlen: cu_seqlens must run from 0 to the token count ", T);
  for (int64_t b = 0; b < nseq; ++b) {
    TORCH_CHECK(cu_seqlens[b + 1] >= cu_seqlens[b], "selective_scan_varlen: cu_seqlens must not decrease");
  }
  TORCH_CHECK(N >= 1 && N <= kMaxN, "selective_scan_varlen: state size ", N, " not in [1, ", kMaxN, "]");
  const float* xp = rows_ptr(x, "x", T, E);
  const float* dtp = rows_ptr(dt, "dt", T, E);
  const float* Bp = rows_ptr(B, "B", T, N);
  const float* Cp = rows_ptr(C, "C", T, N);
  const float* zp = z.has_value() ? rows_ptr(*z, "z", T, E) : nullptr;
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.dim() == 2 && A.size(0) == E && A.is_contiguous(),
              "selective_scan_varlen: A must be a contiguous float32 [E, N] tensor");
  const float* Ap = A.data_ptr<float>();
  const float* Dp = vec_ptr(D, "D", E);
  const float* biasp = vec_ptr(dt_bias, "dt_bias", E);
  TORCH_CHECK(ssm_state.scalar_type() == at::kFloat && ssm_state.dim() == 3 && ssm_state.size(1) == E &&
                  ssm_state.size(2) == N && ssm_state.stride(2) == 1 && ssm_state.stride(1) == N,
              "selective_scan_varlen: ssm_state must be float32 [S, E, N] with contiguous [E, N] rows");
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong && slot_ids.dim() == 1 && slot_ids.size(0) == nseq,
              "selective_scan_varlen: slot_ids must be int64 [", nseq, "]");
  const at::Tensor slots = slot_ids.contiguous();
  const int64_t* slotp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < nseq; ++b) {
    TORCH_CHECK(slotp[b] >= 0 && slotp[b] < ssm_state.size(0), "selective_scan_varlen: slot ", slotp[b],
                " out of range");
  }
  const int64_t sx = x.stride(0), sdt = dt.stride(0), sB = B.stride(0), sC = C.stride(0);
  const int64_t sz = zp ? z->stride(0) : 0;
  float* statep = ssm_state.data_ptr<float>();
  const int64_t sS = ssm_state.stride(0);

  at::Tensor y = at::empty({T, E}, x.options());
  float* yp = y.data_ptr<float>();

  std::vector<int64_t> seqs;  // the non-empty sequences
  for (int64_t b = 0; b < nseq; ++b) {
    if (cu_seqlens[b + 1] > cu_seqlens[b]) seqs.push_back(b);
  }
  if (N == 16 && E % 16 == 0 && use_avx512()) {
    // A log2(e) transposed to [E / 16, 16 n, 16 e]: one [16, 16] tile per item.
    std::vector<float> a2(E * 16);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t n = 0; n < 16; ++n) a2[(e / 16) * 256 + n * 16 + e % 16] = Ap[e * 16 + n] * kLog2e;
    const int64_t groups = E / 16;
    parallel_items(static_cast<int64_t>(seqs.size()) * groups, [&](int64_t item) {
      const int64_t b = seqs[item / groups], e0 = (item % groups) * 16;
      Scan16Args a{xp + e0, dtp + e0, zp ? zp + e0 : nullptr, Bp, Cp, sx, sdt, sz, sB, sC,
                   a2.data() + (e0 / 16) * 256, Dp ? Dp + e0 : nullptr, biasp ? biasp + e0 : nullptr,
                   statep + slotp[b] * sS + e0 * 16, yp + e0, E, cu_seqlens[b], cu_seqlens[b + 1], dt_softplus};
      scan16_avx512(a);
    });
    return y;
  }
  const int64_t blocks = (E + kBlock - 1) / kBlock;
  parallel_items(static_cast<int64_t>(seqs.size()) * blocks, [&](int64_t item) {
    FlushDenormals ftz;  // a decaying state would otherwise spend its time in denormal assists
    const int64_t b = seqs[item / blocks];
    const int64_t e0 = (item % blocks) * kBlock, ne = std::min(kBlock, E - e0);
    const int64_t groups = (ne + 7) / 8;
    // Local copies for the block, padded with zeros past ne (padded lanes compute finite junk that is
    // never stored): the state and A log2(e) transposed to [N, 64], per-token inputs [64].
    alignas(32) float st[kMaxN * kBlock];
    alignas(32) float at_[kMaxN * kBlock];
    alignas(32) float xb[kBlock], db[kBlock], zb[kBlock], yb[kBlock], Db[kBlock], biasb[kBlock];
    std::memset(st, 0, sizeof(float) * N * kBlock);
    std::memset(at_, 0, sizeof(float) * N * kBlock);
    std::memset(xb, 0, sizeof(xb));
    std::memset(db, 0, sizeof(db));
    std::memset(zb, 0, sizeof(zb));
    std::memset(Db, 0, sizeof(Db));
    std::memset(biasb, 0, sizeof(biasb));
    float* s0 = statep + slotp[b] * sS + e0 * N;  // [ne, N] of the slot's [E, N]
    for (int64_t i = 0; i < ne; ++i) {
      for (int64_t n = 0; n < N; ++n) {
        st[n * kBlock + i] = s0[i * N + n];
        at_[n * kBlock + i] = Ap[(e0 + i) * N + n] * kLog2e;
      }
      if (Dp) Db[i] = Dp[e0 + i];
      if (biasp) biasb[i] = biasp[e0 + i];
    }
    const size_t row_bytes = sizeof(float) * ne;
    for (int64_t t = cu_seqlens[b]; t < cu_seqlens[b + 1]; ++t) {
      std::memcpy(xb, xp + t * sx + e0, row_bytes);
      std::memcpy(db, dtp + t * sdt + e0, row_bytes);
      if (zp) std::memcpy(zb, zp + t * sz + e0, row_bytes);
      const float* Bt = Bp + t * sB;
      const float* Ct = Cp + t * sC;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t o = g * 8;
        __m256 d = _mm256_add_ps(_mm256_load_ps(db + o), _mm256_load_ps(biasb + o));
        if (dt_softplus) d = softplus256(d);
        const __m256 xv = _mm256_load_ps(xb + o);
        const __m256 dx = _mm256_mul_ps(d, xv);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t n = 0;
        for (; n + 2 <= N; n += 2) {  // two accumulators: the y sum is the only loop-carried chain
          float* s_a = st + n * kBlock + o;
          float* s_b = s_a + kBlock;
          const __m256 a_a = exp2_neg256(_mm256_mul_ps(d, _mm256_load_ps(at_ + n * kBlock + o)));
          const __m256 a_b = exp2_neg256(_mm256_mul_ps(d, _mm256_load_ps(at_ + (n + 1) * kBlock + o)));
          const __m256 v_a = _mm256_fmadd_ps(a_a, _mm256_load_ps(s_a), _mm256_mul_ps(dx, _mm256_broadcast_ss(Bt + n)));
          const __m256 v_b =
              _mm256_fmadd_ps(a_b, _mm256_load_ps(s_b), _mm256_mul_ps(dx, _mm256_broadcast_ss(Bt + n + 1)));
          _mm256_store_ps(s_a, v_a);
          _mm256_store_ps(s_b, v_b);
          acc0 = _mm256_fmadd_ps(v_a, _mm256_broadcast_ss(Ct + n), acc0);
          acc1 = _mm256_fmadd_ps(v_b, _mm256_broadcast_ss(Ct + n + 1), acc1);
        }
        if (n < N) {
          float* s_a = st + n * kBlock + o;
          const __m256 a_a = exp2_neg256(_mm256_mul_ps(d, _mm256_load_ps(at_ + n * kBlock + o)));
          const __m256 v_a = _mm256_fmadd_ps(a_a, _mm256_load_ps(s_a), _mm256_mul_ps(dx, _mm256_broadcast_ss(Bt + n)));
          _mm256_store_ps(s_a, v_a);
          acc0 = _mm256_fmadd_ps(v_a, _mm256_broadcast_ss(Ct + n), acc0);
        }
        __m256 out = _mm256_fmadd_ps(_mm256_load_ps(Db + o), xv, _mm256_add_ps(acc0, acc1));
        if (zp) out = _mm256_mul_ps(out, silu256(_mm256_load_ps(zb + o)));
        _mm256_store_ps(yb + o, out);
      }
      std::memcpy(yp + t * E + e0, yb, row_bytes);
    }
    for (int64_t i = 0; i < ne; ++i) {
      for (int64_t n = 0; n < N; ++n) s0[i * N + n] = st[n * kBlock + i];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(rnnserve_cpu_scan, m) {
  m.def(
      "selective_scan_varlen(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? dt_bias, Tensor(a!) ssm_state, int[] cu_seqlens, Tensor slot_ids, bool dt_softplus) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnserve_cpu_scan, CPU, m) { m.impl("selective_scan_varlen", &selective_scan_varlen); }
