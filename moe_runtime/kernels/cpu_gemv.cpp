// Decode-time products on the CPU: a few input rows times many weight matrices, in one call.
//
// out[m, r, :] = x[a(m), r, :] @ W_m^T, for every matrix m of a list of same-shaped matrices
// W_m [N, K] held as fp32, fp16, bf16, int8 (per-row scale) or int4 (per-group scale and zero:
// plain nibbles with the scales apart, or TILES; moe_runtime/expert_format.py). a(m) = 0 when
// x holds one block of rows for all matrices (a gate_up product), m when it holds one per
// matrix (a down product).
//
// Why: at decode a MoE layer's experts are K small GEMVs; torch's kernels pay a call each and
// stream 15-35 GB/s of weights on the 2-core EPYC of BENCHMARKS.md, where memory gives 50-78.
// Here the rows of all matrices form one parallel loop (ATen's OpenMP pool: the threads torch
// already uses), each weight row is read once for all input rows, and accumulation is fp32.
//
// 16-bit and fp32 weights are widened in registers. int8 and int4 weights are multiplied as
// integers (AVX512-VNNI, 64 products per instruction) against x quantized to int8 in blocks of
// 64 inputs with one fp32 scale each, as llama.cpp's Q8 activations are: widening every
// weight to fp32 instead holds int8 to about 22 GB/s on the machine above (compute-bound).
// Without AVX512-VNNI (or where K is not a multiple of 64) a portable loop computes the same
// products from fp32 x (TILES are never written there: they are AVX-512's alone).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define MOE_AVX512 1
#endif

namespace {

enum Format : int { F32 = 0, F16 = 1, BF16 = 2, INT8 = 3, INT4 = 4 };

constexpr int64_t ROWS = 4;          // weight rows computed together (they share each load of x); int8: one (ROW_AT_A_TIME)
constexpr int64_t BLOCK_ROWS = 16;   // weight rows per parallel work item
constexpr int64_t QBLOCK = 64;       // inputs per int8 scale of the quantized x

// ROW_AT_A_TIME: int8 weights are read one row after another, not four rows side by side: on the
// 2-core EPYC of BENCHMARKS.md a decode step's int8 experts (8 of 64 from RAM, one silu_experts
// call) streamed 25.9 against 22.1 GB/s at the OLMoE-1B-7B shape (8 rounds alternating, faster
// in 7) and 27.7 against 21.1 at the small shape (6 of 6). With the weights in L3 the four rows
// computed more (76 against 62 GB/s), so it is the order of the reads that memory prefers. The
// 16-bit paths ran alike either way and int4, bound by its arithmetic, lost with one row (19.2
// against 26.2 GB/s at the small shape): they keep four.
//
// PREFETCH: each dot loop asks for the weight rows it will read next, as far along as it is now
// (int4's rows being half as long, four times as many rows ahead), into L2 (_MM_HINT_T1). Into
// L1 (T0), as first written, the requests compete with the loads for L1's few line-fill slots:
// on the 2-core EPYC of BENCHMARKS.md a 50304 x 1024 matrix streamed at 16 (int8) and 19 (bf16)
// GB/s on 2 threads with T0 and 25 and 25 with T1 (one run, alternating); int4 rose from 17
// to 22 with the longer distance.
//
// TILES: int4 for this kernel alone, as [N/16, K/G, 64 + 8G] bytes: per 16 rows and group of G
// inputs, the rows' (s, z) pairs (16 x 4 bytes, one cache line), then the group's nibbles as
// G/8 chunks of 64 bytes, each chunk 4 bytes (8 inputs) of each of the 16 rows. One load then
// feeds one VPDPBUSD for 16 rows (a lane per row, against 4 bytes of x broadcast), a lane keeps
// its row's sum to the end (no reduction across lanes), a block's scales multiply 16 rows at
// once, and 16 rows are one stream of reads (the plain layout is four rows' streams beside a
// stream of scales per group, N * 4 bytes apart). llama.cpp's CPU backend repacks Q4_0 into
// interleaved rows for the same reasons. On the 2-core EPYC of BENCHMARKS.md a decode step's 8
// int4 experts (one silu_experts call, 8 of 64 drawn per call, nothing warm) streamed 24.9
// against 20.6 GB/s at the OLMoE-1B-7B shape (8 rounds alternating, faster in 8) and 23.8
// against 20.1 at the small shape (6 of 6); with the weights in L3, 52 against 35.

inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// One input row, prepared once per call for every weight row that meets it.
struct Input {
  const float* x = nullptr;     // [K] as given (fp32)
  const float* group_sums = nullptr;  // int4: [K/G] sums of x per weight group
  const int8_t* q = nullptr;    // int8/int4 with AVX-512: [K] x quantized (int4: in position_of's order)
  const float* d = nullptr;     // [K/64] the quantization scales
  float flip_correction = 0;    // int8: 128 * sum_b d_b sum q_b (the weights' sign flip, see dot_int8)
};

// ---------------------------------------------------------------- portable fallback
template <Format F>
inline float element(const char* row, int64_t k) {
  if constexpr (F == F32) return reinterpret_cast<const float*>(row)[k];
  if constexpr (F == F16) return static_cast<float>(reinterpret_cast<const c10::Half*>(row)[k]);
  if constexpr (F == BF16) return bf16_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
  if constexpr (F == INT8) return static_cast<float>(reinterpret_cast<const int8_t*>(row)[k]);
  return 0.0f;
}

template <Format F>
float dot_portable(const char* row, int64_t K, const float* x) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < K; ++k) total += element<F>(row, k) * x[k];
  return total;
}

float dot_int4_portable(const uint8_t* row, int64_t K, int64_t G, const Input& in, const uint16_t* sz, int64_t N, int64_t n) {
  float total = 0.0f;
  for (int64_t g = 0; g < K / G; ++g) {
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t j = g * G / 2; j < (g + 1) * G / 2; ++j)
      part += static_cast<float>(row[j] & 0xF) * in.x[2 * j] + static_cast<float>(row[j] >> 4) * in.x[2 * j + 1];
    const uint16_t* pair = sz + (g * N + n) * 2;
    float s = bf16_to_float(pair[0]), z = bf16_to_float(pair[1]);
    total += s * part + (z - 8.0f * s) * in.group_sums[g];
  }
  return total;
}

#ifdef MOE_AVX512
// ---------------------------------------------------------------- AVX-512
template <Format F>
inline __m512 load16(const char* row, int64_t k) {
  if constexpr (F == F32) return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + k);
  if constexpr (F == F16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + k)));
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + k)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));  // bf16: the high half of an fp32
}

// dot[i] = W[row i] . x for NR rows `ld` bytes apart, weights widened to fp32 (F32, F16, BF16).
template <Format F, int NR>
void dot_float(const char* w, int64_t ld, int64_t K, const float* x, float* dot) {
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int i = 0; i < NR; ++i) {
      _mm_prefetch(w + (i + NR) * ld + k * (F == F32 ? 4 : 2), _MM_HINT_T1);  // the next rows, as far along (see PREFETCH)
      acc[i] = _mm512_fmadd_ps(load16<F>(w + i * ld, k), xv, acc[i]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    float tail = 0.0f;
    for (int64_t j = k; j < K; ++j) tail += element<F>(w + i * ld, j) * x[j];
    dot[i] = _mm512_reduce_add_ps(acc[i]) + tail;
  }
}

// int8: VPDPBUSD multiplies unsigned by signed bytes, so each weight's sign bit is flipped
// (w + 128, unsigned) and 128 * sum(q) taken back once per input row (flip_correction).
template <int NR>
void dot_int8(const int8_t* w, int64_t ld, int64_t K, const Input& in, float* dot) {
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < K / QBLOCK; ++b) {
    const __m512i xq = _mm512_loadu_si512(in.q + b * QBLOCK);
    const __m512 d = _mm512_set1_ps(in.d[b]);
    for (int i = 0; i < NR; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (i + NR) * ld + b * QBLOCK), _MM_HINT_T1);  // see PREFETCH
      __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(w + i * ld + b * QBLOCK), flip);
      __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xq);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), d, acc[i]);
    }
  }
  for (int i = 0; i < NR; ++i) dot[i] = _mm512_reduce_add_ps(acc[i]) - in.flip_correction;
}

// int4: w = (q - 8) s + z per group g, so dot = sum_g s_g (q . x_g) + (z_g - 8 s_g) sum(x_g).
// 64 packed bytes hold 128 inputs (a byte: input 2j low, 2j+1 high); their low nibbles meet
// the block's 64 even inputs and their high nibbles its 64 odd ones (x is quantized in that
// order, see position_of), and both products add into the same int32 lanes: lane l sums
// inputs 8l..8l+7, so lanes 0-7 hold the first 64-input block and lanes 8-15 the second. Each
// half is scaled by its block's s_g d_b (`scale` [b * BLOCK_ROWS + i] for row i, from
// int4_block_scales). A last block of 64 (K = 64 mod 128) is laid out as [32 even, 32 odd].
template <int NR>
void dot_int4(const uint8_t* w, int64_t ld, int64_t K, const Input& in, const float* scale, const float* offset, float* dot) {
  const int64_t blocks = K / QBLOCK;
  __m512 acc[NR];
  for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F);
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m512i x_even = _mm512_loadu_si512(in.q + b * QBLOCK), x_odd = _mm512_loadu_si512(in.q + b * QBLOCK + QBLOCK);
    for (int i = 0; i < NR; ++i) {
      const uint8_t* bytes = w + i * ld + b * QBLOCK / 2;
      _mm_prefetch(reinterpret_cast<const char*>(bytes + 4 * NR * ld), _MM_HINT_T1);  // rows of half the bytes: farther (PREFETCH)
      __m512i packed = _mm512_loadu_si512(bytes);
      __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(packed, low), x_even);
      sums = _mm512_dpbusd_epi32(sums, _mm512_and_si512(_mm512_srli_epi16(packed, 4), low), x_odd);
      __m512 pair = _mm512_insertf32x8(_mm512_set1_ps(scale[b * BLOCK_ROWS + i]), _mm256_set1_ps(scale[(b + 1) * BLOCK_ROWS + i]), 1);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), pair, acc[i]);
    }
  }
  if (b < blocks) {  // the last 64 inputs: 32 bytes, [32 even, 32 odd]
    const __m512i xq = _mm512_loadu_si512(in.q + b * QBLOCK);
    for (int i = 0; i < NR; ++i) {
      __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ld + b * QBLOCK / 2));
      __m512i nibbles = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1), low);
      __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), nibbles, xq);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(scale[b * BLOCK_ROWS + i]), acc[i]);
    }
  }
  for (int i = 0; i < NR; ++i) dot[i] = _mm512_reduce_add_ps(acc[i]) + offset[i];
}

// For the `count` (<= 16) rows from `first` of an int4 matrix, across rows at once (a group's
// scales and zeros of consecutive rows lie together in sz [K/G, N, 2]): scale[b * 16 + i] =
// s of block b's group x d_b (x's quantization scale), offset[i] = sum_g (z_g - 8 s_g) sum(x_g).
void int4_block_scales(const uint16_t* sz, int64_t N, int64_t first, int64_t count, int64_t K, int64_t G, const Input& in, float* scale, float* offset) {
  const __mmask16 rows = static_cast<__mmask16>((1u << count) - 1);
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 total = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    const uint16_t* line = sz + (g * N + first) * 2;
    // Each group's scales are a stream of their own (N * 4 bytes apart): more streams than the
    // hardware prefetcher follows. The item two ahead reads the line after the next one of
    // every group; without this int4 streamed half of int8's GB/s in a decode step.
    _mm_prefetch(reinterpret_cast<const char*>(line + 2 * BLOCK_ROWS * 2), _MM_HINT_T0);
    __m512i pairs = _mm512_maskz_loadu_epi32(rows, line);  // lane i: s | z << 16 of row first + i
    __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), z = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
    total = _mm512_fmadd_ps(_mm512_fmadd_ps(s, _mm512_set1_ps(-8.0f), z), _mm512_set1_ps(in.group_sums[g]), total);
    for (int64_t b = g * G / QBLOCK; b < (g + 1) * G / QBLOCK; ++b) _mm512_storeu_ps(scale + b * BLOCK_ROWS, _mm512_mul_ps(s, _mm512_set1_ps(in.d[b])));
  }
  _mm512_storeu_ps(offset, total);
}

// 16 rows of TILES: out[i] = row i . x for the tile at `tile` (x quantized in TILES order:
// per 8 inputs the 4 even ones, then the 4 odd ones, as one chunk's low and high nibbles meet
// them). Four int32 sums per 64-input block (the VPDPBUSD chains overlap), scaled by s_g d_b.
void dot_int4_tile(const uint8_t* tile, int64_t K, int64_t G, const Input& in, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int32_t* q = reinterpret_cast<const int32_t*>(in.q);  // [K/8][even 4, odd 4] as int32 pairs
  __m512 acc = _mm512_setzero_ps(), offset = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / G; ++g) {
    const uint8_t* line = tile + g * (64 + 8 * G);
    _mm_prefetch(reinterpret_cast<const char*>(line + 4096), _MM_HINT_T1);  // one stream: the hardware prefetcher does the rest
    const __m512i pairs = _mm512_loadu_si512(line);  // lane i: s | z << 16 of row i
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)), z = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
    offset = _mm512_fmadd_ps(_mm512_fmadd_ps(s, _mm512_set1_ps(-8.0f), z), _mm512_set1_ps(in.group_sums[g]), offset);
    for (int64_t b = g * G / QBLOCK; b < (g + 1) * G / QBLOCK; ++b) {
      const uint8_t* chunk = line + 64 + (b - g * G / QBLOCK) * 8 * QBLOCK;
      const int32_t* qb = q + b * (QBLOCK / 4);
      __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
      for (int c = 0; c < QBLOCK / 8; c += 2, chunk += 128, qb += 4) {
        const __m512i w0 = _mm512_loadu_si512(chunk), w1 = _mm512_loadu_si512(chunk + 64);
        s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(w0, low), _mm512_set1_epi32(qb[0]));
        s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(w0, 4), low), _mm512_set1_epi32(qb[1]));
        s2 = _mm512_dpbusd_epi32(s2, _mm512_and_si512(w1, low), _mm512_set1_epi32(qb[2]));
        s3 = _mm512_dpbusd_epi32(s3, _mm512_and_si512(_mm512_srli_epi16(w1, 4), low), _mm512_set1_epi32(qb[3]));
      }
      const __m512i sums = _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(s, _mm512_set1_ps(in.d[b])), acc);
    }
  }
  _mm512_storeu_ps(out, _mm512_add_ps(acc, offset));
}
#endif

// ---------------------------------------------------------------- one block of weight rows
struct Matrices {
  Format fmt;
  int64_t N, K, group, row_bytes;
  std::vector<const char*> weights;
  std::vector<const uint16_t*> scales;  // bf16 bits: int8 [N], plain int4 [K/G, N, 2]; none for TILES
  bool integer_path;                    // int8/int4 through the quantized x
  bool tiles = false;                   // int4 as TILES
};

// scale, offset: int4's, for this block's first row (int4_block_scales).
template <int NR>
void dot_block(const Matrices& mats, int64_t m, int64_t n, const Input& in, const float* scale, const float* offset, float* dot) {
  const char* w = mats.weights[m] + n * mats.row_bytes;
  const int64_t ld = mats.row_bytes, K = mats.K;
#ifdef MOE_AVX512
  switch (mats.fmt) {
    case F32: return dot_float<F32, NR>(w, ld, K, in.x, dot);
    case F16: return dot_float<F16, NR>(w, ld, K, in.x, dot);
    case BF16: return dot_float<BF16, NR>(w, ld, K, in.x, dot);
    case INT8:
      if (mats.integer_path) return dot_int8<NR>(reinterpret_cast<const int8_t*>(w), ld, K, in, dot);
      break;
    case INT4:
      if (mats.integer_path) return dot_int4<NR>(reinterpret_cast<const uint8_t*>(w), ld, K, in, scale, offset, dot);
      break;
  }
#endif
  for (int i = 0; i < NR; ++i) {
    const char* row = w + i * ld;
    switch (mats.fmt) {
      case F32: dot[i] = dot_portable<F32>(row, K, in.x); break;
      case F16: dot[i] = dot_portable<F16>(row, K, in.x); break;
      case BF16: dot[i] = dot_portable<BF16>(row, K, in.x); break;
      case INT8: dot[i] = dot_portable<INT8>(row, K, in.x); break;
      case INT4: dot[i] = dot_int4_portable(reinterpret_cast<const uint8_t*>(row), K, mats.group, in, mats.scales[m], mats.N, n + i); break;
    }
  }
}

// ---------------------------------------------------------------- preparing x
// Where input k of K goes in the order the weights' nibbles meet x: plain int4 (dot_int4),
// within each 128 inputs the 64 even ones, then the 64 odd ones (a last block of 64 as its 32
// even, then its 32 odd); TILES (dot_int4_tile), within each 8 the 4 even, then the 4 odd; int8
// as it is.
inline int64_t position_of(int64_t k, int64_t K, const Matrices& mats) {
  if (mats.fmt != INT4) return k;
  if (mats.tiles) return k - k % 8 + (k % 2) * 4 + (k % 8) / 2;
  const int64_t paired = K - K % (2 * QBLOCK), span = k < paired ? 2 * QBLOCK : QBLOCK;
  const int64_t start = k < paired ? k - k % span : paired, within = k - start;
  return start + (within % 2) * (span / 2) + within / 2;
}

// Each input row's int8 copy: per block of 64 consecutive inputs d = max|x| / 127 and
// q = round(x / d), stored in position_of's order.
void quantize_rows(const float* x, int64_t rows, int64_t K, const Matrices& mats, int8_t* q, float* d, float* flip_correction) {
  for (int64_t r = 0; r < rows; ++r) {
    double correction = 0.0;
    for (int64_t b = 0; b < K / QBLOCK; ++b) {
      const float* block = x + r * K + b * QBLOCK;
      float largest = 0.0f;
      for (int64_t j = 0; j < QBLOCK; ++j) largest = std::max(largest, std::fabs(block[j]));
      const float scale = largest > 0 ? largest / 127.0f : 1.0f, inverse = 1.0f / scale;
      int64_t total = 0;
      for (int64_t j = 0; j < QBLOCK; ++j) {
        const auto value = static_cast<int8_t>(std::nearbyint(block[j] * inverse));
        const int64_t k = b * QBLOCK + j;
        q[r * K + position_of(k, K, mats)] = value;
        total += value;
      }
      d[r * (K / QBLOCK) + b] = scale;
      correction += 128.0 * scale * static_cast<double>(total);
    }
    flip_correction[r] = static_cast<float>(correction);
  }
}

Format format_of(const torch::Tensor& w, bool int4) {
  if (int4) return INT4;
  switch (w.scalar_type()) {
    case torch::kFloat: return F32;
    case torch::kHalf: return F16;
    case torch::kBFloat16: return BF16;
    case torch::kChar: return INT8;
    default: TORCH_CHECK(false, "cpu_gemv: weights of dtype ", w.scalar_type(), " are not supported");
  }
}

Matrices describe(const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& scales, int64_t K, int64_t group) {
  Matrices mats;
  const bool int4 = group > 0;
  mats.fmt = format_of(weights[0], int4);
  mats.tiles = int4 && weights[0].dim() == 3;
  mats.N = mats.tiles ? weights[0].size(0) * BLOCK_ROWS : weights[0].size(0);
  mats.K = K;
  mats.group = group;
  mats.row_bytes = !int4 ? K * static_cast<int64_t>(weights[0].element_size()) : mats.tiles ? K / 2 + 4 * (K / group) : K / 2;
  const bool quantized = mats.fmt == INT8 || mats.fmt == INT4;
  TORCH_CHECK(!int4 || (K % group == 0 && group % 2 == 0), "cpu_gemv: int4 needs an even group dividing K (", K, "), got ", group);
#ifdef MOE_AVX512
  mats.integer_path = quantized && K % QBLOCK == 0 && (!int4 || group % QBLOCK == 0);
#else
  mats.integer_path = false;  // the portable loop multiplies fp32 x: an int8 copy of it would go unread
#endif
  TORCH_CHECK(!mats.tiles || mats.integer_path, "cpu_gemv: int4 tiles need AVX512-VNNI and K (", K, ") and the group (", group,
              ") multiples of 64 (tiles_fit in moe_runtime/expert_format.py)");
  const std::vector<int64_t> shape = mats.tiles ? std::vector<int64_t>{mats.N / BLOCK_ROWS, K / group, 64 + 8 * group}
                                                : std::vector<int64_t>{mats.N, mats.row_bytes / weights[0].element_size()};
  for (size_t m = 0; m < weights.size(); ++m) {
    const auto& w = weights[m];
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.sizes().vec() == shape && format_of(w, int4) == mats.fmt &&
                    (!int4 || w.scalar_type() == torch::kByte),
                "cpu_gemv: matrix ", m, " is not a contiguous CPU ", c10::IntArrayRef(shape), " tensor of the first one's format (", mats.N, " x ", K,
                " weights)");
    mats.weights.push_back(static_cast<const char*>(w.data_ptr()));
    if (!quantized || mats.tiles) continue;  // TILES carry their scales
    TORCH_CHECK(m < scales.size() && scales[m].is_contiguous() && scales[m].scalar_type() == torch::kBFloat16 &&
                    scales[m].numel() == (int4 ? (K / group) * mats.N * 2 : mats.N),
                "cpu_gemv: matrix ", m, " needs its bf16 scales (int8 [N], int4 [K/G, N, 2])");
    mats.scales.push_back(static_cast<const uint16_t*>(scales[m].data_ptr()));
  }
  return mats;
}

}  // namespace

// out[0, r, n] = sum_m combine[m] out[m, r, n] in fp32: a decode step's weighted sum of its
// experts, rounded once (out: [M, R, N] fp32 -> [1, R, N]).
torch::Tensor combined(const torch::Tensor& out, const torch::Tensor& combine) {
  const int64_t M = out.size(0), cells = out.size(1) * out.size(2);
  TORCH_CHECK(combine.dim() == 1 && combine.size(0) == M, "cpu_gemv: combine needs one weight per matrix (", M, "), got ", combine.sizes());
  const torch::Tensor weights = combine.to(torch::kFloat).contiguous();
  const float* w = weights.data_ptr<float>();
  const float* ys = out.data_ptr<float>();
  auto sum = torch::zeros({1, out.size(1), out.size(2)}, out.options());
  float* acc = sum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < cells; ++i) acc[i] += w[m] * ys[m * cells + i];
  return sum;
}

// out [M, R, N] fp32 = x[a(m)] @ W_m^T for x [A, R, K] fp32, contiguous (A = 1: the same rows
// for every matrix, A = M: rows of their own).
torch::Tensor products_fp32(const torch::Tensor& x, const Matrices& mats) {
  const int64_t M = static_cast<int64_t>(mats.weights.size()), A = x.size(0), R = x.size(1), K = x.size(2);
  TORCH_CHECK(A == 1 || A == M, "cpu_gemv: x holds ", A, " blocks of rows for ", M, " matrices (need 1 or ", M, ")");
  const int64_t N = mats.N, inputs = A * R, group = mats.group;

  const float* xs = x.data_ptr<float>();
  torch::Tensor sums = group > 0 ? x.reshape({inputs, K / group, group}).sum(-1).contiguous() : torch::Tensor();
  std::vector<int8_t> q(mats.integer_path ? inputs * K : 0);
  std::vector<float> d(mats.integer_path ? inputs * (K / QBLOCK) : 0), correction(inputs, 0.0f);
  if (mats.integer_path) quantize_rows(xs, inputs, K, mats, q.data(), d.data(), correction.data());
  std::vector<Input> prepared(inputs);
  for (int64_t i = 0; i < inputs; ++i) {
    prepared[i].x = xs + i * K;
    if (group > 0) prepared[i].group_sums = sums.data_ptr<float>() + i * (K / group);
    if (mats.integer_path) {
      prepared[i].q = q.data() + i * K;
      prepared[i].d = d.data() + i * (K / QBLOCK);
      prepared[i].flip_correction = correction[i];
    }
  }

  auto out = torch::empty({M, R, N}, x.options());
  float* ys = out.data_ptr<float>();
  const int64_t blocks_per_matrix = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
  at::parallel_for(0, M * blocks_per_matrix, 1, [&](int64_t begin, int64_t end) {
    float dot[ROWS], offset[BLOCK_ROWS] = {};
    std::vector<float> scale(mats.fmt == INT4 && !mats.tiles ? (K / QBLOCK) * BLOCK_ROWS : 0);  // plain int4: the item's rows' scale per x block
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / blocks_per_matrix;
      const int64_t first = (item % blocks_per_matrix) * BLOCK_ROWS, last = std::min(N, first + BLOCK_ROWS);
      for (int64_t r = 0; r < R; ++r) {
        const Input& in = prepared[(A == 1 ? 0 : m) * R + r];
#ifdef MOE_AVX512
        if (mats.tiles) {  // an item is one tile of 16 rows
          dot_int4_tile(reinterpret_cast<const uint8_t*>(mats.weights[m]) + first * mats.row_bytes, K, mats.group, in, ys + (m * R + r) * N + first);
          continue;
        }
        if (mats.fmt == INT4 && mats.integer_path) int4_block_scales(mats.scales[m], N, first, last - first, K, mats.group, in, scale.data(), offset);
#endif
        for (int64_t n = first; n < last;) {
          const int64_t rows = (mats.fmt != INT8 && last - n >= ROWS) ? ROWS : 1, column = n - first;  // ROW_AT_A_TIME
          if (rows == ROWS) dot_block<ROWS>(mats, m, n, in, scale.data() + column, offset + column, dot);
          else dot_block<1>(mats, m, n, in, scale.data() + column, offset + column, dot);
          float* y = ys + (m * R + r) * N + n;
          for (int64_t i = 0; i < rows; ++i) y[i] = mats.fmt == INT8 ? dot[i] * bf16_to_float(mats.scales[m][n + i]) : dot[i];
          n += rows;
        }
      }
    }
  });
  return out;
}

// x as the products take it: a CPU [A, R, K] float tensor, in fp32.
torch::Tensor float_rows(const torch::Tensor& given) {
  TORCH_CHECK(given.dim() == 3 && given.is_floating_point() && given.device().is_cpu(), "cpu_gemv: x must be a CPU [A, R, K] float tensor");
  return given.to(torch::kFloat).contiguous();
}

// x [A, R, K] fp32, bf16 or fp16 (A = 1: the same rows for every matrix, A = M: rows of their
// own); weights: M tensors [N, K] (int4: [N, K/2] uint8, or TILES [N/16, K/G, 64 + 8G] uint8);
// scales: M tensors (int8: [N] bf16; plain int4: [K/G, N, 2] bf16; none otherwise); group:
// int4's G (0 otherwise); combine: none, or [M] weights to sum the products with. Returns
// [M, R, N] (combine: [1, R, N]) in x's dtype, accumulated in fp32. (Taking and giving the
// model's dtype spares a decode step two casts per call; each costs more than a small
// product's arithmetic.)
torch::Tensor gemv_many(torch::Tensor given, std::vector<torch::Tensor> weights, std::vector<torch::Tensor> scales, int64_t group,
                        std::optional<torch::Tensor> combine) {
  const torch::Tensor x = float_rows(given);
  TORCH_CHECK(!weights.empty(), "cpu_gemv: no matrices");
  const torch::Tensor out = products_fp32(x, describe(weights, scales, x.size(2), group));
  return (combine ? combined(out, *combine) : out).to(given.scalar_type());
}

// h [M, R, 2I] fp32 -> silu(h[.., :I]) * h[.., I:] [M, R, I] fp32: transformers' default gate
// (gate half first), without rounding between its ops.
torch::Tensor silu_gate(const torch::Tensor& h) {
  TORCH_CHECK(h.size(2) % 2 == 0, "cpu_gemv: the gate_up product's width ", h.size(2), " is odd");
  const int64_t rows = h.size(0) * h.size(1), I = h.size(2) / 2;
  auto out = torch::empty({h.size(0), h.size(1), I}, h.options());
  const float* hs = h.data_ptr<float>();
  float* os = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const float gate = hs[r * 2 * I + i];
      os[r * I + i] = gate / (1.0f + std::exp(-gate)) * hs[r * 2 * I + I + i];
    }
  return out;
}

// A decode step's experts in one call: x [1, R, H] through each of M experts (gate_up [2I, H]
// and down [H, I] in the formats gemv_many takes, int4 groups apart), the SiLU gate between
// the products in fp32, and the experts' outputs summed with `combine` [M]: [1, R, H] in x's
// dtype, rounded once.
torch::Tensor silu_experts(torch::Tensor given, std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> gate_up_scales,
                           int64_t gate_up_group, std::vector<torch::Tensor> down, std::vector<torch::Tensor> down_scales,
                           int64_t down_group, torch::Tensor combine) {
  const torch::Tensor x = float_rows(given);
  TORCH_CHECK(x.size(0) == 1 && !gate_up.empty() && gate_up.size() == down.size(), "cpu_gemv: one block of rows and as many down as gate_up matrices");
  const torch::Tensor gated = silu_gate(products_fp32(x, describe(gate_up, gate_up_scales, x.size(2), gate_up_group)));
  const torch::Tensor out = products_fp32(gated, describe(down, down_scales, gated.size(2), down_group));
  return combined(out, combine).to(given.scalar_type());
}

bool uses_avx512() {
#ifdef MOE_AVX512
  return true;
#else
  return false;
#endif
}

// Its functions in the extension's module (cpu_decode.cpp compiles this file in).
void bind_gemv(pybind11::module_& m) {
  m.def("gemv_many", &gemv_many, "out [M, R, N] = x[a(m)] @ W_m^T for M same-shaped matrices (decode on the CPU)", py::arg("x"), py::arg("weights"),
        py::arg("scales"), py::arg("group"), py::arg("combine") = py::none());
  m.def("silu_experts", &silu_experts, "sum_m combine[m] down_m(silu(gate) * up of gate_up_m(x)) for a decode step's experts", py::arg("x"),
        py::arg("gate_up"), py::arg("gate_up_scales"), py::arg("gate_up_group"), py::arg("down"), py::arg("down_scales"), py::arg("down_group"),
        py::arg("combine"));
  m.def("uses_avx512", &uses_avx512, "whether this build computes with AVX-512 (and VNNI)");
}
