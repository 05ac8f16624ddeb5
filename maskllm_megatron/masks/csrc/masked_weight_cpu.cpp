// CPU kernels of the 2:4 masked weight, each ONE pass over the logits:
//   forward:  counter-based Gumbel noise, Gumbel-softmax over the 6 candidate patterns, pattern mixture
//             and the multiply into the weight (`_sample_forward` in maskllm_megatron/masks/sampling.py);
//   backward: the logits' gradient through W * mask, the regulariser folded in, and W's gradient when
//             the weight trains (`_sample_backward`).
//
// torch.compile fuses the same Python into four or five passes over memory on CPU, with the 6-wide
// softmax reduced in scalar code. Here 8 groups are
// processed per AVX2 vector: lane i holds group g0+i, and the 6 pattern logits of a group sit in 6
// vectors. Noise: the murmur3 fmix32 hash of rng.py, bit for bit; -log(-log(u)) with SLEEF's 3.5-ULP
// logf and the softmax's exp with ATen's 20-ULP exp_u20 (a few ULP from the eager path, which tests bound).
// Built on first use by maskllm_megatron/masks/cpu_kernel.py (g++ -O3 -mavx2 -mfma -fopenmp).
#include <ATen/cpu/vec/vec.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int L = Vec::size();

inline IVec mix32(IVec x) {  // murmur3 fmix32 on int32 lanes (logical shifts by masking)
  x = x ^ ((x >> IVec(16)) & IVec(0xFFFF));
  x = x * IVec(static_cast<int32_t>(0x85EBCA6Bu));
  x = x ^ ((x >> IVec(13)) & IVec(0x7FFFF));
  x = x * IVec(static_cast<int32_t>(0xC2B2AE35u));
  return x ^ ((x >> IVec(16)) & IVec(0xFFFF));
}

inline Vec gumbel(IVec row_hash, IVec col_hash) {  // rng.gumbel_from_hashes
  IVec h = (mix32(row_hash ^ col_hash) >> IVec(9)) & IVec(0x7FFFFF);
  Vec u = (at::vec::convert<float>(h) + Vec(0.5f)) * Vec(1.0f / 8388608.0f);
  Vec e = Vec(Sleef_logf8_u35(u)).neg();
  return Vec(Sleef_logf8_u35(e)).neg();
}

// logits [rows, groups, C]; weight/out [rows, groups * M]; col_hash pattern-major [C, groups];
// keep [C, M] (1 where pattern k keeps position j); probs [rows, groups, C]; hard_mask (optional)
// [rows, groups * M]: when given, the forward uses the one-hot argmax sample and writes its mask.
template <int C, int M>
void forward(const float* logits, const float* weight, const int32_t* row_hash, const int32_t* col_hash,
             const uint8_t* keep, float* probs, float* out, float* hard_mask, int64_t rows, int64_t groups,
             float coef, float inv_tau, int threads) {
  const Vec vcoef(coef), vinv(inv_tau);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    alignas(64) float lanes[C][L];  // pattern-major staging of L groups (logits in, probabilities out)
    alignas(64) float mask[L * M];  // the L groups' mask, in the weight's layout
    const IVec rh(row_hash[r]);
    for (int64_t g0 = 0; g0 < groups; g0 += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, groups - g0));
      const float* lrow = logits + (r * groups + g0) * C;
      for (int i = 0; i < n; ++i)
        for (int k = 0; k < C; ++k) lanes[k][i] = lrow[i * C + k];
      Vec z[C];
      for (int k = 0; k < C; ++k)
        z[k] = Vec::loadu(lanes[k]) * vcoef + gumbel(rh, IVec::loadu(col_hash + k * groups + g0, n)) * vinv;
      Vec top = z[0];
      for (int k = 1; k < C; ++k) top = at::vec::maximum(top, z[k]);
      Vec sum(0.f);
      for (int k = 0; k < C; ++k) {
        z[k] = (z[k] - top).exp_u20();
        sum = sum + z[k];
      }
      for (int k = 0; k < C; ++k) (z[k] / sum).store(lanes[k]);
      float* prow = probs + (r * groups + g0) * C;
      for (int i = 0; i < n; ++i)
        for (int k = 0; k < C; ++k) prow[i * C + k] = lanes[k][i];
      if (hard_mask) {  // one-hot argmax (first maximum, as torch.argmax)
        for (int i = 0; i < n; ++i) {
          int best = 0;
          for (int k = 1; k < C; ++k)
            if (lanes[k][i] > lanes[best][i]) best = k;
          for (int k = 0; k < C; ++k) lanes[k][i] = (k == best) ? 1.f : 0.f;
        }
      }
      for (int j = 0; j < M; ++j) {  // position j keeps the mass of the patterns that keep it
        alignas(64) float mj[L];
        Vec acc(0.f);
        bool first = true;
        for (int k = 0; k < C; ++k) {
          if (!keep[k * M + j]) continue;
          acc = first ? Vec::loadu(lanes[k]) : acc + Vec::loadu(lanes[k]);
          first = false;
        }
        acc.store(mj);
        for (int i = 0; i < n; ++i) mask[i * M + j] = mj[i];
      }
      const int64_t base = (r * groups + g0) * M;
      const int count = n * M;
      for (int o = 0; o < count; o += L) {
        const int c = std::min(L, count - o);
        Vec m = Vec::loadu(mask + o, c);
        (Vec::loadu(weight + base + o, c) * m).store(out + base + o, c);
        if (hard_mask) m.store(hard_mask + base + o, c);
      }
    }
  }
}

// grad_out/weight [rows, groups * M]; probs [rows, groups, C]; hard_mask (optional) as in the forward
// (absent: the soft mask, recomputed from probs); grad_logits [rows, groups, C]; grad_weight optional.
template <int C, int M>
void backward(const float* grad_out, const float* weight, const float* probs, const float* hard_mask,
              const uint8_t* keep, float* grad_logits, float* grad_weight, int64_t rows, int64_t groups,
              float coef, float reg2, int threads) {
  const Vec vcoef(coef), vreg2(reg2);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    alignas(64) float lanes[C][L];  // pattern-major probabilities (in), logit gradients (out)
    alignas(64) float mask[L * M];  // the mask in the weight's layout, then the mask gradient
    alignas(64) float pos[M][L];    // position-major mask gradient
    for (int64_t g0 = 0; g0 < groups; g0 += L) {
      const int n = static_cast<int>(std::min<int64_t>(L, groups - g0));
      const float* prow = probs + (r * groups + g0) * C;
      for (int i = 0; i < n; ++i)
        for (int k = 0; k < C; ++k) lanes[k][i] = prow[i * C + k];
      for (int i = n; i < L; ++i)
        for (int k = 0; k < C; ++k) lanes[k][i] = 0.f;
      Vec p[C];
      for (int k = 0; k < C; ++k) p[k] = Vec::loadu(lanes[k]);
      const int64_t base = (r * groups + g0) * M;
      const int count = n * M;
      if (hard_mask) {
        std::copy(hard_mask + base, hard_mask + base + count, mask);
      } else {
        for (int j = 0; j < M; ++j) {
          alignas(64) float mj[L];
          Vec acc(0.f);
          bool first = true;
          for (int k = 0; k < C; ++k) {
            if (!keep[k * M + j]) continue;
            acc = first ? p[k] : acc + p[k];
            first = false;
          }
          acc.store(mj);
          for (int i = 0; i < n; ++i) mask[i * M + j] = mj[i];
        }
      }
      for (int o = 0; o < count; o += L) {  // d(loss)/d(mask) = g * W - 2 lambda W^2 mask
        const int c = std::min(L, count - o);
        Vec g = Vec::loadu(grad_out + base + o, c), w = Vec::loadu(weight + base + o, c);
        Vec m = Vec::loadu(mask + o, c);
        if (grad_weight) (g * m).store(grad_weight + base + o, c);
        (g * w - vreg2 * (w * w * m)).store(mask + o, c);
      }
      for (int i = 0; i < L; ++i)
        for (int j = 0; j < M; ++j) pos[j][i] = i < n ? mask[i * M + j] : 0.f;
      Vec gp[C], dot(0.f);
      for (int k = 0; k < C; ++k) {  // pattern k's gradient: the sum over the positions it keeps
        bool first = true;
        for (int j = 0; j < M; ++j) {
          if (!keep[k * M + j]) continue;
          gp[k] = first ? Vec::loadu(pos[j]) : gp[k] + Vec::loadu(pos[j]);
          first = false;
        }
        dot = dot + p[k] * gp[k];
      }
      for (int k = 0; k < C; ++k) (p[k] * (gp[k] - dot) * vcoef).store(lanes[k]);  // softmax backward
      float* grow = grad_logits + (r * groups + g0) * C;
      for (int i = 0; i < n; ++i)
        for (int k = 0; k < C; ++k) grow[i * C + k] = lanes[k][i];
    }
  }
}

}  // namespace

extern "C" int maskllm_vector_width() { return L; }

extern "C" void maskllm_masked_weight_bwd_2_4(const float* grad_out, const float* weight, const float* probs,
                                             const float* hard_mask, const uint8_t* keep, float* grad_logits,
                                             float* grad_weight, int64_t rows, int64_t groups, float coef,
                                             float reg2, int threads) {
  backward<6, 4>(grad_out, weight, probs, hard_mask, keep, grad_logits, grad_weight, rows, groups, coef, reg2,
                 threads);
}

extern "C" void maskllm_masked_weight_fwd_2_4(const float* logits, const float* weight, const int32_t* row_hash,
                                             const int32_t* col_hash, const uint8_t* keep, float* probs, float* out,
                                             float* hard_mask, int64_t rows, int64_t groups, float coef,
                                             float inv_tau, int threads) {
  forward<6, 4>(logits, weight, row_hash, col_hash, keep, probs, out, hard_mask, rows, groups, coef, inv_tau,
                threads);
}
