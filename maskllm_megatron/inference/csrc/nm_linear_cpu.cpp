// CPU kernels of the compressed N:M linear (maskllm_megatron/inference/linear.py):
//   maskllm_nm_linear:     y[t, r] = sum_g sum_{j<N} values[r, g*N + j] * x[t, g*M + pos(p[r, g], j)] (+ bias[r])
//                          for few tokens (decode): every weight is read once for all tokens;
//   maskllm_nm_gemm:       the same for many tokens (prefill): a sparse GEMM that multiplies only the kept
//                          weights, tokens in vector lanes (below, "Sparse GEMM");
//   maskllm_nm_gemm_pairs: bf16 2:4 with AVX512-BF16 (maskllm_nm_has_pairs): a sparse GEMM on the kept
//                          pairs, output rows in vector lanes (below, "bf16 2:4 sparse GEMM");
//   maskllm_nm_decompress: rows [r0, r1) of the zero-filled dense weight, for the tiled dense matmul of
//                          many tokens (prefill).
//
// Layout: values [rows, G*N] (fp32 or bf16), the kept weights of each group of M inputs in position
// order; idx [rows, idx_stride] uint8: each group's pattern index (masks/patterns.py order), two per
// byte (low nibble first) where C(M, N) <= 16, else one per byte. x [T, in] and y [T, rows] are in the
// values' dtype; sums are fp32 (bf16 x converted once, y rounded to nearest even once, at the end).
//
// The rows are cut into chunks of 16 inputs (16/M groups, 16N/M values). A chunk's keep bits (1 where a
// position is kept) come from a 256-entry table per index byte; with them the chunk's values become a
// dense 16-wide fp32 row piece in registers (AVX-512: one masked expand; AVX2: two 8-lane permutes of
// a load whose tail lanes are zero), multiplied into the matching 16 inputs of every token. The inputs
// past the last whole chunk (fewer than 16) take a scalar loop. Blocks of rows go to the calling thread
// and to helper threads that are running (Pool, below: no OpenMP barrier); tokens go in blocks of 8, each
// row's accumulators in registers.
//
// Built twice by maskllm_megatron/inference/kernel.py: -mavx2 -mfma, and -mavx512f/bw/vl/dq (the pair GEMM
// adds avx512bf16 by a target pragma and runs only where cpuid reports it).
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kParallelWeights = 1 << 16;  // smaller layers run on the calling thread (a region costs more)

struct Layout {  // one layer's shape and tables; the same fields as kernel.py's ctypes Layout
  int64_t in, idx_stride;
  int32_t n, m, gpb;          // N, M, groups per index byte (2: nibbles, 1: bytes)
  int32_t bf16;               // values, bias, x and y are bf16 (else fp32)
  const uint16_t* byte_keep;  // [256]: the keep bits of the gpb groups of one index byte
  const uint8_t* pos;         // [C, N]: the positions each pattern keeps
  int64_t groups() const { return in / m; }
  int64_t chunks() const { return in / 16; }
  int vc() const { return 16 * n / m; }            // values per chunk
  int bpc() const { return 16 / (gpb * m); }       // index bytes per chunk
  int pattern(const uint8_t* row_idx, int64_t g) const {
    return gpb == 2 ? (row_idx[g >> 1] >> ((g & 1) * 4)) & 15 : row_idx[g];
  }
  uint32_t keep16(const uint8_t* p) const {  // keep bits of the 16 inputs of one chunk
    const int bits = gpb * m;
    uint32_t k = 0;
    for (int i = 0; i < bpc(); ++i) k |= uint32_t(byte_keep[p[i]]) << (i * bits);
    return k;
  }
};

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

template <typename V> inline float load_value(const V* p);
template <> inline float load_value<float>(const float* p) { return *p; }
template <> inline float load_value<uint16_t>(const uint16_t* p) { return bf16_to_float(*p); }
template <typename V> inline void store_value(V* p, float v);
template <> inline void store_value<float>(float* p, float v) { *p = v; }
template <> inline void store_value<uint16_t>(uint16_t* p, float v) { *p = float_to_bf16(v); }

#if defined(__AVX512F__)
constexpr const char* kIsa = "AVX512";

// One vector of fp32 lanes, for the sparse GEMM (below).
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }

// The 16 dense fp32 weights of one chunk: its vc values expanded into the kept lanes, zeros elsewhere.
template <bool k24>
inline __m512 dense_chunk(const float* v, uint32_t keep, int vc) {
  if (k24) return _mm512_maskz_expand_ps(__mmask16(keep), _mm512_castps256_ps512(_mm256_loadu_ps(v)));
  return _mm512_maskz_expandloadu_ps(__mmask16(keep), v);
}
template <bool k24>
inline __m512 dense_chunk(const uint16_t* v, uint32_t keep, int vc) {
  __m256i raw = k24 ? _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)))
                    : _mm256_maskz_loadu_epi16(__mmask16((1u << vc) - 1), v);
  __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_maskz_expand_ps(__mmask16(keep), f);
}

// y[t, r] for tokens t < T (T <= 8) and one row: two independent accumulators per token.
template <int T, bool k24, typename V>
inline void row_dot(const V* vals, const uint8_t* row_idx, const float* x, int64_t in, const Layout& L,
                    float* acc_out) {
  __m512 a0[T], a1[T];
  for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm512_setzero_ps();
  const int64_t nc = L.chunks();
  const int vc = L.vc(), bpc = L.bpc();
  int64_t c = 0;
  for (; c + 1 < nc; c += 2) {
    const uint8_t* ip = row_idx + c * bpc;
    const __m512 w0 = dense_chunk<k24>(vals + c * vc, k24 ? L.byte_keep[ip[0]] | (L.byte_keep[ip[1]] << 8) : L.keep16(ip), vc);
    const __m512 w1 = dense_chunk<k24>(vals + (c + 1) * vc, k24 ? L.byte_keep[ip[2]] | (L.byte_keep[ip[3]] << 8) : L.keep16(ip + bpc), vc);
    for (int t = 0; t < T; ++t) {
      a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * in + c * 16), a0[t]);
      a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * in + c * 16 + 16), a1[t]);
    }
  }
  if (c < nc) {
    const uint8_t* ip = row_idx + c * bpc;
    const __m512 w0 = dense_chunk<k24>(vals + c * vc, k24 ? L.byte_keep[ip[0]] | (L.byte_keep[ip[1]] << 8) : L.keep16(ip), vc);
    for (int t = 0; t < T; ++t) a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * in + c * 16), a0[t]);
  }
  for (int t = 0; t < T; ++t) acc_out[t] = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
}

template <bool k24, typename V>
inline void decompress_row(const V* vals, const uint8_t* row_idx, V* dense, const Layout& L) {
  const int64_t nc = L.chunks();
  const int vc = L.vc(), bpc = L.bpc();
  for (int64_t c = 0; c < nc; ++c) {
    const __m512 w = dense_chunk<k24>(vals + c * vc, L.keep16(row_idx + c * bpc), vc);
    if constexpr (sizeof(V) == 4) {
      _mm512_storeu_ps(reinterpret_cast<float*>(dense) + c * 16, w);
    } else {  // exact: bf16 -> fp32 -> bf16 keeps the bits (the low halves are zero)
      __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dense + c * 16), h);
    }
  }
}

#else  // AVX2
constexpr const char* kIsa = "AVX2";

using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }

struct PermTable {  // for each 8-bit keep mask: lane j <- value rank(j), or lane 7 (zero) where not kept
  alignas(32) int32_t idx[256][8];
  PermTable() {
    for (int k = 0; k < 256; ++k)
      for (int j = 0, r = 0; j < 8; ++j) idx[k][j] = (k >> j) & 1 ? r++ : 7;
  }
};
const PermTable kPerm;

// 8 dense fp32 weights from vh (< 8) values and an 8-bit keep mask; lanes >= vh of the load are zero.
template <bool k24>
inline __m256 dense_half(const float* v, uint32_t keep8, int vh) {
  __m256 raw;
  if (k24) {
    raw = _mm256_castps128_ps256(_mm_loadu_ps(v));
    raw = _mm256_insertf128_ps(raw, _mm_setzero_ps(), 1);
  } else {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    raw = _mm256_maskload_ps(v, _mm256_cmpgt_epi32(_mm256_set1_epi32(vh), lanes));
  }
  return _mm256_permutevar8x32_ps(raw, _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[keep8])));
}
template <bool k24>
inline __m256 dense_half(const uint16_t* v, uint32_t keep8, int vh) {
  __m128i raw;
  if (k24) {
    raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v));
  } else {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, v, vh * sizeof(uint16_t));
    raw = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  return _mm256_permutevar8x32_ps(f, _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[keep8])));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int T, bool k24, typename V>
inline void row_dot(const V* vals, const uint8_t* row_idx, const float* x, int64_t in, const Layout& L,
                    float* acc_out) {
  __m256 a0[T], a1[T];
  for (int t = 0; t < T; ++t) a0[t] = a1[t] = _mm256_setzero_ps();
  const int64_t nc = L.chunks();
  const int vc = L.vc(), vh = vc / 2, bpc = L.bpc();
  for (int64_t c = 0; c < nc; ++c) {
    const uint32_t keep = k24 ? L.byte_keep[row_idx[2 * c]] | (L.byte_keep[row_idx[2 * c + 1]] << 8)
                              : L.keep16(row_idx + c * bpc);
    const __m256 w0 = dense_half<k24>(vals + c * vc, keep & 0xff, vh);
    const __m256 w1 = dense_half<k24>(vals + c * vc + vh, keep >> 8, vh);
    for (int t = 0; t < T; ++t) {
      a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * in + c * 16), a0[t]);
      a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + t * in + c * 16 + 8), a1[t]);
    }
  }
  for (int t = 0; t < T; ++t) acc_out[t] = hsum(_mm256_add_ps(a0[t], a1[t]));
}

template <bool k24, typename V>
inline void decompress_row(const V* vals, const uint8_t* row_idx, V* dense, const Layout& L) {
  const int64_t nc = L.chunks();
  const int vc = L.vc(), vh = vc / 2, bpc = L.bpc();
  for (int64_t c = 0; c < nc; ++c) {
    const uint32_t keep = L.keep16(row_idx + c * bpc);
    const __m256 w0 = dense_half<k24>(vals + c * vc, keep & 0xff, vh);
    const __m256 w1 = dense_half<k24>(vals + c * vc + vh, keep >> 8, vh);
    if constexpr (sizeof(V) == 4) {
      _mm256_storeu_ps(reinterpret_cast<float*>(dense) + c * 16, w0);
      _mm256_storeu_ps(reinterpret_cast<float*>(dense) + c * 16 + 8, w1);
    } else {
      const __m256i shuf = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                            2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
      for (int h = 0; h < 2; ++h) {
        __m256i s = _mm256_shuffle_epi8(_mm256_castps_si256(h ? w1 : w0), shuf);
        __m128i packed = _mm_unpacklo_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dense + c * 16 + h * 8), packed);
      }
    }
  }
}
#endif

// ---- Helper threads that the caller never waits for unless they took work --------------------------------
// An OpenMP region ends at a barrier: where other processes hold the cores, a worker that the OS has not
// scheduled yet holds every layer's call for a scheduler slice (milliseconds, measured on a shared 2-core
// VM: 6 ms for a 0.2 ms layer). Here the caller publishes a job of row blocks and takes blocks itself;
// helpers that are running take blocks too (an atomic counter), and the caller waits only for blocks a
// helper has taken. Helpers spin briefly after a job, then sleep on a condition variable. A job lives on
// the caller's stack: a helper announces the job it reads in its hazard slot, and the caller waits for
// the slots to clear before returning. Correctness never depends on a helper (a forked child has none).
struct Job {
  void (*run)(const void* ctx, int64_t block);
  const void* ctx;
  int64_t blocks;
  int max_helpers;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> helpers{0};
};

class Pool {
 public:
  static Pool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { instance_ = nullptr; }); });
    Pool* p = instance_;
    if (p == nullptr) p = instance_ = new Pool();  // leaked: detached helpers may outlive static destructors
    return *p;
  }

  void run(void (*fn)(const void*, int64_t), const void* ctx, int64_t blocks, int threads) {
    if (threads <= 1 || blocks <= 1) {
      for (int64_t b = 0; b < blocks; ++b) fn(ctx, b);
      return;
    }
    ensure(threads - 1);
    Job job;
    job.run = fn;
    job.ctx = ctx;
    job.blocks = blocks;
    job.max_helpers = threads - 1;
    current_.store(&job);
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    for (int64_t b; (b = job.next.fetch_add(1)) < blocks;) {
      fn(ctx, b);
      job.done.fetch_add(1);
    }
    while (job.done.load() < blocks) _mm_pause();  // only blocks a running helper took
    current_.store(nullptr);
    for (auto& h : hazard_)
      while (h.load() == &job) _mm_pause();
  }

 private:
  static inline Pool* instance_ = nullptr;
  std::mutex mu_, grow_;
  std::condition_variable cv_;
  std::atomic<Job*> current_{nullptr};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::vector<std::atomic<Job*>> hazard_ = std::vector<std::atomic<Job*>>(64);
  std::atomic<int> started_{0};

  void ensure(int helpers) {
    helpers = std::min(helpers, int(hazard_.size()));
    if (started_.load() >= helpers) return;
    std::lock_guard<std::mutex> lock(grow_);
    while (started_.load() < helpers) {
      const int slot = started_.load();
      std::thread([this, slot] { loop(slot); }).detach();
      started_.fetch_add(1);
    }
  }

  void loop(int slot) {
    uint64_t seen = 0;
    for (;;) {
      Job* job = nullptr;
      for (int spin = 0; spin < 20000; ++spin) {  // ~50-100 us: back-to-back layers find it awake
        if (generation_.load() != seen && (job = current_.load()) != nullptr) break;
        _mm_pause();
      }
      if (job == nullptr) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        cv_.wait(lock, [&] { return generation_.load() != seen && current_.load() != nullptr; });
        sleepers_.fetch_sub(1);
        continue;
      }
      seen = generation_.load();
      hazard_[slot].store(job);
      if (current_.load() == job && job->helpers.fetch_add(1) < job->max_helpers) {
        for (int64_t b; (b = job->next.fetch_add(1)) < job->blocks;) {
          job->run(job->ctx, b);
          job->done.fetch_add(1);
        }
      }
      hazard_[slot].store(nullptr);
    }
  }
};

// The inputs past the last whole chunk, scalar.
template <int T, typename V>
inline void row_tail(const V* vals, const uint8_t* row_idx, const float* x, int64_t in, const Layout& L,
                     float* acc) {
  const int n = L.n;
  for (int64_t g = L.chunks() * 16 / L.m; g < L.groups(); ++g) {
    const uint8_t* kept = L.pos + L.pattern(row_idx, g) * n;
    for (int j = 0; j < n; ++j) {
      const float w = load_value(vals + g * n + j);
      const int64_t col = g * L.m + kept[j];
      for (int t = 0; t < T; ++t) acc[t] += w * x[t * in + col];
    }
  }
}

template <int T, bool k24, typename V>
void linear_rows(const float* x, const V* vals, const uint8_t* idx, const V* bias, V* y, int64_t rows,
                 int64_t r0, int64_t r1, const Layout& L) {
  const int64_t kn = L.groups() * L.n;
  for (int64_t r = r0; r < r1; ++r) {
    const V* v = vals + r * kn;
    const uint8_t* ip = idx + r * L.idx_stride;
    float acc[T];
    row_dot<T, k24>(v, ip, x, L.in, L, acc);
    row_tail<T>(v, ip, x, L.in, L, acc);
    const float b = bias ? load_value(bias + r) : 0.f;
    for (int t = 0; t < T; ++t) store_value(y + t * rows + r, acc[t] + b);
  }
}

template <bool k24, typename V>
void linear_dispatch(const V* x_in, const V* vals, const uint8_t* idx, const V* bias, V* y, int64_t tokens,
                     int64_t rows, const Layout& L, int threads) {
  std::vector<float> x_buf;
  const float* x = reinterpret_cast<const float*>(x_in);
  if (sizeof(V) == 2) {  // bf16 inputs: once to fp32
    x_buf.resize(size_t(tokens * L.in));
    for (int64_t i = 0; i < tokens * L.in; ++i) x_buf[i] = load_value(x_in + i);
    x = x_buf.data();
  }
  // Row blocks (8 per thread) taken by the caller and any running helper; blocks of 8 tokens, within one
  // each row's weights are read once.
  const int64_t block = std::max<int64_t>(8, rows / (int64_t(threads) * 8));
  const int64_t blocks = (rows + block - 1) / block;
  for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
    struct Ctx {
      const float* x; const V* vals; const uint8_t* idx; const V* bias; V* y;
      int64_t rows, block; int tb; const Layout* L;
    } ctx{x + t0 * L.in, vals, idx, bias, y + t0 * rows, rows, block, int(std::min<int64_t>(tokens - t0, 8)), &L};
    auto run = [](const void* p, int64_t b) {
      const Ctx& c = *static_cast<const Ctx*>(p);
      const int64_t r0 = b * c.block, r1 = std::min(c.rows, r0 + c.block);
      switch (c.tb) {
        case 1: linear_rows<1, k24>(c.x, c.vals, c.idx, c.bias, c.y, c.rows, r0, r1, *c.L); break;
        case 2: linear_rows<2, k24>(c.x, c.vals, c.idx, c.bias, c.y, c.rows, r0, r1, *c.L); break;
        case 3: linear_rows<3, k24>(c.x, c.vals, c.idx, c.bias, c.y, c.rows, r0, r1, *c.L); break;
        case 4: linear_rows<4, k24>(c.x, c.vals, c.idx, c.bias, c.y, c.rows, r0, r1, *c.L); break;
        case 5: linear_rows<5, k24>(c.x, c.vals, c.idx, c.bias, c.y, c.rows, r0, r1, *c.L); break;
        case 6: linear_rows<6, k24>(c.x, c.vals, c.idx, c.bias, c.y, c.rows, r0, r1, *c.L); break;
        case 7: linear_rows<7, k24>(c.x, c.vals, c.idx, c.bias, c.y, c.rows, r0, r1, *c.L); break;
        default: linear_rows<8, k24>(c.x, c.vals, c.idx, c.bias, c.y, c.rows, r0, r1, *c.L); break;
      }
    };
    Pool::get().run(run, &ctx, blocks, rows * L.in >= kParallelWeights ? threads : 1);
  }
}

// ---- Sparse GEMM for many tokens (prefill): only the kept weights are multiplied --------------------------
// x is packed once per call into panels of kPanel tokens (4 vectors: 64 tokens on AVX-512, 32 on AVX2),
// transposed: panel[block][k][t], fp32, the last block's missing tokens zero. Rows go in blocks to the
// caller and the helper threads. A row block walks the inputs kKBlock at a time: it decodes the block's kept
// weights (fp32) and their inputs' offsets in the panel once, then for every token block and pair of rows
// broadcasts each kept weight and FMAs it into its row's 4 accumulators with the panel's row of its input
// (kKBlock x kPanel fp32 = 32 or 16 KiB: near L1 for all rows of the block). The partial sums live in a
// [rows, tokens] fp32 buffer; y gets them (plus bias) rounded once at the end. The inputs go in spans whose
// panel rows for all tokens fit in L2 (kPanelSpanBytes), one pass over the row blocks per span. Each output
// is a sum in input order, fp32.
constexpr int kVecs = 4;
constexpr int kPanel = kVecs * kLanes;
constexpr int64_t kKBlock = 128;  // a multiple of M (2, 4, 8)
constexpr int64_t kPanelSpanBytes = 512 << 10;

// acc[r][0, kPanel) (+)= sum_i w[r][i] * panel[off[r][i] + (0, kPanel)] for R rows (stride: between rows).
template <int R>
inline void gemm_rows(const float* w, const int32_t* off, int64_t stride, int64_t kn, const float* panel, float* acc,
                      int64_t acc_stride, bool first) {
  Vec a[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) a[r][v] = first ? vzero() : vload(acc + r * acc_stride + v * kLanes);
  for (int64_t i = 0; i < kn; ++i) {
    for (int r = 0; r < R; ++r) {
      const Vec b = vbroadcast(w + r * stride + i);
      const float* xp = panel + off[r * stride + i];
      for (int v = 0; v < kVecs; ++v) a[r][v] = vfma(b, vload(xp + v * kLanes), a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) vstore(acc + r * acc_stride + v * kLanes, a[r][v]);
}

template <typename V>
void gemm_dispatch(const V* x, const V* vals, const uint8_t* idx, const V* bias, V* y, int64_t tokens, int64_t rows,
                   const Layout& L, int threads) {
  if (tokens == 0) return;
  const int64_t in = L.in, blocks_t = (tokens + kPanel - 1) / kPanel, padded = blocks_t * kPanel;
  // 64-byte aligned: a vector load that crosses a cache line costs two
  std::unique_ptr<float[], decltype(&std::free)> panel_buf(
      static_cast<float*>(std::aligned_alloc(64, size_t(padded * in * 4 + 63) / 64 * 64)), &std::free);
  float* panel = panel_buf.get();
  const bool parallel = rows * in >= kParallelWeights;
  {  // pack: one job per token block and 256 inputs
    struct Ctx { const V* x; float* panel; int64_t tokens, in, kchunks; } ctx{x, panel, tokens, in, (in + 255) / 256};
    auto run = [](const void* p, int64_t b) {
      const Ctx& c = *static_cast<const Ctx*>(p);
      const int64_t tb = b / c.kchunks, k0 = (b % c.kchunks) * 256, k1 = std::min(c.in, k0 + 256);
      float* dst = c.panel + tb * c.in * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t t = tb * kPanel + j;
        if (t < c.tokens) {
          for (int64_t k = k0; k < k1; ++k) dst[k * kPanel + j] = load_value(c.x + t * c.in + k);
        } else {
          for (int64_t k = k0; k < k1; ++k) dst[k * kPanel + j] = 0.f;
        }
      }
    };
    Pool::get().run(run, &ctx, blocks_t * ctx.kchunks, parallel ? threads : 1);
  }
  // byte_pos[b]: the input positions (within the byte's gpb * M inputs) of the gpb * N weights of index byte b
  std::vector<uint8_t> byte_pos(256 * 16);
  const int64_t patterns = L.gpb == 2 ? 16 : 256;
  for (int b = 0; b < 256; ++b)
    for (int i = 0; i < L.gpb; ++i) {
      const int p = L.gpb == 2 ? (b >> (4 * i)) & 15 : b;
      for (int j = 0; j < L.n; ++j) byte_pos[b * 16 + i * L.n + j] = uint8_t(i * L.m + (p < patterns ? L.pos[p * L.n + j] : 0));
    }
  struct Ctx {
    const float* panel; const V* vals; const uint8_t* idx; const V* bias; V* y; float* acc;
    int64_t tokens, rows, padded, block, k_begin, k_end; const Layout* L; const uint8_t* byte_pos;
  } ctx{panel, vals, idx, bias, y, nullptr, tokens, rows, padded,
        std::max<int64_t>(8, std::min<int64_t>(64, rows / (int64_t(threads) * 4)) & ~int64_t(1)), 0, 0, &L,
        byte_pos.data()};
  std::unique_ptr<float[], decltype(&std::free)> acc(  // [rows, padded]: the partial sums
      static_cast<float*>(std::aligned_alloc(64, size_t(rows * padded * 4 + 63) / 64 * 64)), &std::free);
  ctx.acc = acc.get();
  auto run = [](const void* p, int64_t b) {
    const Ctx& c = *static_cast<const Ctx*>(p);
    const Layout& L = *c.L;
    const int64_t r0 = b * c.block, nr = std::min(c.rows, r0 + c.block) - r0;
    const int64_t n = L.n, m = L.m, kn_row = L.groups() * n, kb_max = kKBlock / m * n;
    thread_local std::vector<float> w;
    thread_local std::vector<int32_t> off;
    w.resize(size_t(nr * kb_max));
    off.resize(size_t(nr * kb_max));
    for (int64_t k0 = c.k_begin; k0 < c.k_end; k0 += kKBlock) {
      const int64_t g0 = k0 / m, g1 = std::min(c.k_end, k0 + kKBlock) / m, kn = (g1 - g0) * n;
      for (int64_t r = 0; r < nr; ++r) {  // this block's kept weights (fp32) and their inputs' panel offsets
        const V* v = c.vals + (r0 + r) * kn_row + g0 * n;
        const uint8_t* ip = c.idx + (r0 + r) * L.idx_stride;
        float* wr = w.data() + r * kb_max;
        for (int64_t i = 0; i < kn; ++i) wr[i] = load_value(v + i);
        int32_t* o = off.data() + r * kb_max;
        int64_t g = g0;  // k0 is a multiple of gpb * M: whole index bytes, then a last half byte
        for (; g + L.gpb <= g1; g += L.gpb) {
          const uint8_t* bp = c.byte_pos + ip[g / L.gpb] * 16;
          const int32_t base = int32_t(g * m - k0);
          for (int64_t j = 0; j < L.gpb * n; ++j) *o++ = (base + bp[j]) * kPanel;
        }
        for (; g < g1; ++g) {
          const uint8_t* kept = L.pos + L.pattern(ip, g) * n;
          for (int64_t j = 0; j < n; ++j) *o++ = int32_t((g * m + kept[j] - k0) * kPanel);
        }
      }
      for (int64_t tb = 0; tb < c.padded / kPanel; ++tb) {
        const float* pk = c.panel + tb * L.in * kPanel + k0 * kPanel;
        float* a = c.acc + r0 * c.padded + tb * kPanel;
        int64_t r = 0;
        for (; r + 1 < nr; r += 2)
          gemm_rows<2>(w.data() + r * kb_max, off.data() + r * kb_max, kb_max, kn, pk, a + r * c.padded, c.padded,
                       k0 == 0);
        if (r < nr)
          gemm_rows<1>(w.data() + r * kb_max, off.data() + r * kb_max, kb_max, kn, pk, a + r * c.padded, c.padded,
                       k0 == 0);
      }
    }
    if (c.k_end == L.in)
      for (int64_t t = 0; t < c.tokens; ++t)
        for (int64_t r = r0; r < r0 + nr; ++r)
          store_value(c.y + t * c.rows + r, c.acc[r * c.padded + t] + (c.bias ? load_value(c.bias + r) : 0.f));
  };
  // Inputs in spans whose panel rows (all tokens) take at most kPanelSpanBytes (L2), whole K-blocks.
  const int64_t span = std::max<int64_t>(1, kPanelSpanBytes / (padded * 4 * kKBlock)) * kKBlock;
  const int64_t blocks = (rows + ctx.block - 1) / ctx.block;
  for (ctx.k_begin = 0; ctx.k_begin < in; ctx.k_begin += span) {
    ctx.k_end = std::min(in, ctx.k_begin + span);
    Pool::get().run(run, &ctx, blocks, parallel ? threads : 1);
  }
}

#if defined(__AVX512F__)
// ---- bf16 2:4 sparse GEMM on the kept pairs (AVX512-BF16, checked at run time) ---------------------------
// A 2:4 group keeps two weights (w_a, w_b), adjacent in `values`: one 32-bit bf16 pair, and vdpbf16ps adds
// w_a x_a + w_b x_b to an fp32 lane. Lanes are 16 output rows: per group, a vector of the rows' kept pairs
// and one of vpshufb controls that pick each row's (x_a, x_b) from the group's 4 inputs of one token,
// broadcast to every lane. Each token then costs one 8-byte broadcast, one vpshufb and one vdpbf16ps per
// 16 rows and group, where the dense product takes two vdpbf16ps. x is packed once per call into
// [token block][group][16 tokens] x 8 bytes (a token's 4 inputs of a group); the row vectors are built per
// job (up to kPairRows rows) and span of kPairGroups groups (L2), with 16x16 transposes. The 16 tokens' sums stay in registers across the
// groups of a span (between spans in an fp32 buffer); y is rounded once. The instruction treats bf16
// denormals as zero.
#pragma GCC push_options
#pragma GCC target("avx512bf16")
constexpr int kPairTokens = 16;         // accumulators: one vector of 16 rows per token
constexpr int64_t kPairRows = 256;      // rows per job at most (16 vectors of 16)
constexpr int64_t kPairGroups = 256;    // groups per span: a job's row vectors take at most 16 x 256 x 128 B (L2)
constexpr int kPairPatterns = 6;        // C(4, 2)
struct alignas(64) Lanes { uint32_t v[16]; };  // one vector of 16 rows

// sums[t] (+)= for each group g < ng: dpbf16(shuffle(broadcast(xq[g][t]), ctrl[g]), w[g]), t < 16.
inline void pair_tokens(const uint64_t* xq, const Lanes* ctrl, const Lanes* w, int64_t ng, __m512* sums) {
  __m512 a[kPairTokens];
  for (int t = 0; t < kPairTokens; ++t) a[t] = sums[t];
  for (int64_t g = 0; g < ng; ++g) {
    const __m512i c = _mm512_load_si512(ctrl[g].v);
    const __m512bh wv = (__m512bh)_mm512_load_si512(w[g].v);
    const uint64_t* xg = xq + g * kPairTokens;
    for (int t = 0; t < kPairTokens; ++t)
      a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)_mm512_shuffle_epi8(_mm512_set1_epi64(int64_t(xg[t])), c), wv);
  }
  for (int t = 0; t < kPairTokens; ++t) sums[t] = a[t];
}

// Rows r[0..16) of 16 32-bit lanes become columns: r[j] holds lane j of every input row.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // per 128-bit lane L of r[i + k]: column 4L + k of rows i..i+3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512i s0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44), s1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44), s3 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xEE);
    t[k] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    t[8 + k] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

void gemm_pairs_dispatch(const uint16_t* x, const uint16_t* vals, const uint8_t* idx, const uint16_t* bias,
                         uint16_t* y, int64_t tokens, int64_t rows, const Layout& L, int threads) {
  if (tokens == 0) return;
  const int64_t groups = L.groups(), blocks_t = (tokens + kPairTokens - 1) / kPairTokens;
  const bool parallel = rows * L.in >= kParallelWeights;
  std::unique_ptr<uint64_t[], decltype(&std::free)> xq_buf(  // [token block][group][16 tokens]
      static_cast<uint64_t*>(std::aligned_alloc(64, size_t(blocks_t * groups * kPairTokens * 8 + 63) / 64 * 64)),
      &std::free);
  {  // pack: one job per token block
    struct Ctx { const uint64_t* x; uint64_t* xq; int64_t tokens, groups; } ctx{
        reinterpret_cast<const uint64_t*>(x), xq_buf.get(), tokens, groups};
    auto run = [](const void* p, int64_t tb) {
      const Ctx& c = *static_cast<const Ctx*>(p);
      uint64_t* dst = c.xq + tb * c.groups * kPairTokens;
      for (int64_t j = 0; j < kPairTokens; ++j) {
        const int64_t t = tb * kPairTokens + j;
        const uint64_t* xt = c.x + t * c.groups;
        if (t < c.tokens) {
          for (int64_t g = 0; g < c.groups; ++g) dst[g * kPairTokens + j] = xt[g];
        } else {
          for (int64_t g = 0; g < c.groups; ++g) dst[g * kPairTokens + j] = 0;
        }
      }
    };
    Pool::get().run(run, &ctx, blocks_t, parallel ? threads : 1);
  }
  const bool spans = groups > kPairGroups;
  std::unique_ptr<float[], decltype(&std::free)> part(  // [tokens padded][rows]: sums between spans
      spans ? static_cast<float*>(std::aligned_alloc(64, size_t(blocks_t * kPairTokens * rows * 4 + 63) / 64 * 64))
            : nullptr, &std::free);
  uint32_t ctrl_of[kPairPatterns];  // per pattern: the byte indices of (x_a, x_b) in a broadcast 8-byte token
  for (int p = 0; p < kPairPatterns; ++p) {
    const uint32_t a = L.pos[2 * p], b = L.pos[2 * p + 1];
    ctrl_of[p] = (2 * a) | (2 * a + 1) << 8 | (2 * b) << 16 | (2 * b + 1) << 24;
  }
  struct Ctx {
    const uint64_t* xq; const uint32_t* w; const uint8_t* idx; const uint16_t* bias; uint16_t* y; float* part;
    int64_t tokens, rows, groups, blocks_t, block; const Layout* L; const uint32_t* ctrl_of; __m512i ctrl_table;
  } ctx{xq_buf.get(), reinterpret_cast<const uint32_t*>(vals), idx, bias, y, part.get(), tokens, rows, groups,
        blocks_t, std::clamp<int64_t>((rows / (int64_t(threads) * 4) + 15) / 16 * 16, 16, kPairRows), &L, ctrl_of, _mm512_maskz_loadu_epi32(__mmask16((1u << kPairPatterns) - 1), ctrl_of)};
  auto run = [](const void* p, int64_t b) {
    const Ctx& c = *static_cast<const Ctx*>(p);
    const Layout& L = *c.L;
    const int64_t r0 = b * c.block, nr = std::min(c.rows, r0 + c.block) - r0, nv = (nr + 15) / 16;
    thread_local std::vector<Lanes> ctrl, wv;  // [vector][group]: the row vectors of one span
    ctrl.resize(size_t(kPairRows / 16 * kPairGroups));
    wv.resize(size_t(kPairRows / 16 * kPairGroups));
    for (int64_t g0 = 0; g0 < c.groups; g0 += kPairGroups) {
      const int64_t ng = std::min(c.groups, g0 + kPairGroups) - g0;
      const bool first = g0 == 0, last = g0 + ng == c.groups;
      for (int64_t v = 0; v < nv; ++v) {  // this span's row vectors; rows past the end get zero weights
        Lanes* cv = ctrl.data() + v * kPairGroups;
        Lanes* wvv = wv.data() + v * kPairGroups;
        const int64_t rv = r0 + v * 16, nrow = std::min<int64_t>(16, c.rows - rv);
        int64_t g = 0;
        for (; g + 16 <= ng; g += 16) {  // 16 groups of 16 rows: the rows' pairs and controls, transposed
          __m512i W[16], C[16];
          for (int i = 0; i < 16; ++i) {
            if (i >= nrow) {
              W[i] = C[i] = _mm512_setzero_si512();
              continue;
            }
            W[i] = _mm512_loadu_si512(c.w + (rv + i) * c.groups + g0 + g);
            uint64_t q;  // 16 pattern nibbles, low first; valid indices are < 6
            std::memcpy(&q, c.idx + (rv + i) * L.idx_stride + (g0 + g) / 2, 8);
            const __m128i b = _mm_cvtsi64_si128(int64_t(q)), m4 = _mm_set1_epi8(15);
            const __m128i pat = _mm_min_epu8(_mm_unpacklo_epi8(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4)),
                                             _mm_set1_epi8(kPairPatterns - 1));
            C[i] = _mm512_permutexvar_epi32(_mm512_cvtepu8_epi32(pat), c.ctrl_table);
          }
          transpose16(W);
          transpose16(C);
          for (int j = 0; j < 16; ++j) {
            _mm512_store_si512(wvv[g + j].v, W[j]);
            _mm512_store_si512(cv[g + j].v, C[j]);
          }
        }
        for (; g < ng; ++g)
          for (int i = 0; i < 16; ++i) {
            const int64_t r = rv + i;
            const bool in = i < nrow;
            cv[g].v[i] = c.ctrl_of[in ? std::min(L.pattern(c.idx + r * L.idx_stride, g0 + g), kPairPatterns - 1) : 0];
            wvv[g].v[i] = in ? c.w[r * c.groups + g0 + g] : 0u;
          }
      }
      for (int64_t tb = 0; tb < c.blocks_t; ++tb) {
        const uint64_t* xq = c.xq + (tb * c.groups + g0) * kPairTokens;
        const int64_t nt = std::min<int64_t>(kPairTokens, c.tokens - tb * kPairTokens);
        for (int64_t v = 0; v < nv; ++v) {
          const int64_t rv = r0 + v * 16;
          const __mmask16 rmask = __mmask16((1u << std::min<int64_t>(16, c.rows - rv)) - 1);
          __m512 sums[kPairTokens];
          for (int t = 0; t < kPairTokens; ++t)
            sums[t] = first || t >= nt ? _mm512_setzero_ps()
                                       : _mm512_maskz_loadu_ps(rmask, c.part + (tb * kPairTokens + t) * c.rows + rv);
          pair_tokens(xq, ctrl.data() + v * kPairGroups, wv.data() + v * kPairGroups, ng, sums);
          if (!last) {
            for (int t = 0; t < nt; ++t) _mm512_mask_storeu_ps(c.part + (tb * kPairTokens + t) * c.rows + rv, rmask, sums[t]);
            continue;
          }
          __m512 bv = _mm512_setzero_ps();
          if (c.bias)
            bv = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(rmask, c.bias + rv)), 16));
          for (int t = 0; t < nt; ++t)
            _mm256_mask_storeu_epi16(c.y + (tb * kPairTokens + t) * c.rows + rv, rmask,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(sums[t], bv)));
        }
      }
    }
  };
  Pool::get().run(run, &ctx, (rows + ctx.block - 1) / ctx.block, parallel ? threads : 1);
}
#pragma GCC pop_options
#endif

template <bool k24, typename V>
void decompress_dispatch(const V* vals, const uint8_t* idx, V* dense, int64_t r0, int64_t r1, const Layout& L,
                         int threads) {
  struct Ctx {
    const V* vals; const uint8_t* idx; V* dense; int64_t r0, r1, block; const Layout* L;
  } ctx{vals, idx, dense, r0, r1, std::max<int64_t>(4, (r1 - r0) / (int64_t(threads) * 8)), &L};
  auto run = [](const void* p, int64_t b) {
    const Ctx& c = *static_cast<const Ctx*>(p);
    const Layout& L = *c.L;
    const int64_t kn = L.groups() * L.n;
    for (int64_t r = c.r0 + b * c.block; r < std::min(c.r1, c.r0 + (b + 1) * c.block); ++r) {
      const V* v = c.vals + r * kn;
      const uint8_t* ip = c.idx + r * L.idx_stride;
      V* d = c.dense + (r - c.r0) * L.in;
      decompress_row<k24>(v, ip, d, L);
      for (int64_t col = L.chunks() * 16; col < L.in; ++col) d[col] = V(0);
      for (int64_t g = L.chunks() * 16 / L.m; g < L.groups(); ++g) {
        const uint8_t* kept = L.pos + L.pattern(ip, g) * L.n;
        for (int j = 0; j < L.n; ++j) d[g * L.m + kept[j]] = v[g * L.n + j];
      }
    }
  };
  const int64_t blocks = (r1 - r0 + ctx.block - 1) / ctx.block;
  Pool::get().run(run, &ctx, blocks, (r1 - r0) * L.in >= kParallelWeights ? threads : 1);
}

}  // namespace

extern "C" const char* maskllm_nm_isa() { return kIsa; }
extern "C" int64_t maskllm_nm_layout_size() { return sizeof(Layout); }

// y [tokens, rows] = x [tokens, in] @ W^T (+ bias), all in the layout's dtype (fp32 or bf16); bias may be null.
extern "C" void maskllm_nm_linear(const Layout* L, const void* x, const void* vals, const uint8_t* idx,
                                  const void* bias, void* y, int64_t tokens, int64_t rows, int threads) {
  const bool k24 = L->n == 2 && L->m == 4;
  if (L->bf16) {
    auto xx = static_cast<const uint16_t*>(x);
    auto v = static_cast<const uint16_t*>(vals);
    auto b = static_cast<const uint16_t*>(bias);
    auto o = static_cast<uint16_t*>(y);
    k24 ? linear_dispatch<true>(xx, v, idx, b, o, tokens, rows, *L, threads)
        : linear_dispatch<false>(xx, v, idx, b, o, tokens, rows, *L, threads);
  } else {
    auto xx = static_cast<const float*>(x);
    auto v = static_cast<const float*>(vals);
    auto b = static_cast<const float*>(bias);
    auto o = static_cast<float*>(y);
    k24 ? linear_dispatch<true>(xx, v, idx, b, o, tokens, rows, *L, threads)
        : linear_dispatch<false>(xx, v, idx, b, o, tokens, rows, *L, threads);
  }
}

// The same product by the sparse GEMM (many tokens): only the kept weights are multiplied.
extern "C" void maskllm_nm_gemm(const Layout* L, const void* x, const void* vals, const uint8_t* idx,
                                const void* bias, void* y, int64_t tokens, int64_t rows, int threads) {
  if (L->bf16)
    gemm_dispatch(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(vals), idx,
                  static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), tokens, rows, *L, threads);
  else
    gemm_dispatch(static_cast<const float*>(x), static_cast<const float*>(vals), idx, static_cast<const float*>(bias),
                  static_cast<float*>(y), tokens, rows, *L, threads);
}

// Whether maskllm_nm_gemm_pairs runs here: the AVX-512 build on a CPU with AVX512-BF16.
extern "C" int maskllm_nm_has_pairs() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
  return 0;
#endif
}

// The same product, bf16 2:4 only, by the sparse GEMM on the kept pairs (maskllm_nm_has_pairs() must be 1).
extern "C" void maskllm_nm_gemm_pairs(const Layout* L, const void* x, const void* vals, const uint8_t* idx,
                                      const void* bias, void* y, int64_t tokens, int64_t rows, int threads) {
#if defined(__AVX512F__)
  if (L->bf16 && L->n == 2 && L->m == 4 && maskllm_nm_has_pairs())
    gemm_pairs_dispatch(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(vals), idx,
                        static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), tokens, rows, *L, threads);
  else
#endif
    std::abort();
}

// Rows [r0, r1) of the zero-filled dense weight into dense [r1 - r0, in], in the layout's dtype.
extern "C" void maskllm_nm_decompress(const Layout* L, const void* vals, const uint8_t* idx, void* dense, int64_t r0,
                                      int64_t r1, int threads) {
  const bool k24 = L->n == 2 && L->m == 4;
  if (L->bf16) {
    auto v = static_cast<const uint16_t*>(vals);
    auto d = static_cast<uint16_t*>(dense);
    k24 ? decompress_dispatch<true>(v, idx, d, r0, r1, *L, threads)
        : decompress_dispatch<false>(v, idx, d, r0, r1, *L, threads);
  } else {
    auto v = static_cast<const float*>(vals);
    auto d = static_cast<float*>(dense);
    k24 ? decompress_dispatch<true>(v, idx, d, r0, r1, *L, threads)
        : decompress_dispatch<false>(v, idx, d, r0, r1, *L, threads);
  }
}
