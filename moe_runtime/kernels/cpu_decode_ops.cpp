// The small ops of a CPU decode step, each in one call: the llama-form RMS norm and rotary
// embedding (OLMoE, Qwen2/3-MoE, Mixtral, DeepSeek) bit for bit as transformers computes them,
// and a one-query attention and a softmax router's top k that are not (see `attend`,
// `top_k_softmax`).
//
// Why: at decode these ops touch a few thousand numbers, and each of their 7-14 torch ops costs
// more in dispatch than in arithmetic: an RMS norm module took about 19 us on the 2-core EPYC of
// BENCHMARKS.md, 33 of them a step on the peer benchmark's small model.
//
// How they stay bit-identical: every elementwise step rounds where torch's does (products and
// sums in fp32, rounded to the tensor's dtype to nearest-even after each torch op), this file
// is built with -ffp-contract=off (no fused multiply-add merges two roundings into one), and
// the one reduction (the mean of squares) is torch's own at::mean (unless the caller need not
// be exact: see mean_squares). Callers still check each
// op against the code it replaces on random inputs before using it (moe_runtime/native_norms.py,
// decode_attention.rotation).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// torch's float -> bf16 / fp16 conversions (round to nearest even) and back, through c10.
template <typename T>
inline float widen(T v) { return static_cast<float>(v); }
template <typename T>
inline T narrow(float v) { return static_cast<T>(v); }

// One row: out = weight * to_T(x * rsqrt(variance + eps)), products in fp32 (W = weight's type).
template <typename T, typename W, typename O>
void norm_row(const T* x, const W* weight, float inverse, int64_t H, O* out) {
  for (int64_t h = 0; h < H; ++h) {
    const T rounded = narrow<T>(widen(x[h]) * inverse);  // hidden_states.to(input_dtype)
    out[h] = narrow<O>(widen(weight[h]) * widen(rounded));
  }
}

// The mean of squares of each of R rows of H: torch's own at::mean (its reduction order: bit
// for bit), or, where the caller need not be exact, one pass summing in fp32 (at::mean's setup
// was most of a decode row's 4.5 us on the CPU of BENCHMARKS.md).
template <typename T>
std::vector<float> mean_squares(const T* xs, int64_t R, int64_t H, bool exact) {
  std::vector<float> means(R);
  if (!exact) {
    for (int64_t r = 0; r < R; ++r) {
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t h = 0; h < H; ++h) total += widen(xs[r * H + h]) * widen(xs[r * H + h]);
      means[r] = total / static_cast<float>(H);
    }
    return means;
  }
  auto squares = torch::empty({R, H}, torch::kFloat);
  float* sq = squares.data_ptr<float>();
  for (int64_t i = 0; i < R * H; ++i) {
    const float v = widen(xs[i]);
    sq[i] = v * v;  // pow(2) of the fp32 copy
  }
  const auto variance = at::mean(squares, {-1}).contiguous();
  std::copy(variance.data_ptr<float>(), variance.data_ptr<float>() + R, means.begin());
  return means;
}

// R rows of H: out = weight * to_T(x * rsqrt(mean(x^2) + eps)) (out may be x itself: each row's
// mean is taken before it is written, and norm_row reads each number before writing it).
template <typename T, typename W, typename O>
void norm_rows(const T* xs, const W* weight, int64_t R, int64_t H, double eps, bool exact, O* out) {
  const std::vector<float> var = mean_squares(xs, R, H, exact);
  for (int64_t r = 0; r < R; ++r) {
    const float inverse = 1.0f / std::sqrt(var[r] + static_cast<float>(eps));  // torch.rsqrt: 1 / sqrt
    norm_row<T, W, O>(xs + r * H, weight, inverse, H, out + r * H);
  }
}

template <typename T, typename W, typename O>
torch::Tensor rms_norm_typed(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool exact) {
  const int64_t H = x.size(-1), R = x.numel() / H;
  torch::Tensor out = torch::empty(x.sizes(), x.options().dtype(c10::CppTypeToScalarType<O>::value));  // torch's promotion of T and W
  norm_rows<T, W, O>(x.data_ptr<T>(), weight.data_ptr<W>(), R, H, eps, exact, out.data_ptr<O>());
  return out;
}

// x [..., H] -> weight * to(x.dtype)(x32 * rsqrt(mean(x32^2) + eps)) in torch's promoted dtype
// of weight and x: the forward of OlmoeRMSNorm, Qwen3MoeRMSNorm, MixtralRMSNorm, ... (exact:
// bit for bit; else the mean summed in another order, see mean_squares).
torch::Tensor rms_norm(torch::Tensor given, torch::Tensor weight, double eps, bool exact) {
  TORCH_CHECK(given.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == given.size(-1), "rms_norm: weight must be [H]");
  const torch::Tensor x = given.contiguous(), w = weight.contiguous();
  const auto key = std::make_tuple(x.scalar_type(), w.scalar_type());
  using BF = c10::BFloat16;
  using HF = c10::Half;
  if (key == std::make_tuple(torch::kBFloat16, torch::kBFloat16)) return rms_norm_typed<BF, BF, BF>(x, w, eps, exact);
  if (key == std::make_tuple(torch::kHalf, torch::kHalf)) return rms_norm_typed<HF, HF, HF>(x, w, eps, exact);
  if (key == std::make_tuple(torch::kFloat, torch::kFloat)) return rms_norm_typed<float, float, float>(x, w, eps, exact);
  if (key == std::make_tuple(torch::kBFloat16, torch::kFloat)) return rms_norm_typed<BF, float, float>(x, w, eps, exact);
  if (key == std::make_tuple(torch::kHalf, torch::kFloat)) return rms_norm_typed<HF, float, float>(x, w, eps, exact);
  TORCH_CHECK(false, "rms_norm: unsupported dtypes ", x.scalar_type(), " and ", w.scalar_type());
}

// out[d] = t*cos + rotate_half(t)*sin for one head's row of D, each product and the sum rounded
// to T as torch's three ops round them; rotate_half(t) = cat(-t[D/2:], t[:D/2]). out is not t.
template <typename T>
void rotate_row(const T* t, const T* cos, const T* sin, int64_t D, T* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const T rotated = d < half ? narrow<T>(-widen(t[d + half])) : t[d - half];
    const T first = narrow<T>(widen(t[d]) * widen(cos[d]));
    const T second = narrow<T>(widen(rotated) * widen(sin[d]));
    out[d] = narrow<T>(widen(first) + widen(second));
  }
}

template <typename T>
torch::Tensor rotate_typed(const torch::Tensor& given, const torch::Tensor& cos_given, const torch::Tensor& sin_given) {
  const torch::Tensor t = given.contiguous(), cos = cos_given.contiguous(), sin = sin_given.contiguous();
  const int64_t B = t.size(0), heads = t.size(1), S = t.size(2), D = t.size(3);
  auto out = torch::empty({B, heads, S, D}, t.options());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = cos.size(0) == 1 ? 0 : b;  // one position table for the whole batch
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t row = ((b * heads + h) * S + s) * D, angle = (c * S + s) * D;
        rotate_row<T>(t.data_ptr<T>() + row, cos.data_ptr<T>() + angle, sin.data_ptr<T>() + angle, D, out.data_ptr<T>() + row);
      }
  }
  return out;
}

// q [B, Hq, S, D], k [B, Hk, S, D], cos and sin [B, S, D], all of one dtype: the family's
// apply_rotary_pos_emb(q, k, cos, sin) with unsqueeze_dim 1, as (q_embed, k_embed).
std::vector<torch::Tensor> rotate(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && cos.dim() == 3 && sin.dim() == 3, "rotate: q, k [B, H, S, D], cos, sin [B, S, D]");
  TORCH_CHECK(q.size(3) % 2 == 0 && cos.size(2) == q.size(3) && k.size(3) == q.size(3), "rotate: head dims differ or are odd");
  TORCH_CHECK(cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == q.size(0)) && cos.size(1) == q.size(2) &&
              k.size(0) == q.size(0) && k.size(2) == q.size(2), "rotate: q, k, cos and sin of batch or length that do not match");
  const auto type = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == type && cos.scalar_type() == type && sin.scalar_type() == type, "rotate: one dtype for all");
  switch (type) {
    case torch::kBFloat16: return {rotate_typed<c10::BFloat16>(q, cos, sin), rotate_typed<c10::BFloat16>(k, cos, sin)};
    case torch::kHalf: return {rotate_typed<c10::Half>(q, cos, sin), rotate_typed<c10::Half>(k, cos, sin)};
    case torch::kFloat: return {rotate_typed<float>(q, cos, sin), rotate_typed<float>(k, cos, sin)};
    default: TORCH_CHECK(false, "rotate: unsupported dtype ", type);
  }
}

// One query head against its key/value head: out[d] = sum_t p_t v[t, d], p = softmax(scale q.k_t),
// every score, the max, the sum and the weighted sum of v in fp32; the output rounded once.
template <typename T>
void attend_head(const T* q, const T* k, const T* v, int64_t length, int64_t D, int64_t Dv, float scale,
                 float* query, float* scores, float* sum_v, T* out) {
  for (int64_t d = 0; d < D; ++d) query[d] = widen(q[d]);
  float highest = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < length; ++t) {
    const T* key = k + t * D;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += query[d] * widen(key[d]);
    scores[t] = dot * scale;
    highest = std::max(highest, scores[t]);
  }
  float total = 0.0f;
  for (int64_t t = 0; t < length; ++t) {
    scores[t] = std::exp(scores[t] - highest);
    total += scores[t];
  }
  std::fill(sum_v, sum_v + Dv, 0.0f);
  for (int64_t t = 0; t < length; ++t) {
    const T* value = v + t * Dv;
    const float p = scores[t];
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) sum_v[d] += p * widen(value[d]);
  }
  for (int64_t d = 0; d < Dv; ++d) out[d] = narrow<T>(sum_v[d] / total);
}

// Keys and values are read where they lie: rows of one head contiguous, heads and batches at
// any stride (a KV cache kept as a view of a longer buffer, kv_append.py, is not copied).
template <typename T>
torch::Tensor attend_typed(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hk = k.size(1), length = k.size(2), Dv = v.size(3);
  const int64_t group = Hq / Hk;
  auto out = torch::empty({B, Hq, 1, Dv}, q.options());
  const T *qs = q.data_ptr<T>(), *ks = k.data_ptr<T>(), *vs = v.data_ptr<T>();
  T* os = out.data_ptr<T>();
  // Threads only where there is work for them: a short context's heads take a few us in all.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, length * (D + Dv)));
  at::parallel_for(0, B * Hq, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> query(D), scores(length), sum_v(Dv);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hq, head = (i % Hq) / group;  // GQA: `group` query heads share one
      attend_head<T>(qs + i * D, ks + b * k.stride(0) + head * k.stride(1), vs + b * v.stride(0) + head * v.stride(1), length, D, Dv,
                     static_cast<float>(scale), query.data(), scores.data(), sum_v.data(), os + i * Dv);
    }
  });
  return out;
}

// t itself where each head's rows are contiguous (last dim dense, rows one after another), else a copy.
torch::Tensor rows_dense(const torch::Tensor& t) {
  return (t.stride(3) == 1 && t.stride(2) == t.size(3)) ? t : t.contiguous();
}

// q [B, Hq, 1, D], k [B, Hk, T, D], v [B, Hk, T, Dv] of one dtype, Hq a multiple of Hk: the
// attention of one new token to the T cached ones (no mask), softmax(scale q k^T) v as
// [B, Hq, 1, Dv]. SDPA's CPU kernel gives the same up to rounding (it blocks the keys and
// rescales as it goes, in another order): this op is for decode steps that need not be exact
// (exact=False, the default under quantize_rest), where it takes a few us instead of SDPA's 50-90.
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attend: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "attend: q [B, Hq, 1, D], k [B, Hk, T, D], v [B, Hk, T, Dv]");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(3) == q.size(3) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "attend: q, k and v of batch, heads, length or head dim that do not match");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0 && k.size(2) > 0, "attend: query heads must be a multiple of key heads, and T > 0");
  const auto type = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == type && v.scalar_type() == type, "attend: one dtype for q, k and v");
  const torch::Tensor qc = q.contiguous(), kc = rows_dense(k), vc = rows_dense(v);
  switch (type) {
    case torch::kBFloat16: return attend_typed<c10::BFloat16>(qc, kc, vc, scale);
    case torch::kHalf: return attend_typed<c10::Half>(qc, kc, vc, scale);
    case torch::kFloat: return attend_typed<float>(qc, kc, vc, scale);
    default: TORCH_CHECK(false, "attend: unsupported dtype ", type);
  }
}

// ---- one step's attention from its projections to its output, in one call ----
//
// decode_attention.py's path where a step need not be exact runs the norms, the rotation, the
// KV append and the attention above as five to seven native calls with Python between them:
// about 200 us a layer outside the projections on the peer benchmark's small model, 290 at
// the OLMoE-1B-7B shape (2-core EPYC of BENCHMARKS.md), where these ops compute for a few tens.
// attend_step runs the same functions on the same values in the same order, so its output is
// bit for bit that path's (tested).

enum Norms : int64_t { NO_NORMS = 0, ON_PROJECTION = 1, PER_HEAD = 2 };  // decode_attention.NORMS

// x.clamp_(-clip, clip) as torch computes it for T: compared in fp32, rounded back.
template <typename T>
void clip_rows(T* x, int64_t n, double clip) {
  const float low = static_cast<float>(-clip), high = static_cast<float>(clip);
  for (int64_t i = 0; i < n; ++i) x[i] = narrow<T>(std::min(std::max(widen(x[i]), low), high));
}

struct StepNorms {
  int64_t where;
  const torch::Tensor *q_weight, *k_weight;
  double q_eps, k_eps;
  bool exact;
};

template <typename T>
torch::Tensor attend_step_typed(torch::Tensor q, torch::Tensor k, torch::Tensor v, const StepNorms& norms, double clip, const torch::Tensor& cos,
                                const torch::Tensor& sin, torch::Tensor& keys, torch::Tensor& values, int64_t length, double scale) {
  const int64_t B = q.size(0), D = keys.size(3), Dv = values.size(3), Hk = keys.size(1), Hq = q.size(1) / D;
  T *qs = q.data_ptr<T>(), *ks = k.data_ptr<T>(), *vs = v.data_ptr<T>();
  if (norms.where == ON_PROJECTION) {
    norm_rows<T, T, T>(qs, norms.q_weight->data_ptr<T>(), B, Hq * D, norms.q_eps, norms.exact, qs);  // in place
    norm_rows<T, T, T>(ks, norms.k_weight->data_ptr<T>(), B, Hk * D, norms.k_eps, norms.exact, ks);
  }
  if (clip > 0) {
    clip_rows<T>(qs, q.numel(), clip);
    clip_rows<T>(ks, k.numel(), clip);
    clip_rows<T>(vs, v.numel(), clip);
  }
  if (norms.where == PER_HEAD) {
    norm_rows<T, T, T>(qs, norms.q_weight->data_ptr<T>(), B * Hq, D, norms.q_eps, norms.exact, qs);
    norm_rows<T, T, T>(ks, norms.k_weight->data_ptr<T>(), B * Hk, D, norms.k_eps, norms.exact, ks);
  }
  auto rotated = torch::empty({B, Hq, 1, D}, q.options());
  T *qr = rotated.data_ptr<T>(), *kb = keys.data_ptr<T>(), *vb = values.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = cos.size(0) == 1 ? 0 : b;
    const T *cs = cos.data_ptr<T>() + c * D, *ss = sin.data_ptr<T>() + c * D;
    for (int64_t h = 0; h < Hq; ++h) rotate_row<T>(qs + (b * Hq + h) * D, cs, ss, D, qr + (b * Hq + h) * D);
    for (int64_t h = 0; h < Hk; ++h) {  // the new key (rotated) and value written at `length`
      rotate_row<T>(ks + (b * Hk + h) * D, cs, ss, D, kb + b * keys.stride(0) + h * keys.stride(1) + length * D);
      std::copy(vs + (b * Hk + h) * Dv, vs + (b * Hk + h + 1) * Dv, vb + b * values.stride(0) + h * values.stride(1) + length * Dv);
    }
  }
  return attend_typed<T>(rotated, keys.narrow(2, 0, length + 1), values.narrow(2, 0, length + 1), scale);
}

// q [B, Hq*D], k [B, Hk*D], v [B, Hk*Dv]: a step's projections (changed in place); keys, values
// [B, Hk, capacity, D or Dv]: a KV cache's buffers (kv_append.Room), its first `length`
// positions the context. The family's q/k norms (`norms`: decode_attention.NORMS, weights of
// the projections' dtype, `exact` as rms_norm's), clip_qkv (clip > 0), the rotation by cos and
// sin [B or 1, 1, D], the new key and value written at position `length`, and one query's
// attention to the length + 1 positions: [B, Hq*Dv], the input of o_proj.
torch::Tensor attend_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t norms, c10::optional<torch::Tensor> q_weight,
                          c10::optional<torch::Tensor> k_weight, double q_eps, double k_eps, bool exact, double clip, torch::Tensor cos,
                          torch::Tensor sin, torch::Tensor keys, torch::Tensor values, int64_t length, double scale) {
  const auto type = q.scalar_type();
  for (const torch::Tensor* t : {&q, &k, &v, &cos, &sin, &keys, &values})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == type, "attend_step: CPU tensors of one dtype");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.dim() == 2 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "attend_step: q, k, v must be contiguous rows [B, N]");
  TORCH_CHECK(keys.dim() == 4 && values.dim() == 4 && keys.stride(3) == 1 && keys.stride(2) == keys.size(3) && values.stride(3) == 1 &&
              values.stride(2) == values.size(3), "attend_step: keys and values [B, Hk, capacity, D], each head's rows contiguous");
  const int64_t B = q.size(0), D = keys.size(3), Hk = keys.size(1);
  TORCH_CHECK(D % 2 == 0 && q.size(1) % D == 0 && (q.size(1) / D) % Hk == 0 && k.size(1) == Hk * D && v.size(1) == Hk * values.size(3) &&
              k.size(0) == B && v.size(0) == B && keys.size(0) == B && values.size(0) == B && values.size(1) == Hk,
              "attend_step: projections and cache of heads or widths that do not match");
  TORCH_CHECK(length >= 0 && length < keys.size(2) && length < values.size(2), "attend_step: no room at position ", length);
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == 1 && cos.size(2) == D &&
              cos.is_contiguous() && sin.is_contiguous(), "attend_step: cos, sin [B or 1, 1, D]");
  TORCH_CHECK(norms >= NO_NORMS && norms <= PER_HEAD, "attend_step: norms must be 0 (none), 1 (projection) or 2 (per head)");
  if (norms != NO_NORMS) {
    const int64_t q_width = norms == ON_PROJECTION ? q.size(1) : D, k_width = norms == ON_PROJECTION ? k.size(1) : D;
    TORCH_CHECK(q_weight && k_weight && q_weight->dim() == 1 && k_weight->dim() == 1 && q_weight->size(0) == q_width &&
                k_weight->size(0) == k_width && q_weight->scalar_type() == type && k_weight->scalar_type() == type &&
                q_weight->is_contiguous() && k_weight->is_contiguous(), "attend_step: q/k norm weights of the projections' dtype and width");
  }
  const StepNorms given{norms, q_weight ? &*q_weight : nullptr, k_weight ? &*k_weight : nullptr, q_eps, k_eps, exact};
  switch (type) {
    case torch::kBFloat16: return attend_step_typed<c10::BFloat16>(q, k, v, given, clip, cos, sin, keys, values, length, scale).view({B, -1});
    case torch::kHalf: return attend_step_typed<c10::Half>(q, k, v, given, clip, cos, sin, keys, values, length, scale).view({B, -1});
    case torch::kFloat: return attend_step_typed<float>(q, k, v, given, clip, cos, sin, keys, values, length, scale).view({B, -1});
    default: TORCH_CHECK(false, "attend_step: unsupported dtype ", type);
  }
}

// One row of a softmax router: the top k of softmax(logits) (ties to the lower expert, as a
// stable sort gives), renormalised to sum to 1 if asked. exp is the C library's, not torch's
// vectorized one: probabilities may differ from torch's in their last bits.
template <typename T>
void top_k_row(const T* logits, int64_t E, int64_t k, bool renormalise, float* probabilities, int64_t* order, float* weights, int64_t* index) {
  float highest = -std::numeric_limits<float>::infinity();
  for (int64_t e = 0; e < E; ++e) highest = std::max(highest, widen(logits[e]));
  float total = 0.0f;
  for (int64_t e = 0; e < E; ++e) {
    probabilities[e] = std::exp(widen(logits[e]) - highest);
    total += probabilities[e];
  }
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::partial_sort(order, order + k, order + E, [&](int64_t a, int64_t b) {
    return probabilities[a] > probabilities[b] || (probabilities[a] == probabilities[b] && a < b);
  });
  float chosen = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    index[j] = order[j];
    weights[j] = probabilities[order[j]] / total;
    chosen += weights[j];
  }
  if (renormalise)
    for (int64_t j = 0; j < k; ++j) weights[j] /= chosen;
}

template <typename T>
std::vector<torch::Tensor> top_k_typed(const torch::Tensor& logits, int64_t k, bool renormalise, bool cast) {
  const int64_t rows = logits.size(0), E = logits.size(1);
  auto weights = torch::empty({rows, k}, logits.options().dtype(cast ? logits.scalar_type() : torch::kFloat));
  auto index = torch::empty({rows, k}, logits.options().dtype(torch::kLong));
  std::vector<float> probabilities(E), chosen(k);
  std::vector<int64_t> order(E);
  const T* source = logits.data_ptr<T>();
  for (int64_t row = 0; row < rows; ++row) {
    top_k_row<T>(source + row * E, E, k, renormalise, probabilities.data(), order.data(), chosen.data(), index.data_ptr<int64_t>() + row * k);
    if (cast)
      for (int64_t j = 0; j < k; ++j) weights.data_ptr<T>()[row * k + j] = narrow<T>(chosen[j]);
    else
      std::copy(chosen.begin(), chosen.end(), weights.data_ptr<float>() + row * k);
  }
  return {weights, index};
}

// logits [T, E] -> (weights [T, k], index [T, k] int64): the softmax families' routing rule
// (softmax in fp32, top k, renormalised if asked, weights in the logits' dtype if `cast`) in
// one call where it took five torch ops; for decode steps that need not be exact.
std::vector<torch::Tensor> top_k_softmax(torch::Tensor logits, int64_t k, bool renormalise, bool cast) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2, "top_k_softmax: CPU logits [T, E]");
  TORCH_CHECK(k > 0 && k <= logits.size(1), "top_k_softmax: k must be in 1..E, got ", k, " of ", logits.size(1));
  const torch::Tensor dense = logits.contiguous();
  switch (dense.scalar_type()) {
    case torch::kBFloat16: return top_k_typed<c10::BFloat16>(dense, k, renormalise, cast);
    case torch::kHalf: return top_k_typed<c10::Half>(dense, k, renormalise, cast);
    case torch::kFloat: return top_k_typed<float>(dense, k, renormalise, cast);
    default: TORCH_CHECK(false, "top_k_softmax: unsupported dtype ", dense.scalar_type());
  }
}

}  // namespace

// Its functions in the extension's module (cpu_decode.cpp compiles this file in).
void bind_decode_ops(pybind11::module_& m) {
  m.def("rms_norm", &rms_norm, "the llama-form RMS norm of x [..., H] with weight [H]", py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("exact") = true);
  m.def("rotate", &rotate, "the llama-form rotary embedding of q and k", py::arg("q"), py::arg("k"), py::arg("cos"), py::arg("sin"));
  m.def("attend", &attend, "one query's attention to T cached keys and values", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"));
  m.def("attend_step", &attend_step, "a decode step's attention from its projections to o_proj's input", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("norms"), py::arg("q_weight"), py::arg("k_weight"), py::arg("q_eps"), py::arg("k_eps"), py::arg("exact"), py::arg("clip"),
        py::arg("cos"), py::arg("sin"), py::arg("keys"), py::arg("values"), py::arg("length"), py::arg("scale"));
  m.def("top_k_softmax", &top_k_softmax, "a softmax router's top k of logits [T, E]", py::arg("logits"), py::arg("k"), py::arg("renormalise"),
        py::arg("cast"));
}
