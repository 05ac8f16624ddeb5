// CPU kernels of the 2:4 masked weight, each ONE pass over the logits:
//   forward:  counter-based Gumbel noise, Gumbel-softmax over the 6 candidate patterns, pattern mixture
//             and the multiply into the weight (`_sample_forward` in maskllm_megatron/masks/sampling.py);
//   backward: the logits' gradient through W * mask, the regulariser folded in, and W's gradient when
//             the weight trains (`_sample_backward`).
//
// torch.compile fuses the same Python into four or five passes over memory on CPU, with the 6-wide
// softmax reduced in scalar code. Here L groups are processed per vector (ATen's Vectorized<float>: L = 8
// with AVX2, 16 with AVX-512, whichever CPU_CAPABILITY this is built for): lane i holds group g0+i, and
// the 6 pattern logits of a group sit in 6 vectors. Noise: the murmur3 fmix32 hash of rng.py, bit for
// bit; -log(-log(u)) with an inline Cephes-style logf (~1e-7 relative) and the softmax's exp with ATen's
// 20-ULP exp_u20 (a few ULP from the eager path, which tests bound). Every multiply-add that g++ may fuse is
// written as the fused or the unfused form explicitly, so that the bits do not hang on the compiler's choice
// (which differs between the full-block and tail instantiations, and with the code around them).
// Full L-group blocks are a separate instantiation (n known at compile time: unrolled staging loops and
// full-vector loads, ATen's counted int32 load always copying through memory; on AVX-512 the staging
// transposes run in registers), the row's tail the other.
// dtypes: the weight (with W * mask, grad_out and W's gradient) is fp32 or bf16, the logits too, each on
// its own. A bf16 model (megatron's: every parameter bf16) runs the same fp32 arithmetic on the exact
// widening of its inputs, so the noise and the probabilities are the fp32 kernel's bit for bit, and what it
// writes in the weight's dtype is rounded to nearest even as torch's .to(bfloat16) rounds; the
// probabilities, the hard mask and the logits' gradient are fp32, as `_sample_forward` / `_sample_backward`
// return them for bf16 inputs.
// Built on first use by maskllm_megatron/masks/cpu_kernel.py (g++ -O3 -fopenmp and torch's flags for the
// instruction set).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
using BF16 = c10::BFloat16;
using BVec = at::vec::Vectorized<BF16>;
constexpr int L = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
using FloatReg = __m512;  // the register a Vec wraps
#else
using FloatReg = __m256;
#endif

// fp32 -> bf16 rounded to nearest even, as torch's .to(bfloat16) (ATen's conversion): L bf16 in a
// half-width register. bf16 -> fp32 is exact (the bits, shifted).
inline auto to_bf16(Vec x) { return at::vec::cvtfp32_bf16(x); }

// x rounded to T and widened back (torch's `mask.to(weight.dtype)` before the multiply); the identity for fp32.
template <class T>
inline Vec round_to(Vec x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    FloatReg y;
    at::vec::cvtbf16_fp32(to_bf16(x), y);
    return y;
  }
}

// L elements of a tensor in the weight's layout as one float vector, and back; c <= L of them valid (lanes
// past c load as 0 and are not written).
inline Vec load(const float* p, int c) { return Vec::loadu(p, c); }
inline Vec load(const BF16* p, int c) {
  Vec v;
  if (c == L)
    at::vec::load_to_float(p, v);
  else
    v = std::get<0>(at::vec::convert_to_float<BF16>(BVec::loadu(p, c)));
  return v;
}
inline void store(float* p, Vec v, int c) { v.store(p, c); }
inline void store(BF16* p, Vec v, int c) {
  const auto bits = to_bf16(v);
  static_assert(sizeof(bits) == L * sizeof(BF16), "L bf16 values in the half-width register");
  std::memcpy(p, &bits, c * sizeof(BF16));
}

inline IVec mix32(IVec x) {  // murmur3 fmix32 on int32 lanes (logical shifts by masking)
  x = x ^ ((x >> IVec(16)) & IVec(0xFFFF));
  x = x * IVec(static_cast<int32_t>(0x85EBCA6Bu));
  x = x ^ ((x >> IVec(13)) & IVec(0x7FFFF));
  x = x * IVec(static_cast<int32_t>(0xC2B2AE35u));
  return x ^ ((x >> IVec(16)) & IVec(0xFFFF));
}

// Natural log of positive, finite, normal floats, inline: Cephes logf's range reduction and polynomial
// (relative error ~1e-7). No special cases (zero, negatives, subnormals, inf, NaN): the noise never
// meets them, u lies in [2^-24, 1 - 2^-24] and -log(u) in [5.9e-8, 16.7].
inline Vec log_positive(Vec x) {
  const IVec bits = at::vec::cast<int32_t>(x);
  const Vec m = at::vec::cast<float>((bits & IVec(0x7FFFFF)) | IVec(0x3F000000));  // mantissa in [0.5, 1)
  Vec e = at::vec::convert<float>(((bits >> IVec(23)) & IVec(0xFF)) - IVec(126));  // x = m * 2^e
  const Vec low = m < Vec(0.707106781186547524f);  // all-ones lanes where m < sqrt(1/2): use 2m, e - 1
  e = e - (low & Vec(1.f));
  const Vec t = (m - Vec(1.f)) + (low & m);       // in [sqrt(1/2) - 1, sqrt(2) - 1)
  const Vec z = t * t;
  Vec y(7.0376836292E-2f);
  y = at::vec::fmadd(y, t, Vec(-1.1514610310E-1f));
  y = at::vec::fmadd(y, t, Vec(1.1676998740E-1f));
  y = at::vec::fmadd(y, t, Vec(-1.2420140846E-1f));
  y = at::vec::fmadd(y, t, Vec(1.4249322787E-1f));
  y = at::vec::fmadd(y, t, Vec(-1.6668057665E-1f));
  y = at::vec::fmadd(y, t, Vec(2.0000714765E-1f));
  y = at::vec::fmadd(y, t, Vec(-2.4999993993E-1f));
  y = at::vec::fmadd(y, t, Vec(3.3333331174E-1f));
  y = y * t * z;
  y = at::vec::fmadd(e, Vec(-2.12194440E-4f), y);
  y = at::vec::fmadd(z, Vec(-0.5f), y);
  return at::vec::fmadd(e, Vec(0.693359375f), t + y);
}

inline Vec gumbel(IVec row_hash, IVec col_hash) {  // rng.gumbel_from_hashes
  IVec h = (mix32(row_hash ^ col_hash) >> IVec(9)) & IVec(0x7FFFFF);
  Vec u = (at::vec::convert<float>(h) + Vec(0.5f)) * Vec(1.0f / 8388608.0f);
  return log_positive(log_positive(u).neg()).neg();
}

// Which patterns keep each position and which positions each pattern keeps, from keep [C, M] (1 where
// pattern k keeps position j), so the inner loops read short index lists instead of testing every pair.
template <int C, int M>
struct KeepLists {
  int pats[M][C], n_pats[M] = {};  // patterns keeping position j
  int poss[C][M], n_poss[C] = {};  // positions kept by pattern k
  explicit KeepLists(const uint8_t* keep) {
    for (int k = 0; k < C; ++k)
      for (int j = 0; j < M; ++j)
        if (keep[k * M + j]) {
          pats[j][n_pats[j]++] = k;
          poss[k][n_poss[k]++] = j;
        }
  }
};

template <int R>
inline void zero(float (&a)[R][L]) {  // the lanes a tail block leaves unset are 0, not garbage
  std::fill(&a[0][0], &a[0][0] + R * L, 0.f);
}

#if defined(CPU_CAPABILITY_AVX512)
// A full block's transposes in registers (AVX-512; elsewhere, and in tail blocks, element by element):
// between R vectors of the group-major layout (16 groups x R values, R even) and R lane vectors (vector v:
// value v of the 16 groups). Output vector v takes lane t from the source pair q (vectors 2q, 2q + 1: 32
// values, which one idx[v][t] says) that from_pair[v][q] marks: one two-source permute per pair, blended.
template <int R, bool TO_LANES>
struct Transpose {
  int32_t idx[R][16] = {};
  uint16_t from_pair[R][R / 2] = {};
  constexpr Transpose() {
    for (int v = 0; v < R; ++v)
      for (int t = 0; t < 16; ++t) {
        const int e = TO_LANES ? R * t + v : 16 * v + t;  // the value's place in the group-major layout
        const int pair = TO_LANES ? e / 32 : (e % R) / 2;
        idx[v][t] = TO_LANES ? e % 32 : e / R + 16 * (e % R % 2);
        from_pair[v][pair] |= static_cast<uint16_t>(1u << t);
      }
  }
};

template <int R, bool TO_LANES>
inline void transpose(const __m512 (&in)[R], __m512 (&out)[R]) {
  static_assert(R % 2 == 0, "sources go in pairs");
  static constexpr Transpose<R, TO_LANES> tr{};
  for (int v = 0; v < R; ++v) {
    const __m512i idx = _mm512_loadu_si512(tr.idx[v]);
    out[v] = _mm512_permutex2var_ps(in[0], idx, in[1]);
    for (int q = 1; q < R / 2; ++q)
      out[v] = _mm512_mask_blend_ps(tr.from_pair[v][q], out[v], _mm512_permutex2var_ps(in[2 * q], idx, in[2 * q + 1]));
  }
}
#endif

// Staging between the group-major layout ([n groups][R]: logits, probabilities and their gradients with
// R = C; the mask in the weight's layout with R = M) and lanes (lane i of vector k is group i's value k).
// Lanes past n stay as they are.
template <int R, bool FULL, class T>
inline void to_lanes(const T* src, int n, float (&lanes)[R][L]) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (FULL) {
    __m512 in[R], out[R];
    for (int v = 0; v < R; ++v) in[v] = load(src + v * L, L);
    transpose<R, true>(in, out);
    for (int v = 0; v < R; ++v) Vec(out[v]).store(lanes[v]);
    return;
  }
#endif
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < R; ++k) lanes[k][i] = static_cast<float>(src[i * R + k]);
}

template <int R, bool FULL>
inline void from_lanes(const float (&lanes)[R][L], int n, float* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (FULL) {
    __m512 in[R], out[R];
    for (int v = 0; v < R; ++v) in[v] = Vec::loadu(lanes[v]);
    transpose<R, false>(in, out);
    for (int v = 0; v < R; ++v) Vec(out[v]).store(dst + v * L);
    return;
  }
#endif
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < R; ++k) dst[i * R + k] = lanes[k][i];
}

// The mask of n groups in the weight's layout: position j keeps the mass of the patterns that keep it.
template <int C, int M, bool FULL>
inline void mix_patterns(const Vec (&pat)[C], const KeepLists<C, M>& kl, int n, float* mask) {
  alignas(64) float pos[M][L];
  for (int j = 0; j < M; ++j) {
    Vec acc = pat[kl.pats[j][0]];
    for (int t = 1; t < kl.n_pats[j]; ++t) acc = acc + pat[kl.pats[j][t]];
    acc.store(pos[j]);
  }
  from_lanes<M, FULL>(pos, n, mask);
}

// Runs block(full, r, g0, n) over every block of L groups of every row, rows split over threads. Full
// blocks get full = std::true_type (n == L known at compile time: loops unroll, loads take the
// full-vector path); a row's tail block gets std::false_type and n < L.
template <class Block>
inline void for_each_block(int64_t rows, int64_t groups, int threads, Block block) {
  const int64_t full = groups - groups % L;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g0 = 0; g0 < groups; g0 += L) {
      if (g0 < full)
        block(std::true_type{}, r, g0, L);
      else
        block(std::false_type{}, r, g0, static_cast<int>(groups - g0));
    }
}

template <int C, int M, bool FULL, class WT, class LT>
inline void forward_block(const LT* lrow, const WT* wrow, const int32_t* chash, int64_t groups, IVec rh,
                          Vec vcoef, Vec vinv, const KeepLists<C, M>& kl, float* prow, WT* orow, float* hrow,
                          int n_tail) {
  const int n = FULL ? L : n_tail;
  alignas(64) float lanes[C][L];  // pattern-major staging of the L groups (logits in, probabilities out)
  alignas(64) float mask[L * M];  // the L groups' mask, in the weight's layout
  if (!FULL) zero(lanes);         // a full block writes every lane
  to_lanes<C, FULL>(lrow, n, lanes);
  Vec z[C];
  for (int k = 0; k < C; ++k) {
    const IVec ch = FULL ? IVec::loadu(chash + k * groups) : IVec::loadu(chash + k * groups, n);
    z[k] = at::vec::fmadd(gumbel(rh, ch), vinv, Vec::loadu(lanes[k]) * vcoef);
  }
  Vec top = z[0];
  for (int k = 1; k < C; ++k) top = at::vec::maximum(top, z[k]);
  Vec sum(0.f);
  for (int k = 0; k < C; ++k) {
    z[k] = (z[k] - top).exp_u20();
    sum = sum + z[k];
  }
  for (int k = 0; k < C; ++k) (z[k] / sum).store(lanes[k]);
  from_lanes<C, FULL>(lanes, n, prow);
  if (hrow) {  // one-hot argmax (first maximum, as torch.argmax)
    for (int i = 0; i < n; ++i) {
      int best = 0;
      for (int k = 1; k < C; ++k)
        if (lanes[k][i] > lanes[best][i]) best = k;
      for (int k = 0; k < C; ++k) lanes[k][i] = (k == best) ? 1.f : 0.f;
    }
  }
  Vec sel[C];  // the sample: the probabilities, or the one-hot argmax
  for (int k = 0; k < C; ++k) sel[k] = Vec::loadu(lanes[k]);
  mix_patterns<C, M, FULL>(sel, kl, n, mask);
  for (int o = 0; o < n * M; o += L) {
    const int c = FULL ? L : std::min(L, n * M - o);
    const Vec m = Vec::loadu(mask + o, c);
    store(orow + o, load(wrow + o, c) * round_to<WT>(m), c);
    if (hrow) m.store(hrow + o, c);
  }
}

// logits [rows, groups, C]; weight/out [rows, groups * M]; col_hash pattern-major [C, groups];
// keep [C, M]; probs [rows, groups, C]; hard_mask (optional) [rows, groups * M]: when given, the forward
// uses the one-hot argmax sample and writes its mask.
template <int C, int M, class WT, class LT>
void forward(const LT* logits, const WT* weight, const int32_t* row_hash, const int32_t* col_hash,
             const uint8_t* keep, float* probs, WT* out, float* hard_mask, int64_t rows, int64_t groups,
             float coef, float inv_tau, int threads) {
  const Vec vcoef(coef), vinv(inv_tau);
  const KeepLists<C, M> kl(keep);
  for_each_block(rows, groups, threads, [&](auto full, int64_t r, int64_t g0, int n) {
    const int64_t lg = r * groups + g0, wo = lg * M;
    forward_block<C, M, decltype(full)::value, WT, LT>(logits + lg * C, weight + wo, col_hash + g0, groups,
                                               IVec(row_hash[r]), vcoef, vinv, kl, probs + lg * C, out + wo,
                                               hard_mask ? hard_mask + wo : nullptr, n);
  });
}

template <int C, int M, bool FULL, class WT>
inline void backward_block(const WT* gout, const WT* wrow, const float* prow, const float* hrow,
                           Vec vcoef, Vec vreg2, const KeepLists<C, M>& kl, float* grow, WT* gwrow, int n_tail) {
  const int n = FULL ? L : n_tail;
  alignas(64) float lanes[C][L];  // pattern-major probabilities (in), logit gradients (out)
  alignas(64) float mask[L * M];  // the mask in the weight's layout, then the mask gradient
  alignas(64) float pos[M][L];    // position-major mask gradient
  if (!FULL) {                    // a full block writes every lane
    zero(lanes);
    zero(pos);
  }
  to_lanes<C, FULL>(prow, n, lanes);
  Vec p[C];
  for (int k = 0; k < C; ++k) p[k] = Vec::loadu(lanes[k]);
  if (hrow)
    std::copy(hrow, hrow + n * M, mask);
  else
    mix_patterns<C, M, FULL>(p, kl, n, mask);
  for (int o = 0; o < n * M; o += L) {  // d(loss)/d(mask) = g * W - 2 lambda W^2 mask
    const int c = FULL ? L : std::min(L, n * M - o);
    const Vec g = load(gout + o, c), w = load(wrow + o, c), m = Vec::loadu(mask + o, c);
    if (gwrow) store(gwrow + o, g * round_to<WT>(m), c);
    at::vec::fnmadd(vreg2, w * w * m, g * w).store(mask + o, c);
  }
  to_lanes<M, FULL>(mask, n, pos);
  Vec gp[C], dot(0.f);
  for (int k = 0; k < C; ++k) {  // pattern k's gradient: the sum over the positions it keeps
    gp[k] = Vec::loadu(pos[kl.poss[k][0]]);
    for (int t = 1; t < kl.n_poss[k]; ++t) gp[k] = gp[k] + Vec::loadu(pos[kl.poss[k][t]]);
    dot = at::vec::fmadd(p[k], gp[k], dot);
  }
  for (int k = 0; k < C; ++k) (p[k] * (gp[k] - dot) * vcoef).store(lanes[k]);  // softmax backward
  from_lanes<C, FULL>(lanes, n, grow);
}

// grad_out/weight [rows, groups * M]; probs [rows, groups, C]; hard_mask (optional) as in the forward
// (absent: the soft mask, recomputed from probs); grad_logits [rows, groups, C]; grad_weight optional.
template <int C, int M, class WT>
void backward(const WT* grad_out, const WT* weight, const float* probs, const float* hard_mask,
              const uint8_t* keep, float* grad_logits, WT* grad_weight, int64_t rows, int64_t groups,
              float coef, float reg2, int threads) {
  const Vec vcoef(coef), vreg2(reg2);
  const KeepLists<C, M> kl(keep);
  for_each_block(rows, groups, threads, [&](auto full, int64_t r, int64_t g0, int n) {
    const int64_t lg = r * groups + g0, wo = lg * M;
    backward_block<C, M, decltype(full)::value, WT>(grad_out + wo, weight + wo, probs + lg * C,
                                                hard_mask ? hard_mask + wo : nullptr, vcoef, vreg2, kl,
                                                grad_logits + lg * C, grad_weight ? grad_weight + wo : nullptr, n);
  });
}

}  // namespace

extern "C" int maskllm_vector_width() { return L; }

// The tensors in the weight's layout (weight, out, grad_out, grad_weight) are bf16 where weight_bf16 is
// set, else fp32; the logits likewise with logits_bf16. Everything else is fp32 (hashes int32, keep uint8).
extern "C" void maskllm_masked_weight_bwd_2_4(const void* grad_out, const void* weight, const float* probs,
                                             const float* hard_mask, const uint8_t* keep, float* grad_logits,
                                             void* grad_weight, int64_t rows, int64_t groups, float coef,
                                             float reg2, int threads, int weight_bf16) {
  auto run = [&](auto w) {
    using WT = decltype(w);
    backward<6, 4, WT>(static_cast<const WT*>(grad_out), static_cast<const WT*>(weight), probs, hard_mask, keep,
                       grad_logits, static_cast<WT*>(grad_weight), rows, groups, coef, reg2, threads);
  };
  weight_bf16 ? run(BF16()) : run(0.f);
}

extern "C" void maskllm_masked_weight_fwd_2_4(const void* logits, const void* weight, const int32_t* row_hash,
                                             const int32_t* col_hash, const uint8_t* keep, float* probs, void* out,
                                             float* hard_mask, int64_t rows, int64_t groups, float coef,
                                             float inv_tau, int threads, int weight_bf16, int logits_bf16) {
  auto run = [&](auto w, auto l) {
    using WT = decltype(w);
    using LT = decltype(l);
    forward<6, 4, WT, LT>(static_cast<const LT*>(logits), static_cast<const WT*>(weight), row_hash, col_hash, keep,
                          probs, static_cast<WT*>(out), hard_mask, rows, groups, coef, inv_tau, threads);
  };
  if (weight_bf16)
    logits_bf16 ? run(BF16(), BF16()) : run(BF16(), 0.f);
  else
    logits_bf16 ? run(0.f, BF16()) : run(0.f, 0.f);
}
