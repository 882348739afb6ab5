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

namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------- math

// exp(x) for 8 floats: Cephes' range reduction x = n ln2 + r, a degree-5 polynomial for e^r and 2^n
// through the exponent bits (relative error ~2e-7). Inputs below -87.3 give 0, never a denormal.
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  return _mm256_andnot_ps(below, y);
}

// log(x) for 8 floats x > 0 (Cephes: mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial).
inline __m256 log256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256i xi = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127));
  x = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  __m256 ef = _mm256_add_ps(_mm256_cvtepi32_ps(e), one);  // x = m * 2^ef with m in [0.5, 1)
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  ef = _mm256_sub_ps(ef, _mm256_and_ps(one, small));
  x = _mm256_add_ps(_mm256_sub_ps(x, one), _mm256_and_ps(x, small));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.1514610310E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.1676998740E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.2420140846E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.4249322787E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.6668057665E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(2.0000714765E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-2.4999993993E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(3.3333331174E-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  x = _mm256_add_ps(x, y);
  return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), x);
}

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)); torch returns x itself above its threshold 20.
inline __m256 softplus256(__m256 x) {
  const __m256 absx = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 sp = _mm256_add_ps(
      _mm256_max_ps(x, _mm256_setzero_ps()),
      log256(_mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), absx)))));
  return _mm256_blendv_ps(sp, x, _mm256_cmp_ps(x, _mm256_set1_ps(20.0f), _CMP_GT_OQ));
}

inline __m256 silu256(__m256 x) {
  const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Scalar forms for tails (widths not a multiple of 8).
inline float silu1(float x) { return x / (1.0f + std::exp(-x)); }
inline float softplus1(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// In-place silu over n floats.
void silu_inplace(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, silu256(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = silu1(x[i]);
}

// Denormals flushed (FTZ + DAZ) for the scope of a loop body, then the caller's mode restored: a
// decaying state would otherwise spend most of its time in microcode assists.
struct FlushDenormals {
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
};

// ---------------------------------------------------------------------------------------------- threads

// The step's work is cut into items (a few weight panels, a block of channels) that threads take from
// a shared counter. The threads are this file's own: the caller plus at::get_num_threads() - 1 workers
// that spin briefly between jobs and then sleep. The caller takes items too and waits only for items
// another thread has taken, never for a thread to show up: on a shared, oversubscribed machine a
// descheduled worker costs the step at most the item it holds, where an OpenMP region (or a barrier)
// waits for every thread of the team to be scheduled, several times per layer.
class ItemPool {
 public:
  // Runs fn(i) for i in [0, n), fn(i) on any of the threads; returns when all n have run.
  template <class F>
  void run(int64_t n, const F& fn) {
    const int64_t want = std::min<int64_t>(at::get_num_threads(), n) - 1;
    bool idle = false;
    // A job already running (a nested call, or another thread's step or packing) runs this one serially.
    if (want <= 0 || !busy_.compare_exchange_strong(idle, true, std::memory_order_acquire)) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    ensure_workers(want);
    call_ = [](const void* f, int64_t i) { (*static_cast<const F*>(f))(i); };
    fn_ = &fn;
    n_ = n;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32);  // publishes call_, fn_, n_ with the new job (seq_cst: ordered before the load below)
    if (sleeping_.load() > 0) state_.notify_all();
    int64_t mine = 0;
    for (int64_t i; (i = claim(gen)) >= 0; ++mine) fn(i);
    done_.fetch_add(mine, std::memory_order_acq_rel);
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();  // the worker holding the last item was descheduled
      }
    }
    busy_.store(false, std::memory_order_release);
  }

 private:
  // The next item of job gen, or -1 when that job has none left (or is over).
  int64_t claim(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    while ((s >> 32) == gen && static_cast<int64_t>(s & 0xffffffffu) < n_) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) return static_cast<int64_t>(s & 0xffffffffu);
    }
    return -1;
  }

  void ensure_workers(int64_t want) {
    while (static_cast<int64_t>(workers_.size()) < want) {
      workers_.emplace_back([this] { work(); });
      workers_.back().detach();  // lives as long as the process (a static pool)
    }
  }

  void work() {
    uint64_t seen = state_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      for (int spins = 0; (s >> 32) == seen; ++spins) {  // spin ~0.1 ms, then sleep until a new job
        if (spins < 4000) {
          _mm_pause();
        } else {
          sleeping_.fetch_add(1);  // seq_cst: a job published after this is seen by wait() or notified
          state_.wait(s);
          sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        }
        s = state_.load(std::memory_order_acquire);
      }
      seen = s >> 32;
      int64_t mine = 0;
      // n_, fn_ and call_ stay fixed until done_ reaches n_, which needs every claimed item to finish.
      for (int64_t i; (i = claim(seen)) >= 0; ++mine) call_(fn_, i);
      if (mine) done_.fetch_add(mine, std::memory_order_acq_rel);
    }
  }

  std::atomic<uint64_t> state_{0};  // job generation << 32 | next item
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  void (*call_)(const void*, int64_t) = nullptr;
  const void* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<bool> busy_{false};
  std::vector<std::thread> workers_;
};

ItemPool& item_pool() {
  static ItemPool* pool = new ItemPool();  // never destroyed: its detached workers outlive static destructors
  return *pool;
}

template <class F>
void parallel_items(int64_t n, const F& fn) {
  item_pool().run(n, fn);
}

// fn(t0, t1) over [0, n) in chunks of grain, through parallel_items.
template <class F>
void parallel_ranges(int64_t n, int64_t grain, const F& fn) {
  parallel_items((n + grain - 1) / grain, [&](int64_t c) { fn(c * grain, std::min(n, (c + 1) * grain)); });
}

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

// ---------------------------------------------------------------------------------------- packed GEMM

// The fused decoder packs every weight once (pack_weight below) into panels of 16 output columns laid
// out along K: P [ceil(N/16), K, 16] with P[q, k, j] = W[k, 16q + j] (zero past N). One panel is one
// contiguous, 64-byte aligned stream of K * 64 bytes, so a thread walking its panels reads DRAM in
// order whatever the matrix's shape, and a register tile (rows x 16 columns) reads each weight once per
// group of rows.
constexpr int64_t kPanel = 16;

// int8 panels (--quantization int8): [ceil(N/16), K + 4, 16] int8, rows 0..K-1 the weights as int8
// (W[k, 16q + j] = q[k, j] * scale[j], one scale per output channel, as Int8Linear quantizes), then
// 4 rows = 64 bytes holding the panel's 16 fp32 scales. Activations stay fp32: each k's 16 int8 are
// widened to fp32 once (vpmovsxbd + vcvtdq2ps) and used for every row of the group, and the scales are
// applied to the sums, so the result is the fp32 product with the dequantized weights; a quarter of the
// fp32 bytes are read. The kernels below take either panel type: load8 reads 8 weights as fp32 and
// finish8 applies the int8 panel's scales (nothing for fp32).
inline __m256 load8(const float* p) { return _mm256_load_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
template <class T>
inline __m256 finish8(__m256 sum, const T* p, int64_t K, int64_t j) {
  if constexpr (std::is_same_v<T, int8_t>) {
    return _mm256_mul_ps(sum, _mm256_loadu_ps(reinterpret_cast<const float*>(p + K * kPanel) + j));
  } else {
    return sum;
  }
}

// One row: out[0..16) = x[0..K) · P (one panel). Two k per iteration into four accumulators (two FMA
// chains per column half), so the loop runs at the load rate, not the FMA latency.
template <class T>
inline void panel_row1(const float* x, const T* p, int64_t K, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
    const T* pk = p + k * kPanel;
    a0 = _mm256_fmadd_ps(x0, load8(pk), a0);
    a1 = _mm256_fmadd_ps(x0, load8(pk + 8), a1);
    a2 = _mm256_fmadd_ps(x1, load8(pk + 16), a2);
    a3 = _mm256_fmadd_ps(x1, load8(pk + 24), a3);
  }
  if (k < K) {
    const __m256 x0 = _mm256_broadcast_ss(x + k);
    a0 = _mm256_fmadd_ps(x0, load8(p + k * kPanel), a0);
    a1 = _mm256_fmadd_ps(x0, load8(p + k * kPanel + 8), a1);
  }
  _mm256_store_ps(out, finish8(_mm256_add_ps(a0, a2), p, K, 0));
  _mm256_store_ps(out + 8, finish8(_mm256_add_ps(a1, a3), p, K, 8));
}

// MR rows (MR <= 5) x 16 columns: 2 * MR accumulators in registers, the panel's two vectors per k read
// once for all MR rows. out [MR, 16]. Five rows, not six: with 12 accumulators + 3 the compiler spilled
// one accumulator to the stack (a store-forwarding chain through memory that halved the speed).
#define RNNSERVE_FMA_ROW(i)                                         \
  if (MR > i) {                                                     \
    const __m256 xv = _mm256_broadcast_ss(x + i * ldx + k);         \
    c0##i = _mm256_fmadd_ps(xv, w0, c0##i);                         \
    c1##i = _mm256_fmadd_ps(xv, w1, c1##i);                         \
  }
#define RNNSERVE_STORE_ROW(i)                                              \
  if (MR > i) {                                                            \
    _mm256_store_ps(out + i * kPanel, finish8(c0##i, p, K, 0));            \
    _mm256_store_ps(out + i * kPanel + 8, finish8(c1##i, p, K, 8));        \
  }
template <int MR, class T>
inline void panel_rows(const float* x, int64_t ldx, const T* p, int64_t K, float* out) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c04 = c00;
  __m256 c10 = c00, c11 = c00, c12 = c00, c13 = c00, c14 = c00;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = load8(p + k * kPanel), w1 = load8(p + k * kPanel + 8);
    RNNSERVE_FMA_ROW(0)
    RNNSERVE_FMA_ROW(1)
    RNNSERVE_FMA_ROW(2)
    RNNSERVE_FMA_ROW(3)
    RNNSERVE_FMA_ROW(4)
  }
  RNNSERVE_STORE_ROW(0)
  RNNSERVE_STORE_ROW(1)
  RNNSERVE_STORE_ROW(2)
  RNNSERVE_STORE_ROW(3)
  RNNSERVE_STORE_ROW(4)
}
#undef RNNSERVE_FMA_ROW
#undef RNNSERVE_STORE_ROW

// C[M, N] = X[M, K] · W (+ bias[N]) (+ C when accumulate), W packed [ceil(N/16), K, 16] (float) or
// [ceil(N/16), K + 4, 16] (int8 with scales). The threads take panels (a few at a time for one row,
// whose panels are quick) from a shared counter; each panel is read from memory once and stays in L2
// while every group of rows (up to 5, the groups as even as can be: 8 rows = 4 + 4) multiplies it.
template <class T>
void gemm_packed(const float* x, int64_t ldx, const T* p, const float* bias, float* c, int64_t ldc, int64_t M,
                 int64_t K, int64_t N, bool accumulate) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  const int64_t NP = (N + kPanel - 1) / kPanel, per = M == 1 ? 4 : 1, groups = (M + 4) / 5;
  const int64_t panel_size = (kInt8 ? K + 4 : K) * kPanel;
  parallel_items((NP + per - 1) / per, [&](int64_t item) {
    alignas(64) float tile[5 * kPanel];
    for (int64_t q = item * per; q < std::min(NP, (item + 1) * per); ++q) {
      const T* pq = p + q * panel_size;
      const int64_t n0 = q * kPanel, nn = std::min(kPanel, N - n0);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m0 = M * g / groups, mr = M * (g + 1) / groups - m0;
        const float* xm = x + m0 * ldx;
        switch (mr) {
          case 1: panel_row1(xm, pq, K, tile); break;
          case 2: panel_rows<2>(xm, ldx, pq, K, tile); break;
          case 3: panel_rows<3>(xm, ldx, pq, K, tile); break;
          case 4: panel_rows<4>(xm, ldx, pq, K, tile); break;
          default: panel_rows<5>(xm, ldx, pq, K, tile); break;
        }
        for (int64_t i = 0; i < mr; ++i) {
          float* cr = c + (m0 + i) * ldc + n0;
          const float* t = tile + i * kPanel;
          for (int64_t j = 0; j < nn; ++j) cr[j] = (accumulate ? cr[j] : 0.0f) + (bias ? bias[n0 + j] : 0.0f) + t[j];
        }
      }
    }
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

void check_f32(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, " must be a float32 CPU tensor");
}

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

// W [K, N] (kn) or [N, K] (not kn: a row-major linear weight or a tied embedding) packed into panels
// [ceil(N/16), K, 16] for gemm_packed, columns past N zero.
Tensor pack_weight(const Tensor& w, bool kn) {
  check_f32(w, "w");
  TORCH_CHECK(w.dim() == 2, "pack_weight: a 2-D weight");
  const int64_t K = kn ? w.size(0) : w.size(1), N = kn ? w.size(1) : w.size(0), NP = (N + kPanel - 1) / kPanel;
  Tensor p = at::zeros({NP, K, kPanel}, w.options());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p.data_ptr<float>()) % 32 == 0, "pack_weight: unaligned allocation");
  const float* src = w.data_ptr<float>();
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  float* pp = p.data_ptr<float>();
  parallel_ranges(NP, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      float* panel = pp + q * K * kPanel;
      const int64_t nn = std::min(kPanel, N - q * kPanel);
      if (kn) {  // row k of the panel = 16 consecutive columns of W's row k (unit stride when contiguous)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < nn; ++j) panel[k * kPanel + j] = src[k * s0 + (q * kPanel + j) * s1];
      } else {  // column j of the panel = W's row 16q + j, read in order
        for (int64_t j = 0; j < nn; ++j) {
          const float* row = src + (q * kPanel + j) * s0;
          for (int64_t k = 0; k < K; ++k) panel[k * kPanel + j] = row[k * s1];
        }
      }
    }
  });
  return p;
}

// An int8 weight q [N, K] (row-major, as Int8Linear keeps it) with per-output-channel scales [N] packed
// into int8 panels [ceil(N/16), K + 4, 16] (the weights, then each panel's 16 scales as 64 bytes; zero
// past N).
Tensor pack_weight_int8(const Tensor& q, const Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "pack_weight_int8: q must be a 2-D int8 tensor");
  check_f32(scale, "scale");
  const int64_t N = q.size(0), K = q.size(1), NP = (N + kPanel - 1) / kPanel;
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, "pack_weight_int8: one scale per output channel");
  Tensor p = at::zeros({NP, K + 4, kPanel}, q.options());
  const int8_t* src = q.data_ptr<int8_t>();
  const int64_t s0 = q.stride(0), s1 = q.stride(1);
  const float* sc = scale.contiguous().data_ptr<float>();
  int8_t* pp = p.data_ptr<int8_t>();
  parallel_ranges(NP, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t b = q0; b < q1; ++b) {
      const int64_t nn = std::min(kPanel, N - b * kPanel);
      int8_t* panel = pp + b * (K + 4) * kPanel;
      for (int64_t j = 0; j < nn; ++j) {
        const int8_t* row = src + (b * kPanel + j) * s0;
        for (int64_t k = 0; k < K; ++k) panel[k * kPanel + j] = row[k * s1];
      }
      float scales[kPanel] = {};
      for (int64_t j = 0; j < nn; ++j) scales[j] = sc[b * kPanel + j];
      std::memcpy(pp + (b * (K + 4) + K) * kPanel, scales, sizeof(scales));
    }
  });
  return p;
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
    // y = C S + D x. S [N, P] is read and written once.
    float* ss = ssm_state[l].data_ptr<float>();
    const int64_t ss_stride = ssm_state[l].stride(0);
    const float* Ap = A[l].data_ptr<float>();
    const float* Dv = Dp[l].data_ptr<float>();
    const float* dbias = dt_bias[l].data_ptr<float>();
    parallel_ranges(B * H, 2, [&](int64_t t0, int64_t t1) {
      FlushDenormals ftz;
      alignas(32) float dx[512];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, hh = t % H, g = hh / rep;
        const float d = std::min(hi, std::max(lo, softplus1(pp[b * W + E + C + hh] + dbias[hh])));
        const float decay = std::exp(d * Ap[hh]);
        const float* x = xp + b * C + hh * P;
        const float* Bv = xp + b * C + E + g * N;
        const float* Cv = Bv + G * N;
        float* S = ss + slot[b] * ss_stride + hh * N * P;
        float* yo = yp + b * E + hh * P;
        for (int64_t p0 = 0; p0 < P; p0 += 512) {
          const int64_t pe = std::min(P, p0 + 512);
          for (int64_t p = p0; p < pe; ++p) dx[p - p0] = d * x[p];
          for (int64_t q = p0; q < pe; q += 32) {  // 32 columns of S at a time: 4 accumulators
            const int64_t qn = std::min<int64_t>(32, pe - q) / 8;
            __m256 acc[4], dxv[4];
            for (int j = 0; j < qn; ++j) {
              acc[j] = _mm256_setzero_ps();
              dxv[j] = _mm256_load_ps(dx + (q - p0) + 8 * j);
            }
            const __m256 dec = _mm256_set1_ps(decay);
            for (int64_t n = 0; n < N; ++n) {
              const __m256 bn = _mm256_set1_ps(Bv[n]), cn = _mm256_set1_ps(Cv[n]);
              float* row = S + n * P + q;
              for (int j = 0; j < qn; ++j) {
                const __m256 sv = _mm256_fmadd_ps(dec, _mm256_loadu_ps(row + 8 * j), _mm256_mul_ps(bn, dxv[j]));
                _mm256_storeu_ps(row + 8 * j, sv);
                acc[j] = _mm256_fmadd_ps(cn, sv, acc[j]);
              }
            }
            for (int j = 0; j < qn; ++j) _mm256_storeu_ps(yo + q + 8 * j, acc[j]);
          }
        }
        for (int64_t p = 0; p < P; ++p) yo[p] += Dv[hh] * x[p];
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
