// Shared by the fused CPU decode extensions (cpu_decode.cpp, rwkv_retnet.cpp and any later one): AVX2
// math (exp, log, softplus, silu over 8 floats), the item thread pool, the packed 16-column weight
// panels (fp32 and int8 with per-channel scales), their register-tiled kernels (AVX2, and AVX-512 where
// the CPU has it) and gemm_packed.
//
// Everything here has internal linkage (one unnamed namespace): each extension is its own shared
// object, built and loaded on its own, so each gets its own copy of the kernels and its own thread pool
// (only one model steps at a time; an idle pool's workers sleep). The loader (__init__.py) hashes this
// file into each extension's build flags, so editing it rebuilds every extension that includes it.
//
// API kept stable for the extensions that include it: kPanel, pack_weight(w, kn), pack_weight_int8(q,
// scale), gemm_packed<T>(...), gemm_panels(x, p, bias, out, accumulate), parallel_items /
// parallel_ranges, FlushDenormals, exp256 / log256 / softplus256 / silu256 / hsum256, silu1 / softplus1.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
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

// The data of an optional 1-d float32 tensor of n elements (a bias, a norm weight), or nullptr when absent.
inline const float* vec_ptr(const c10::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->dim() == 1 && t->size(0) == n &&
                  t->is_contiguous(),
              name, " must be a contiguous float32 CPU tensor of ", n, " elements");
  return t->data_ptr<float>();
}

// ---------------------------------------------------------------------------------------------- threads

// The step's work is cut into items (a few weight panels, a block of channels) that threads take from
// a shared counter. The threads are the extension's own: the caller plus at::get_num_threads() - 1 workers
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
    // Close the last job's generation before its n_, fn_ and call_ change: a worker descheduled inside
    // claim() for that job must not claim from it against the new n_ (it would run an item past the old
    // job's end, or an item of this job twice, and add to done_ so that run() returned while an item
    // still ran on this frame's fn: a segfault under a burst of requests on an oversubscribed machine).
    // Its claim's compare-exchange now fails; the closed generation is odd and has no items to claim.
    const uint64_t closed = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(closed << 32 | kClosed);
    call_ = [](const void* f, int64_t i) { (*static_cast<const F*>(f))(i); };
    fn_ = &fn;
    n_.store(n, std::memory_order_release);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = closed + 1;
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
    while ((s >> 32) == gen && static_cast<int64_t>(s & 0xffffffffu) < n_.load(std::memory_order_acquire)) {
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
  // n_ is read by claim() while it races with run() replacing it; the acquire pairs with run()'s release,
  // so a claim that sees the next job's n_ also sees its closed generation and fails its exchange.
  std::atomic<int64_t> n_{0};
  static constexpr uint64_t kClosed = 0xffffffffu;  // next item of a closed generation: past any n_
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

// ------------------------------------------------------------------------------- AVX-512 tiles
// Where the CPU has AVX-512 (F/BW/VL, and the OS saves zmm state), gemm_packed runs these instead: a
// panel's 16 columns are one zmm, so a tile of up to kMaxRows512 rows x 16 columns holds its
// accumulators in 16 of the 32 zmm registers and each weight vector is loaded once for all its rows, x
// broadcast from memory into the FMA. 8 rows are one group (the panel is read once, straight from
// DRAM, where the AVX2 tiles' 4 + 4 read it twice), 32 rows two groups of 16. Only these functions are
// compiled for AVX-512 (target attribute), so the extensions build with the same flags everywhere and a
// CPU without it never executes them. RNNSERVE_CPU_DECODE_ISA=avx2 in the environment forces the AVX2
// tiles (read once per process; the tests run both).
#define RNNSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
constexpr int kMaxRows512 = 16;
// Software prefetch distance (bytes ahead in the panel's stream, into L1): the hardware prefetcher alone
// kept too few lines in flight while a tile computes on a panel streaming from DRAM. 8 rows of the
// 768 x 50280 head, one thread, CPU time on the shared machine: AVX2 tiles 19.5 ms, these tiles without
// prefetch 13.3 ms, 1 KiB ahead 11.1, 4 KiB 10.9; in another run AVX2 15.3, 4 KiB 14.0, 8 KiB 12.4.
// Past a panel's end it fetches the next panel's start (the next in memory, often another thread's).
constexpr int64_t kPrefetchBytes = 8192;

inline bool use_avx512() {
  static const bool on = [] {
    const char* isa = std::getenv("RNNSERVE_CPU_DECODE_ISA");
    if (isa != nullptr && std::strcmp(isa, "avx2") == 0) return false;
    __builtin_cpu_init();  // libgcc also checks XCR0: the OS saves the zmm state
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return on;
}

// exp(x) for 16 floats: exp256's operations (Cephes' reduction and polynomial), so the same results;
// inputs below -87.3 give exactly 0, never a denormal; above 88.4 the largest finite value's
// neighbourhood (e^88.4). Used by the prefill scans (selective_scan, linear_recurrence).
RNNSERVE_AVX512 inline __m512 exp512(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.3762626647949f);
  const __m512 lo = _mm512_set1_ps(-87.3365478515625f);
  const __mmask16 below = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, z, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  __m512i n = _mm512_cvttps_epi32(fx);
  n = _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(n));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~below), y);
}

// 16 weights of panel row k as fp32: one aligned-or-not load (fp32), or 16 int8 sign-extended straight
// from memory into a zmm (vpmovsxbd) and converted (no VNNI: activations stay fp32).
RNNSERVE_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
RNNSERVE_AVX512 inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
template <class T>
RNNSERVE_AVX512 inline __m512 finish16(__m512 sum, const T* p, int64_t K) {
  if constexpr (std::is_same_v<T, int8_t>) {
    return _mm512_mul_ps(sum, _mm512_loadu_ps(reinterpret_cast<const float*>(p + K * kPanel)));
  } else {
    return sum;
  }
}

// One row, one panel: four k per iteration into four accumulators (FMA latency 4 at one zmm FMA per
// cycle), the loop at the load rate.
template <class T>
RNNSERVE_AVX512 __attribute__((noinline)) void panel_row1_512(const float* x, const T* p, int64_t K,
                                                              float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    const T* pk = p + k * kPanel;
    // int8 (a line holds 4 k): the prefetch pays at one row too; fp32 one-row panels gained nothing.
    if constexpr (sizeof(T) == 1) _mm_prefetch(reinterpret_cast<const char*>(pk) + kPrefetchBytes, _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), load16(pk), a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 1]), load16(pk + kPanel), a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 2]), load16(pk + 2 * kPanel), a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 3]), load16(pk + 3 * kPanel), a3);
  }
  for (; k < K; ++k) a0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), load16(p + k * kPanel), a0);
  _mm512_store_ps(out, finish16(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), p, K));
}

// MR rows x one panel: MR accumulators, the panel's vector per k loaded once for the MR rows. out [MR, 16].
// x is the rows as they are (row i at x + i * ldx) or, kPacked, the group's rows interleaved ([K, MR]:
// x[k * MR + i]), so that all MR broadcasts address one pointer; with a pointer per row, 16 rows ran out
// of general registers and the loop moved pointers in and out of xmm registers (M = 32, one thread: the
// 768 x 50280 head 30.5 -> 25.4 ms, 768 x 3072 2.03 -> 1.77 ms packed).
// Not inlined: inside the item loop's lambda the loop had fewer free general registers and moved row
// pointers through xmm registers even at 8 rows (~10% slower at M = 8).
template <int MR, bool kPacked, class T>
RNNSERVE_AVX512 __attribute__((noinline)) void panel_rows_512(const float* x, int64_t ldx, const T* p, int64_t K,
                                                              float* out) {
  __m512 c[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(p + k * kPanel) + kPrefetchBytes, _MM_HINT_T0);
    const __m512 w = load16(p + k * kPanel);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float xi = kPacked ? x[k * MR + i] : x[i * ldx + k];
      c[i] = _mm512_fmadd_ps(_mm512_set1_ps(xi), w, c[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) _mm512_store_ps(out + i * kPanel, finish16(c[i], p, K));
}

// One group of mr rows (1..kMaxRows512) x one panel, through the tile of that many rows. out [mr, 16].
template <bool kPacked, class T>
RNNSERVE_AVX512 inline void panel_group_512(const float* x, int64_t ldx, int64_t mr, const T* p, int64_t K,
                                            float* out) {
  switch (mr) {
    case 1: panel_row1_512(x, p, K, out); break;
    case 2: panel_rows_512<2, kPacked>(x, ldx, p, K, out); break;
    case 3: panel_rows_512<3, kPacked>(x, ldx, p, K, out); break;
    case 4: panel_rows_512<4, kPacked>(x, ldx, p, K, out); break;
    case 5: panel_rows_512<5, kPacked>(x, ldx, p, K, out); break;
    case 6: panel_rows_512<6, kPacked>(x, ldx, p, K, out); break;
    case 7: panel_rows_512<7, kPacked>(x, ldx, p, K, out); break;
    case 8: panel_rows_512<8, kPacked>(x, ldx, p, K, out); break;
    case 9: panel_rows_512<9, kPacked>(x, ldx, p, K, out); break;
    case 10: panel_rows_512<10, kPacked>(x, ldx, p, K, out); break;
    case 11: panel_rows_512<11, kPacked>(x, ldx, p, K, out); break;
    case 12: panel_rows_512<12, kPacked>(x, ldx, p, K, out); break;
    case 13: panel_rows_512<13, kPacked>(x, ldx, p, K, out); break;
    case 14: panel_rows_512<14, kPacked>(x, ldx, p, K, out); break;
    case 15: panel_rows_512<15, kPacked>(x, ldx, p, K, out); break;
    default: panel_rows_512<16, kPacked>(x, ldx, p, K, out); break;
  }
}

// For drivers with their own panel loop (rwkv_retnet.cpp's proj_panels): the most rows one tile takes on
// this CPU (AVX-512: kMaxRows512, AVX2: 5), and mr of them (1..tile_rows(), rows at x + i * ldx) x one
// panel over K into tile [mr, 16] through the tile gemm_packed would run.
inline int64_t tile_rows() { return use_avx512() ? kMaxRows512 : 5; }
template <class T>
void panel_tile_rows(const float* x, int64_t ldx, const T* p, int64_t K, int64_t mr, float* tile) {
  if (use_avx512()) {
    panel_group_512<false>(x, ldx, mr, p, K, tile);
    return;
  }
  switch (mr) {
    case 1: panel_row1(x, p, K, tile); break;
    case 2: panel_rows<2>(x, ldx, p, K, tile); break;
    case 3: panel_rows<3>(x, ldx, p, K, tile); break;
    case 4: panel_rows<4>(x, ldx, p, K, tile); break;
    default: panel_rows<5>(x, ldx, p, K, tile); break;
  }
}

// Panels [q0, q1) of gemm_packed's product through the AVX-512 tiles (groups of up to kMaxRows512 rows),
// x's groups interleaved in xt (as gemm_packed packs them) or, xt null, read from x.
template <class T>
RNNSERVE_AVX512 void gemm_panels_512(const float* x, int64_t ldx, const float* xt, const T* p, int64_t panel_size,
                                     const float* bias, float* c, int64_t ldc, int64_t M, int64_t K, int64_t N,
                                     bool accumulate, int64_t q0, int64_t q1) {
  alignas(64) float tile[kMaxRows512 * kPanel];
  const int64_t groups = (M + kMaxRows512 - 1) / kMaxRows512;
  for (int64_t q = q0; q < q1; ++q) {
    const T* pq = p + q * panel_size;
    const int64_t n0 = q * kPanel, nn = std::min(kPanel, N - n0);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t m0 = M * g / groups, mr = M * (g + 1) / groups - m0;
      if (xt != nullptr) {
        panel_group_512<true>(xt + m0 * K, mr, mr, pq, K, tile);
      } else {
        panel_group_512<false>(x + m0 * ldx, ldx, mr, pq, K, tile);
      }
      for (int64_t i = 0; i < mr; ++i) {
        float* cr = c + (m0 + i) * ldc + n0;
        const float* t = tile + i * kPanel;
        for (int64_t j = 0; j < nn; ++j) cr[j] = (accumulate ? cr[j] : 0.0f) + (bias ? bias[n0 + j] : 0.0f) + t[j];
      }
    }
  }
}

// C[M, N] = X[M, K] · W (+ bias[N]) (+ C when accumulate), W packed [ceil(N/16), K, 16] (float) or
// [ceil(N/16), K + 4, 16] (int8 with scales). The threads take panels (a few at a time for one row,
// whose panels are quick) from a shared counter; each panel is read from memory once and stays in L2
// while every group of rows multiplies it (AVX2: up to 5 rows, the groups as even as can be, 8 rows =
// 4 + 4; AVX-512: up to 16 rows, above).
template <class T>
void gemm_packed(const float* x, int64_t ldx, const T* p, const float* bias, float* c, int64_t ldc, int64_t M,
                 int64_t K, int64_t N, bool accumulate) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  const int64_t NP = (N + kPanel - 1) / kPanel, per = M == 1 ? 4 : 1, groups = (M + 4) / 5;
  const int64_t panel_size = (kInt8 ? K + 4 : K) * kPanel;
  if (use_avx512()) {
    // Above 8 rows the groups' rows are interleaved once per call (group g's block at xt + m0 * K, [K, mr])
    // for every panel's tile to read; up to 8 rows their pointers fit in registers and x is read as is.
    thread_local std::vector<float> xbuf;  // the calling thread's; workers only read it during this job
    const float* xt = nullptr;
    if (M > 8) {
      const int64_t g512 = (M + kMaxRows512 - 1) / kMaxRows512;
      if (static_cast<int64_t>(xbuf.size()) < M * K) xbuf.resize(M * K);
      for (int64_t g = 0; g < g512; ++g) {
        const int64_t m0 = M * g / g512, mr = M * (g + 1) / g512 - m0;
        float* dst = xbuf.data() + m0 * K;
        for (int64_t i = 0; i < mr; ++i) {
          const float* src = x + (m0 + i) * ldx;
          for (int64_t k = 0; k < K; ++k) dst[k * mr + i] = src[k];
        }
      }
      xt = xbuf.data();
    }
    parallel_items((NP + per - 1) / per, [&](int64_t item) {
      gemm_panels_512(x, ldx, xt, p, panel_size, bias, c, ldc, M, K, N, accumulate, item * per,
                      std::min(NP, (item + 1) * per));
    });
    return;
  }
  parallel_items((NP + per - 1) / per, [&](int64_t item) {
    alignas(64) float tile[5 * kPanel];
    for (int64_t q = item * per; q < std::min(NP, (item + 1) * per); ++q) {
      const T* pq = p + q * panel_size;
      const int64_t n0 = q * kPanel, nn = std::min(kPanel, N - n0);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t m0 = M * g / groups, mr = M * (g + 1) / groups - m0;
        const float* xm = x + m0 * ldx;
        panel_tile_rows(xm, ldx, pq, K, mr, tile);
        for (int64_t i = 0; i < mr; ++i) {
          float* cr = c + (m0 + i) * ldc + n0;
          const float* t = tile + i * kPanel;
          for (int64_t j = 0; j < nn; ++j) cr[j] = (accumulate ? cr[j] : 0.0f) + (bias ? bias[n0 + j] : 0.0f) + t[j];
        }
      }
    }
  });
}

void check_f32(const Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, " must be a float32 CPU tensor");
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

// out (+)= x · W (+ bias[N]) for W packed by pack_weight (float [ceil(N/16), K, 16]) or pack_weight_int8
// (int8 [ceil(N/16), K + 4, 16]): x [M, K] and out [M, N] float32 with unit-stride rows that may lie
// apart (a narrowed buffer); bias null for none.
inline void gemm_panels(const Tensor& x, const Tensor& p, const float* bias, const Tensor& out, bool accumulate) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const bool int8 = p.scalar_type() == at::kChar;
  TORCH_CHECK(p.dim() == 3 && p.is_contiguous() && (int8 || p.scalar_type() == at::kFloat) &&
                  p.size(0) == (N + kPanel - 1) / kPanel && p.size(1) == (int8 ? K + 4 : K) && p.size(2) == kPanel,
              "packed weight ", p.sizes(), " does not fit x ", x.sizes(), " -> out ", out.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && out.size(0) == M &&
                  (x.stride(1) == 1 || K <= 1) && (out.stride(1) == 1 || N <= 1),
              "gemm_panels: float32 x [M, K] and out [M, N] with unit-stride rows");
  if (M == 0) return;
  float* c = out.data_ptr<float>();
  if (int8) {
    gemm_packed(x.data_ptr<float>(), x.stride(0), p.data_ptr<int8_t>(), bias, c, out.stride(0), M, K, N, accumulate);
  } else {
    gemm_packed(x.data_ptr<float>(), x.stride(0), p.data_ptr<float>(), bias, c, out.stride(0), M, K, N, accumulate);
  }
}

}  // namespace
