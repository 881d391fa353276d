// Whole-model CPU decoding for dense Llama-shaped models (attention + SwiGLU MLP blocks), in one
// call per chunk of tokens: no Python and no per-op dispatch between the matmuls, which is what
// limits a small model's batch-1 decode in eager PyTorch (~3.5 ms of overhead per token at 125M).
//
// The reference it is held to is VelocisModel.forward (kernels/decode_cpu.py builds the plan;
// tests compare logits and greedy tokens). Weights stay in their stored form, read once per chunk:
//   F32 / BF16 / F16   float weights [rows, cols] (BF16/F16 widened to fp32 in registers)
//   Q8                 int8 codes [rows, cols], an fp32 scale per group of `group` columns
//   Q4                 4-bit codes u, fp32 s and s*z per group: w = s * (u - z)
// (the quantized layouts are described above rows_quant).
// Quantized matrices multiply int8 activations quantized per 32 columns with their own scale
// (llama.cpp's q8_0 x q8_0 and q4_0 x q8_0 scheme): maddubs does 32 multiply-adds per instruction,
// which is what makes int8/int4 decode faster than fp32, not just smaller.
//
// Threads: one OpenMP team (torch's own libgomp) for the whole chunk, splitting matrix rows and
// attention heads; the small serial parts (norms, RoPE, activation quantization) run in `single`
// sections between the implied barriers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <omp.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VELOCIS_AVX2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

enum Kind : int64_t { F32 = 0, BF16 = 1, F16 = 2, Q8 = 3, Q4 = 4 };
constexpr int64_t QBLOCK = 32;  // activation quantization block (and the Q4 nibble block)
constexpr int64_t TASK_ROWS = 16;  // rows per scheduled piece of a matrix

struct Mat {
  int64_t kind = F32, rows = 0, cols = 0, group = 0;
  const void* w = nullptr;
  const uint16_t* scales = nullptr;  // float16 bits, [ceil(rows / 4), groups, 4] (quantized kinds)
  const uint8_t* zeros = nullptr;    // zero points 0..15, same layout (Q4)
  bool exact = false;  // quantized kinds: fp32 activations (weight-only), not int8 per 32
  bool quantized() const { return kind == Q8 || kind == Q4; }
};

// Activation rows quantized for the integer kernels: codes, a scale per block, and scale * sum of
// the block's codes (Q4's zero-point correction reads it).
struct QRows {
  int64_t cols = 0;
  std::vector<int8_t> q;
  std::vector<float> d, dsum;
  void quantize(const float* x, int64_t T, int64_t n);
  const int8_t* codes(int64_t t) const { return q.data() + t * cols; }
  const float* scale(int64_t t) const { return d.data() + t * (cols / QBLOCK); }
  const float* scaled_sum(int64_t t) const { return dsum.data() + t * (cols / QBLOCK); }
};

void QRows::quantize(const float* x, int64_t T, int64_t n) {
  cols = n;
  const int64_t nb = n / QBLOCK;
  q.resize(T * n);
  d.resize(T * nb);
  dsum.resize(T * nb);
  for (int64_t b = 0; b < T * nb; ++b) {
    const float* xb = x + b * QBLOCK;
    float amax = 0.f;
    for (int64_t i = 0; i < QBLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float s = amax / 127.f, inv = s > 0.f ? 1.f / s : 0.f;
    int sum = 0;
    for (int64_t i = 0; i < QBLOCK; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * inv));
      q[b * QBLOCK + i] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = s;
    dsum[b] = s * static_cast<float>(sum);
  }
}

inline float widen(float v, int64_t) { return v; }
inline float widen(uint16_t h, int64_t kind) {
  if (kind == F16) return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#ifdef VELOCIS_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 load8(const float* p, int64_t) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p, int64_t kind) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (kind == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// 32 products of unsigned by signed bytes, summed in fours into 8 int32 lanes: one VNNI instruction
// where the CPU has it, else maddubs (pairs into int16; our codes never saturate it) + madd.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
// signed weights move their sign onto the activation first (|w| * (sign(w) x))
inline __m256 dot32_s8(__m256i w, __m256i x) {
  return _mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)));
}
inline __m256 dot32_u4(__m256i u, __m256i x) { return _mm256_cvtepi32_ps(dot_u8s8(u, x)); }  // codes 0..15
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
// Two 32-column blocks of signed bytes at once: 512-bit has no sign instruction, so |w| against x
// negated where w < 0 (activation codes are within +-127, so negating one never overflows).
inline __m512 dot64_s8(__m512i w, __m512i x) {
  const __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
  return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sx));
}
#endif
#endif

// ---- one matrix, rows [r0, r1), against T activation rows: out[t * ostride + r] -----------------

#ifdef VELOCIS_AVX2
// 4 weight rows x TT tokens of accumulators per register tile, so each weight vector is loaded (and
// widened) once for TT tokens: with several activation rows (a batch of decodes, a prefill chunk)
// a vector per multiply-add would make the loop load-bound at half the FMA rate.
#ifdef __AVX512F__
constexpr int TOKENS_PER_TILE = 4;  // 32 vector registers: 16 accumulators, 4 weights, an activation
#else
constexpr int TOKENS_PER_TILE = 2;  // 16: 8 accumulators, 4 weights, 2 activations
#endif

// One vector of weights or activations as fp32: 16 lanes with AVX512, else 8.
#ifdef __AVX512F__
using VecF = __m512;
constexpr int64_t LANES = 16;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
template <int64_t KIND> inline VecF vload_w(const float* p) { return _mm512_loadu_ps(p); }
template <int64_t KIND> inline VecF vload_w(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (KIND == F16) return _mm512_cvtph_ps(h);
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(VecF v) { return _mm512_reduce_add_ps(v); }
#else
using VecF = __m256;
constexpr int64_t LANES = 8;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
template <int64_t KIND> inline VecF vload_w(const float* p) { return _mm256_loadu_ps(p); }
template <int64_t KIND> inline VecF vload_w(const uint16_t* p) { return load8(p, KIND); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(VecF v) { return hsum(v); }
#endif

// GCC re-loads a vector from memory at every use rather than keep it in a register (a load is
// "cheap"), which makes this loop load-bound: an empty asm that claims to change them pins them.
inline void keep_in_register(VecF& a, VecF& b, VecF& c, VecF& d) {
#ifdef __AVX512F__
  asm("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d));
#else
  asm("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d));
#endif
}

template <int64_t KIND, typename W, int TT>
void tile4(const W* const w[4], const float* x, int64_t xstride, int64_t C, float* out, int64_t ostride,
           const W* next) {
  VecF acc[4][TT];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) acc[i][t] = vzero();
  int64_t c = 0;
  for (; c + LANES <= C; c += LANES) {
    VecF w0 = vload_w<KIND>(w[0] + c), w1 = vload_w<KIND>(w[1] + c), w2 = vload_w<KIND>(w[2] + c),
         w3 = vload_w<KIND>(w[3] + c);
    keep_in_register(w0, w1, w2, w3);
    if (next) {  // the next 4 rows (contiguous after these) on their way to L2 while we compute (to L1,
                 // the activations streaming through it would evict them before use)
      const char* n = reinterpret_cast<const char*>(next + 4 * c);
      for (int i = 0; i < 4; ++i) _mm_prefetch(n + i * 64, _MM_HINT_T1);
    }
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) {
      const VecF xv = vload(x + t * xstride + c);
      acc[0][t] = vfma(w0, xv, acc[0][t]);
      acc[1][t] = vfma(w1, xv, acc[1][t]);
      acc[2][t] = vfma(w2, xv, acc[2][t]);
      acc[3][t] = vfma(w3, xv, acc[3][t]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) {
      float s = vsum(acc[i][t]);
      for (int64_t k = c; k < C; ++k) s += widen(w[i][k], KIND) * x[t * xstride + k];
      out[t * ostride + i] = s;
    }
}

// Tokens [0, T) in tiles of MAX, then 2, then 1: tile(std::integral_constant<int, TT>{}, t, next),
// `next` (the following 4 weight rows to prefetch, or null) passed with the first tile only.
template <int MAX, typename P, typename F>
void token_tiles(int64_t T, const P* next, F&& tile) {
  int64_t t = 0;
  for (; t + MAX <= T; t += MAX, next = nullptr) tile(std::integral_constant<int, MAX>{}, t, next);
  if constexpr (MAX > 2)
    if (t + 2 <= T) tile(std::integral_constant<int, 2>{}, t, next), t += 2, next = nullptr;
  if (t < T) tile(std::integral_constant<int, 1>{}, t, next);
}

template <int64_t KIND, typename W>
void tiles4(const W* const w[4], int64_t T, const float* x, int64_t xstride, int64_t C, float* out,
            int64_t ostride, const W* next) {
  token_tiles<TOKENS_PER_TILE>(T, next, [&](auto tt, int64_t t, const W* pf) {
    tile4<KIND, W, decltype(tt)::value>(w, x + t * xstride, xstride, C, out + t * ostride, ostride, pf);
  });
}
#endif

template <typename W>
void rows_float(const Mat& m, int64_t T, const float* x, int64_t xstride, float* out, int64_t ostride,
                int64_t r0, int64_t r1) {
  const int64_t C = m.cols;
  const W* base = static_cast<const W*>(m.w);
  int64_t r = r0;
#ifdef VELOCIS_AVX2
  for (; r + 4 <= r1; r += 4) {
    const W* w[4] = {base + r * C, base + (r + 1) * C, base + (r + 2) * C, base + (r + 3) * C};
    const W* next = r + 8 <= m.rows ? w[3] + C : nullptr;
    if constexpr (std::is_same_v<W, float>) tiles4<F32, W>(w, T, x, xstride, C, out + r, ostride, next);
    else if (m.kind == F16) tiles4<F16, W>(w, T, x, xstride, C, out + r, ostride, next);
    else tiles4<BF16, W>(w, T, x, xstride, C, out + r, ostride, next);
  }
#endif
  for (; r < r1; ++r) {
    const W* wr = base + r * C;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * xstride;
      float s = 0.f;
      for (int64_t c = 0; c < C; ++c) s += widen(wr[c], m.kind) * xt[c];
      out[t * ostride + r] = s;
    }
  }
}

// Quantized layouts (kernels/decode_cpu.py packs them):
//   scales, zeros [ceil(rows / 4), groups, 4]: the 4 rows of a register block side by side; scales
//                 stay float16 and zero points bytes, as stored (a quarter of int4's bytes otherwise)
//   Q4 codes      per row, per pair of 32-column blocks, 32 bytes: byte j holds column j of the
//                 first block (low nibble) and of the second (high); an odd last block is 16 bytes,
//                 byte j holding its columns j (low) and j + 16 (high)
inline int64_t at4(int64_t r, int64_t g, int64_t ng) { return (r / 4 * ng + g) * 4 + r % 4; }
inline float scale_at(const Mat& m, int64_t r, int64_t g, int64_t ng) { return widen(m.scales[at4(r, g, ng)], F16); }
inline float szero_at(const Mat& m, int64_t r, int64_t g, int64_t ng) {  // scale * zero point
  return scale_at(m, r, g, ng) * static_cast<float>(m.zeros[at4(r, g, ng)]);
}
#ifdef VELOCIS_AVX2
inline __m128 scales4(const uint16_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline __m128 szeros4(const uint16_t* s, const uint8_t* z) {
  int32_t v;
  std::memcpy(&v, z, 4);
  return _mm_mul_ps(scales4(s), _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(v))));
}
#endif

inline int q4_code(const uint8_t* row, int64_t nb, int64_t c) {
  const int64_t b = c / QBLOCK, j = c % QBLOCK;
  if (b < nb / 2 * 2) {
    const uint8_t byte = row[(b / 2) * QBLOCK + j];
    return b % 2 ? byte >> 4 : byte & 15;
  }
  const uint8_t byte = row[b * (QBLOCK / 2) + j % 16];
  return j < 16 ? byte & 15 : byte >> 4;
}

// One quantized row against one quantized activation row: the portable reference of the SIMD loop.
float qdot_scalar(const Mat& m, int64_t r, const QRows& xq, int64_t t) {
  const int64_t nb = m.cols / QBLOCK, bpg = m.group / QBLOCK, ng = m.cols / m.group;
  const int8_t* xc = xq.codes(t);
  const float* xd = xq.scale(t);
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    int dot = 0;
    if (m.kind == Q8) {
      const int8_t* w = static_cast<const int8_t*>(m.w) + r * m.cols;
      for (int64_t i = b * QBLOCK; i < (b + 1) * QBLOCK; ++i) dot += w[i] * xc[i];
    } else {
      const uint8_t* w = static_cast<const uint8_t*>(m.w) + r * (m.cols / 2);
      for (int64_t i = b * QBLOCK; i < (b + 1) * QBLOCK; ++i) dot += q4_code(w, nb, i) * xc[i];
    }
    acc += static_cast<float>(dot) * xd[b] * scale_at(m, r, b / bpg, ng);
  }
  return acc;
}

#ifdef VELOCIS_AVX2
// The 32 codes of block b of a row, as bytes ready for maddubs (Q4: unsigned 0..15).
inline __m256i block_codes(const Mat& m, const void* row, int64_t b, int64_t nb) {
  if (m.kind == Q8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(row) + b * QBLOCK));
  const uint8_t* p = static_cast<const uint8_t*>(row);
  const __m256i low = _mm256_set1_epi8(0x0F);
  if (b < nb / 2 * 2) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (b / 2) * QBLOCK));
    return _mm256_and_si256(b % 2 ? _mm256_srli_epi16(raw, 4) : raw, low);
  }
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + b * (QBLOCK / 2)));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
}

inline __m256 block_dot(const Mat& m, __m256i w, __m256i x) { return m.kind == Q8 ? dot32_s8(w, x) : dot32_u4(w, x); }

// lane i of a [4 floats, same 4 floats] vector, broadcast to all 8 lanes
#define VELOCIS_LANE(v, i) _mm256_permute_ps(v, _MM_SHUFFLE(i, i, i, i))
#endif

void rows_quant(const Mat& m, int64_t T, const QRows& xq, float* out, int64_t ostride, int64_t r0, int64_t r1) {
  const int64_t nb = m.cols / QBLOCK, bpg = m.group / QBLOCK, ng = m.cols / m.group;
  const int64_t row_bytes = m.kind == Q8 ? m.cols : m.cols / 2;
  // Q4's zero points: sum_g s_g z_g * (sum over the group's blocks of d_b * sum(codes_b)), per t
  std::vector<float> zsum(m.kind == Q4 ? T * ng : 0, 0.f);
  for (int64_t t = 0; t < T && m.kind == Q4; ++t)
    for (int64_t b = 0; b < nb; ++b) zsum[t * ng + b / bpg] += xq.scaled_sum(t)[b];
  int64_t r = r0;
#ifdef VELOCIS_AVX2
  for (; r + 4 <= r1 && r % 4 == 0; r += 4) {
    const uint8_t* w0 = static_cast<const uint8_t*>(m.w) + r * row_bytes;
    const void* w[4] = {w0, w0 + row_bytes, w0 + 2 * row_bytes, w0 + 3 * row_bytes};
    const uint16_t* sc4 = m.scales + (r / 4) * ng * 4;
    for (int64_t t = 0; t < T; ++t) {
      const int8_t* xc = xq.codes(t);
      const float* xd = xq.scale(t);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      if (bpg == 1) {  // a scale per block: fold the activation's into the 4 rows' at once
        int64_t b = 0;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
        {  // two blocks per 512-bit step (Q4: the pair one load of 32 bytes holds)
          __m512 aw[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          const int64_t paired = m.kind == Q4 ? nb / 2 * 2 : nb;
          const __m512i low = _mm512_set1_epi8(0x0F);
          for (; b + 2 <= paired; b += 2) {
            const __m512i xv = _mm512_loadu_si512(xc + b * QBLOCK);
            const __m128 c0 = _mm_mul_ps(scales4(sc4 + b * 4), _mm_set1_ps(xd[b]));
            const __m128 c1 = _mm_mul_ps(scales4(sc4 + (b + 1) * 4), _mm_set1_ps(xd[b + 1]));
            const __m512 c = _mm512_castps256_ps512(_mm256_set_m128(c1, c0));  // rows' scales: block b, then b + 1
            for (int i = 0; i < 4; ++i) {
              __m512 dot;
              if (m.kind == Q8) {
                dot = dot64_s8(_mm512_loadu_si512(static_cast<const int8_t*>(w[i]) + b * QBLOCK), xv);
              } else {
                const __m256i raw = _mm256_loadu_si256(
                    reinterpret_cast<const __m256i*>(static_cast<const uint8_t*>(w[i]) + (b / 2) * QBLOCK));
                const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
                dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(both, low), xv));
              }
              // lanes 0-7 take row i's scale of block b, lanes 8-15 of block b + 1
              const __m512 ci = _mm512_permutexvar_ps(_mm512_set_epi32(4 + i, 4 + i, 4 + i, 4 + i, 4 + i, 4 + i, 4 + i, 4 + i,
                                                                       i, i, i, i, i, i, i, i), c);
              aw[i] = _mm512_fmadd_ps(dot, ci, aw[i]);
            }
          }
          for (int i = 0; i < 4; ++i)
            acc[i] = _mm256_add_ps(_mm512_castps512_ps256(aw[i]), _mm512_extractf32x8_ps(aw[i], 1));
        }
#endif
        for (; b < nb; ++b) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + b * QBLOCK));
          const __m128 c4 = _mm_mul_ps(scales4(sc4 + b * 4), _mm_set1_ps(xd[b]));
          const __m256 c8 = _mm256_set_m128(c4, c4);
          acc[0] = _mm256_fmadd_ps(block_dot(m, block_codes(m, w[0], b, nb), xv), VELOCIS_LANE(c8, 0), acc[0]);
          acc[1] = _mm256_fmadd_ps(block_dot(m, block_codes(m, w[1], b, nb), xv), VELOCIS_LANE(c8, 1), acc[1]);
          acc[2] = _mm256_fmadd_ps(block_dot(m, block_codes(m, w[2], b, nb), xv), VELOCIS_LANE(c8, 2), acc[2]);
          acc[3] = _mm256_fmadd_ps(block_dot(m, block_codes(m, w[3], b, nb), xv), VELOCIS_LANE(c8, 3), acc[3]);
        }
      } else {  // several blocks per scale: the activation scales first, the weight scale once per group
        for (int64_t g = 0; g < ng; ++g) {
          __m256 ga[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
          int64_t b = g * bpg;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
          if (m.kind == Q8) {  // two blocks per 512-bit step
            __m512 gw[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (; b + 2 <= (g + 1) * bpg; b += 2) {
              const __m512i xv = _mm512_loadu_si512(xc + b * QBLOCK);
              const __m512 d = _mm512_insertf32x8(_mm512_set1_ps(xd[b]), _mm256_set1_ps(xd[b + 1]), 1);
              for (int i = 0; i < 4; ++i) {
                const __m512i wv = _mm512_loadu_si512(static_cast<const int8_t*>(w[i]) + b * QBLOCK);
                gw[i] = _mm512_fmadd_ps(dot64_s8(wv, xv), d, gw[i]);
              }
            }
            for (int i = 0; i < 4; ++i)
              ga[i] = _mm256_add_ps(_mm512_castps512_ps256(gw[i]), _mm512_extractf32x8_ps(gw[i], 1));
          }
#endif
          for (; b < (g + 1) * bpg; ++b) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + b * QBLOCK));
            const __m256 d = _mm256_set1_ps(xd[b]);
            for (int i = 0; i < 4; ++i) ga[i] = _mm256_fmadd_ps(block_dot(m, block_codes(m, w[i], b, nb), xv), d, ga[i]);
          }
          const __m128 s4 = scales4(sc4 + g * 4);
          const __m256 s8 = _mm256_set_m128(s4, s4);
          acc[0] = _mm256_fmadd_ps(ga[0], VELOCIS_LANE(s8, 0), acc[0]);
          acc[1] = _mm256_fmadd_ps(ga[1], VELOCIS_LANE(s8, 1), acc[1]);
          acc[2] = _mm256_fmadd_ps(ga[2], VELOCIS_LANE(s8, 2), acc[2]);
          acc[3] = _mm256_fmadd_ps(ga[3], VELOCIS_LANE(s8, 3), acc[3]);
        }
      }
      __m128 res = _mm_setr_ps(hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3]));
      if (m.kind == Q4) {  // minus the 4 rows' zero-point terms, a group at a time
        const uint8_t* z4 = m.zeros + (r / 4) * ng * 4;
        for (int64_t g = 0; g < ng; ++g)
          res = _mm_fnmadd_ps(szeros4(sc4 + g * 4, z4 + g * 4), _mm_set1_ps(zsum[t * ng + g]), res);
      }
      float s[4];
      _mm_storeu_ps(s, res);
      for (int i = 0; i < 4; ++i) out[t * ostride + r + i] = s[i];
    }
  }
#endif
  for (; r < r1; ++r)
    for (int64_t t = 0; t < T; ++t) {
      float s = qdot_scalar(m, r, xq, t);
      if (m.kind == Q4)
        for (int64_t g = 0; g < ng; ++g) s -= szero_at(m, r, g, ng) * zsum[t * ng + g];
      out[t * ostride + r] = s;
    }
}

// Weight-only: fp32 activations against codes widened in registers, sum_c s (u_c - z) x_c =
// s * sum_c u_c x_c - s z * sum_c x_c per group. Equals the dequantizing reference up to fp32
// rounding (the integer path above trades that for fewer instructions).
#ifdef VELOCIS_AVX2
inline __m256 codes8(const Mat& m, const uint8_t* row, int64_t b, int64_t nb, int k) {  // columns 8k..8k+7 of block b
  if (m.kind == Q8)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b * QBLOCK + 8 * k))));
  const __m256i mask = _mm256_set1_epi32(15);
  if (b < nb / 2 * 2) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (b / 2) * QBLOCK + 8 * k)));
    return _mm256_cvtepi32_ps(_mm256_and_si256(b % 2 ? _mm256_srli_epi32(v, 4) : v, mask));
  }
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b * (QBLOCK / 2) + 8 * (k % 2))));
  return _mm256_cvtepi32_ps(_mm256_and_si256(k >= 2 ? _mm256_srli_epi32(v, 4) : v, mask));
}
#endif

void rows_wonly(const Mat& m, int64_t T, const float* x, int64_t xstride, float* out, int64_t ostride,
                int64_t r0, int64_t r1) {
  const int64_t nb = m.cols / QBLOCK, bpg = m.group / QBLOCK, ng = m.cols / m.group;
  const int64_t row_bytes = m.kind == Q8 ? m.cols : m.cols / 2;
  std::vector<float> gsum(m.kind == Q4 ? T * ng : 0, 0.f);  // sum of x per group, per t
  for (int64_t t = 0; t < T && m.kind == Q4; ++t)
    for (int64_t c = 0; c < m.cols; ++c) gsum[t * ng + c / m.group] += x[t * xstride + c];
  int64_t r = r0;
#ifdef VELOCIS_AVX2
  for (; r + 4 <= r1 && r % 4 == 0; r += 4) {
    const uint8_t* w0 = static_cast<const uint8_t*>(m.w) + r * row_bytes;
    const uint8_t* w[4] = {w0, w0 + row_bytes, w0 + 2 * row_bytes, w0 + 3 * row_bytes};
    const uint16_t* sc4 = m.scales + (r / 4) * ng * 4;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * xstride;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t g = 0; g < ng; ++g) {
        __m256 ga[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b)
          for (int k = 0; k < 4; ++k) {
            const __m256 xv = _mm256_loadu_ps(xt + b * QBLOCK + 8 * k);
            for (int i = 0; i < 4; ++i) ga[i] = _mm256_fmadd_ps(codes8(m, w[i], b, nb, k), xv, ga[i]);
          }
        const __m128 s4 = scales4(sc4 + g * 4);
        const __m256 s8 = _mm256_set_m128(s4, s4);
        acc[0] = _mm256_fmadd_ps(ga[0], VELOCIS_LANE(s8, 0), acc[0]);
        acc[1] = _mm256_fmadd_ps(ga[1], VELOCIS_LANE(s8, 1), acc[1]);
        acc[2] = _mm256_fmadd_ps(ga[2], VELOCIS_LANE(s8, 2), acc[2]);
        acc[3] = _mm256_fmadd_ps(ga[3], VELOCIS_LANE(s8, 3), acc[3]);
      }
      __m128 res = _mm_setr_ps(hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3]));
      if (m.kind == Q4) {
        const uint8_t* z4 = m.zeros + (r / 4) * ng * 4;
        for (int64_t g = 0; g < ng; ++g)
          res = _mm_fnmadd_ps(szeros4(sc4 + g * 4, z4 + g * 4), _mm_set1_ps(gsum[t * ng + g]), res);
      }
      float s[4];
      _mm_storeu_ps(s, res);
      for (int i = 0; i < 4; ++i) out[t * ostride + r + i] = s[i];
    }
  }
#endif
  for (; r < r1; ++r) {
    const uint8_t* row = static_cast<const uint8_t*>(m.w) + r * row_bytes;
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x + t * xstride;
      float s = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float dot = 0.f;
        for (int64_t c = g * m.group; c < (g + 1) * m.group; ++c)
          dot += (m.kind == Q8 ? static_cast<float>(reinterpret_cast<const int8_t*>(row)[c])
                               : static_cast<float>(q4_code(row, nb, c))) * xt[c];
        s += scale_at(m, r, g, ng) * dot;
        if (m.kind == Q4) s -= szero_at(m, r, g, ng) * gsum[t * ng + g];
      }
      out[t * ostride + r] = s;
    }
  }
}

void rows_any(const Mat& m, int64_t T, const float* x, int64_t xstride, const QRows* xq, float* out,
              int64_t ostride, int64_t r0, int64_t r1) {
  switch (m.kind) {
    case F32: rows_float<float>(m, T, x, xstride, out, ostride, r0, r1); break;
    case BF16:
    case F16: rows_float<uint16_t>(m, T, x, xstride, out, ostride, r0, r1); break;
    default:
      if (m.exact) rows_wonly(m, T, x, xstride, out, ostride, r0, r1);
      else rows_quant(m, T, *xq, out, ostride, r0, r1);
  }
}

// Several matrices reading the same input (q/k/v, gate/up), their rows split over the team as one
// list of tasks. Call inside a parallel region: every thread calls it (an `omp for`).
struct Product {
  const Mat* m;
  float* out;  // [T, ostride], this matrix's rows written at out[t * ostride + r]
  int64_t ostride;
};

void matvec_team(const std::vector<Product>& products, int64_t T, const float* x, int64_t xstride, const QRows* xq) {
  std::vector<int64_t> starts{0};  // task index where each product starts
  for (const auto& p : products) starts.push_back(starts.back() + (p.m->rows + TASK_ROWS - 1) / TASK_ROWS);
#pragma omp for schedule(static)
  for (int64_t task = 0; task < starts.back(); ++task) {
    size_t i = 0;
    while (task >= starts[i + 1]) ++i;
    const Product& p = products[i];
    const int64_t r0 = (task - starts[i]) * TASK_ROWS, r1 = std::min(p.m->rows, r0 + TASK_ROWS);
    rows_any(*p.m, T, x, xstride, xq, p.out, p.ostride, r0, r1);
  }
}

// ---- the model -------------------------------------------------------------------------------

struct Layer {
  const float *attn_norm, *mlp_norm, *q_bias, *k_bias, *v_bias, *q_norm, *k_norm;
  Mat q, k, v, o, gate, up, down;
};

struct Model {
  int64_t H, L, NH, NKV, D, I, V, max_len, embed_kind;
  float eps;
  std::vector<at::Tensor> keep;  // the tensors the pointers below point into
  const void* embed;
  const float* final_norm;
  Mat head;
  std::vector<Layer> layers;
};

const float* vec_or_null(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

Mat make_mat(const at::Tensor* ts, const int64_t* meta) {
  Mat m;
  m.kind = meta[0], m.rows = meta[1], m.cols = meta[2], m.group = meta[3];
  TORCH_CHECK(ts[0].is_contiguous(), "decode plan: weights must be contiguous");
  m.w = ts[0].data_ptr();
  if (m.quantized()) {
    TORCH_CHECK(m.cols % QBLOCK == 0 && m.group % QBLOCK == 0 && m.cols % m.group == 0,
                "decode plan: quantized columns and groups must be multiples of 32");
    TORCH_CHECK(ts[1].scalar_type() == at::kHalf && ts[1].numel(), "decode plan: scales must be float16");
    m.scales = reinterpret_cast<const uint16_t*>(ts[1].data_ptr<at::Half>());
    if (m.kind == Q4) {
      TORCH_CHECK(ts[2].scalar_type() == at::kByte && ts[2].numel() == ts[1].numel(), "decode plan: Q4 needs uint8 zero points");
      m.zeros = ts[2].data_ptr<uint8_t>();
    }
  }
  return m;
}

// tensors: embed, final_norm, head (w, scales, szs), then per layer: attn_norm, q/k/v/o (3 each),
// q/k/v bias, q/k norm, mlp_norm, gate/up/down (3 each) -- 28 per layer; empty tensor = absent.
// meta: H, L, NH, NKV, D, I, V, max_len, embed_kind, then 4 ints (kind, rows, cols, group) for the
// head and for each layer's q, k, v, o, gate, up, down.
constexpr int64_t PER_LAYER = 28, GLOBAL = 5, META = 9;

Model make_model(const std::vector<at::Tensor>& ts, const std::vector<int64_t>& meta, double eps) {
  Model md;
  md.H = meta[0], md.L = meta[1], md.NH = meta[2], md.NKV = meta[3], md.D = meta[4], md.I = meta[5];
  md.V = meta[6], md.max_len = meta[7], md.embed_kind = meta[8];
  md.eps = static_cast<float>(eps);
  md.keep = ts;
  TORCH_CHECK(static_cast<int64_t>(ts.size()) == GLOBAL + PER_LAYER * md.L, "decode plan: wrong tensor count");
  TORCH_CHECK(static_cast<int64_t>(meta.size()) == META + 4 * (1 + 7 * md.L), "decode plan: wrong meta length");
  md.embed = ts[0].data_ptr();
  md.final_norm = ts[1].data_ptr<float>();
  md.head = make_mat(&ts[2], &meta[META]);
  for (int64_t l = 0; l < md.L; ++l) {
    const at::Tensor* t = &ts[GLOBAL + l * PER_LAYER];
    const int64_t* mm = &meta[META + 4 + l * 28];
    Layer y;
    y.attn_norm = t[0].data_ptr<float>();
    y.q = make_mat(t + 1, mm), y.k = make_mat(t + 4, mm + 4), y.v = make_mat(t + 7, mm + 8);
    y.o = make_mat(t + 10, mm + 12);
    y.q_bias = vec_or_null(t[13]), y.k_bias = vec_or_null(t[14]), y.v_bias = vec_or_null(t[15]);
    y.q_norm = vec_or_null(t[16]), y.k_norm = vec_or_null(t[17]);
    y.mlp_norm = t[18].data_ptr<float>();
    y.gate = make_mat(t + 19, mm + 16), y.up = make_mat(t + 22, mm + 20), y.down = make_mat(t + 25, mm + 24);
    md.layers.push_back(y);
  }
  return md;
}

void rms_norm_rows(const float* x, const float* w, float* y, int64_t T, int64_t n, float eps) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * n;
    float ss = 0.f;
    for (int64_t j = 0; j < n; ++j) ss += xr[j] * xr[j];
    const float r = 1.f / std::sqrt(ss / n + eps);
    for (int64_t j = 0; j < n; ++j) y[t * n + j] = xr[j] * r * w[j];
  }
}

// rotate_half RoPE with full-width tables: out[i] = x[i] cos[i] - x[i+D/2] sin[i], and
// out[i+D/2] = x[i+D/2] cos[i+D/2] + x[i] sin[i+D/2]
void rope_head(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

bool any_quantized(std::initializer_list<const Mat*> ms) {
  for (const Mat* m : ms)
    if (m->quantized()) return true;
  return false;
}

// gate and up rows [r0, r1) together, then h = silu(gate) * up for those rows: the SwiGLU needs no
// pass (or barrier) of its own. Call inside a parallel region (an `omp for`).
void swiglu_team(const Mat& gate, const Mat& up, int64_t T, const float* x, int64_t xstride, const QRows* xq,
                 float* g, float* u, float* h) {
  const int64_t I = gate.rows, tasks = (I + TASK_ROWS - 1) / TASK_ROWS;
#pragma omp for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t r0 = task * TASK_ROWS, r1 = std::min(I, r0 + TASK_ROWS);
    rows_any(gate, T, x, xstride, xq, g, I, r0, r1);
    rows_any(up, T, x, xstride, xq, u, I, r0, r1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = r0; r < r1; ++r) {
        const float a = g[t * I + r];
        h[t * I + r] = a / (1.f + std::exp(-a)) * u[t * I + r];
      }
  }
}

// What each thread of the team keeps to itself: the residual stream and the normed, quantized
// inputs of the next product. Every thread computes these small vectors redundantly instead of
// one computing them while the others wait at two barriers.
struct Private {
  std::vector<float> x, xn, kr, qh, scores;
  QRows xq;
};

// Norm x into xn and quantize it if a consumer is quantized.
void prepare(Private& p, const float* w, int64_t T, int64_t H, float eps, bool quantized) {
  rms_norm_rows(p.x.data(), w, p.xn.data(), T, H, eps);
  if (quantized) p.xq.quantize(p.xn.data(), T, H);
}

// tokens [T] at positions start..start+T-1 -> logits of the last one [V]; writes k/v [L, NKV,
// slots, D] at those positions. Barriers per layer: after q/k/v, attention, o, gate/up, down.
// Plans are built once (decode_plan_new) and named by a handle: a step then passes no weight list
// through the dispatcher (~100 us per call for a 12-layer model's 341 tensors).
std::mutex plans_mutex;
std::unordered_map<int64_t, std::shared_ptr<const Model>> plans;
int64_t next_plan = 1;

int64_t decode_plan_new(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& meta, double eps) {
  auto md = std::make_shared<const Model>(make_model(tensors, meta, eps));
  std::lock_guard<std::mutex> lock(plans_mutex);
  plans[next_plan] = md;
  return next_plan++;
}

void decode_plan_free(int64_t handle) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  plans.erase(handle);
}

std::shared_ptr<const Model> plan_of(int64_t handle) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto it = plans.find(handle);
  TORCH_CHECK(it != plans.end(), "decode plan ", handle, " does not exist (freed?)");
  return it->second;
}

at::Tensor decode_chunk(int64_t plan, const at::Tensor& tokens, int64_t start, at::Tensor kcache, at::Tensor vcache,
                        const at::Tensor& cos, const at::Tensor& sin) {
  const std::shared_ptr<const Model> held = plan_of(plan);
  const Model& md = *held;
  const int64_t T = tokens.numel(), H = md.H, NH = md.NH, NKV = md.NKV, D = md.D, I = md.I;
  TORCH_CHECK(kcache.dim() == 4 && kcache.sizes() == vcache.sizes() && kcache.is_contiguous() &&
              vcache.is_contiguous() && kcache.scalar_type() == at::kFloat && vcache.scalar_type() == at::kFloat &&
              kcache.size(0) == md.L && kcache.size(1) == md.NKV && kcache.size(3) == md.D,
              "decode_chunk: caches must be contiguous fp32 [layers, kv_heads, slots, head_dim]");
  const int64_t slots = kcache.size(2);
  TORCH_CHECK(T > 0 && start >= 0 && start + T <= std::min(slots, cos.size(0)), "decode_chunk: positions ", start,
              "..", start + T - 1, " are outside the cache (", slots, " slots) or the model's context (",
              cos.size(0), ")");
  const int64_t QD = NH * D, KD = NKV * D, group = NH / NKV;
  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(tok[t] >= 0 && tok[t] < md.V, "decode_chunk: token id ", tok[t], " is outside the vocabulary");
  // shared: the products' outputs, each row written by one thread
  std::vector<float> q(T * QD), k(T * KD), v(T * KD), att(T * QD), tmp(T * H), gate(T * I), up(T * I),
      hidden(T * I), logits_f(md.V);
  float *K = kcache.data_ptr<float>(), *Vc = vcache.data_ptr<float>();
  const float *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int nt = std::max(1, at::get_num_threads());

#pragma omp parallel num_threads(nt)
  {
    Private p;
    p.x.resize(T * H), p.xn.resize(T * H), p.kr.resize(T * KD), p.qh.resize(D), p.scores.resize(start + T);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < H; ++j)
        p.x[t * H + j] = md.embed_kind == F32 ? static_cast<const float*>(md.embed)[tok[t] * H + j]
                                              : widen(static_cast<const uint16_t*>(md.embed)[tok[t] * H + j],
                                                      md.embed_kind);
    for (size_t l = 0; l < md.layers.size(); ++l) {
      const Layer& y = md.layers[l];
      const int64_t lk = static_cast<int64_t>(l) * NKV * slots * D;
      prepare(p, y.attn_norm, T, H, md.eps, any_quantized({&y.q, &y.k, &y.v}));
      matvec_team({{&y.q, q.data(), QD}, {&y.k, k.data(), KD}, {&y.v, v.data(), KD}}, T, p.xn.data(), H, &p.xq);
      // this chunk's keys, biased, normed and rotated (every thread its own copy); v in place is final
      for (int64_t t = 0; t < T; ++t) {
        float* kt = &p.kr[t * KD];
        std::memcpy(kt, &k[t * KD], KD * sizeof(float));
        if (y.k_bias) for (int64_t j = 0; j < KD; ++j) kt[j] += y.k_bias[j];
        if (y.k_norm) rms_norm_rows(kt, y.k_norm, kt, NKV, D, md.eps);
        for (int64_t h = 0; h < NKV; ++h) rope_head(kt + h * D, cs + (start + t) * D, sn + (start + t) * D, D);
      }
#pragma omp master
      for (int64_t t = 0; t < T; ++t)  // nobody reads these slots in this call: no barrier needed
        for (int64_t h = 0; h < NKV; ++h) {
          const int64_t at_slot = lk + (h * slots + start + t) * D;
          std::memcpy(K + at_slot, &p.kr[t * KD + h * D], D * sizeof(float));
          for (int64_t j = 0; j < D; ++j) Vc[at_slot + j] = v[t * KD + h * D + j] + (y.v_bias ? y.v_bias[h * D + j] : 0.f);
        }
#pragma omp for schedule(static) collapse(2)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < NH; ++h) {
          const int64_t pos = start + t, kvh = h / group;
          float* qh = p.qh.data();
          std::memcpy(qh, &q[t * QD + h * D], D * sizeof(float));
          if (y.q_bias) for (int64_t j = 0; j < D; ++j) qh[j] += y.q_bias[h * D + j];
          if (y.q_norm) rms_norm_rows(qh, y.q_norm, qh, 1, D, md.eps);
          rope_head(qh, cs + pos * D, sn + pos * D, D);
          // slots before the chunk from the cache, the chunk's own (up to this token) from kr / v
          auto key = [&](int64_t j) { return j < start ? K + lk + (kvh * slots + j) * D : &p.kr[(j - start) * KD + kvh * D]; };
          float mx = -INFINITY;
          for (int64_t j = 0; j <= pos; ++j) {
            const float* kj = key(j);
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < D; ++i) s += qh[i] * kj[i];
            p.scores[j] = s * scale;
            mx = std::max(mx, p.scores[j]);
          }
          float sum = 0.f;
          for (int64_t j = 0; j <= pos; ++j) sum += (p.scores[j] = std::exp(p.scores[j] - mx));
          float* o = &att[t * QD + h * D];
          std::fill(o, o + D, 0.f);
          for (int64_t j = 0; j <= pos; ++j) {
            const float pj = p.scores[j] / sum;
            if (j < start) {
              const float* vj = Vc + lk + (kvh * slots + j) * D;
#pragma omp simd
              for (int64_t i = 0; i < D; ++i) o[i] += pj * vj[i];
            } else {
              const float* vj = &v[(j - start) * KD + kvh * D];
              const float* vb = y.v_bias ? y.v_bias + kvh * D : nullptr;
              for (int64_t i = 0; i < D; ++i) o[i] += pj * (vj[i] + (vb ? vb[i] : 0.f));
            }
          }
        }
      if (y.o.quantized()) p.xq.quantize(att.data(), T, QD);
      matvec_team({{&y.o, tmp.data(), H}}, T, att.data(), QD, &p.xq);
      for (int64_t j = 0; j < T * H; ++j) p.x[j] += tmp[j];
      prepare(p, y.mlp_norm, T, H, md.eps, any_quantized({&y.gate, &y.up}));
      swiglu_team(y.gate, y.up, T, p.xn.data(), H, &p.xq, gate.data(), up.data(), hidden.data());
      if (y.down.quantized()) p.xq.quantize(hidden.data(), T, I);
      matvec_team({{&y.down, tmp.data(), H}}, T, hidden.data(), I, &p.xq);
      for (int64_t j = 0; j < T * H; ++j) p.x[j] += tmp[j];
    }
    rms_norm_rows(&p.x[(T - 1) * H], md.final_norm, p.xn.data(), 1, H, md.eps);
    if (md.head.quantized()) p.xq.quantize(p.xn.data(), 1, H);
    matvec_team({{&md.head, logits_f.data(), md.V}}, 1, p.xn.data(), H, &p.xq);
  }
  at::Tensor logits = at::empty({md.V}, at::kFloat);
  std::memcpy(logits.data_ptr<float>(), logits_f.data(), md.V * sizeof(float));
  return logits;
}

// ---- bf16 weights against bf16 activations (a bf16 model's inference) ------------------------
// With AVX512-BF16 one vdpbf16ps multiplies 32 bf16 pairs and adds them, in pairs, into 16 fp32
// lanes: twice the multiply-adds per instruction of widening the weights to fp32. Only where the
// activations are bf16 values already (a bf16 model's own): the batch-1 plan keeps fp32 activations.
constexpr int64_t BF16_ACTS = 5;  // matvec's kind for bf16 weights x bf16 activations

#if defined(__AVX512BF16__) && defined(__AVX512F__)
inline void keep_in_register_bh(__m512bh& a, __m512bh& b, __m512bh& c, __m512bh& d) {
  asm("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d));
}

template <int TT>
void tile4_bf16(const uint16_t* const w[4], const uint16_t* x, int64_t xstride, int64_t C, float* out,
                int64_t ostride, const uint16_t* next) {
  __m512 acc[4][TT];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) acc[i][t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w[0] + c), w1 = (__m512bh)_mm512_loadu_si512(w[1] + c),
             w2 = (__m512bh)_mm512_loadu_si512(w[2] + c), w3 = (__m512bh)_mm512_loadu_si512(w[3] + c);
    keep_in_register_bh(w0, w1, w2, w3);
    if (next) {  // as tile4: the next 4 rows to L2
      const char* n = reinterpret_cast<const char*>(next + 4 * c);
      for (int i = 0; i < 4; ++i) _mm_prefetch(n + i * 64, _MM_HINT_T1);
    }
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * xstride + c);
      acc[0][t] = _mm512_dpbf16_ps(acc[0][t], w0, xv);
      acc[1][t] = _mm512_dpbf16_ps(acc[1][t], w1, xv);
      acc[2][t] = _mm512_dpbf16_ps(acc[2][t], w2, xv);
      acc[3][t] = _mm512_dpbf16_ps(acc[3][t], w3, xv);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < 4; ++i) {
      float s = _mm512_reduce_add_ps(acc[i][t]);
      for (int64_t k = c; k < C; ++k) s += widen(w[i][k], BF16) * widen(x[t * xstride + k], BF16);
      out[t * ostride + i] = s;
    }
}

void rows_bf16(const Mat& m, int64_t T, const uint16_t* x, float* out, int64_t ostride, int64_t r0, int64_t r1) {
  const int64_t C = m.cols;
  const uint16_t* base = static_cast<const uint16_t*>(m.w);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const uint16_t* w[4] = {base + r * C, base + (r + 1) * C, base + (r + 2) * C, base + (r + 3) * C};
    const uint16_t* next = r + 8 <= m.rows ? w[3] + C : nullptr;
    token_tiles<TOKENS_PER_TILE>(T, next, [&](auto tt, int64_t t, const uint16_t* pf) {
      tile4_bf16<decltype(tt)::value>(w, x + t * C, C, C, out + t * ostride + r, ostride, pf);
    });
  }
  for (; r < r1; ++r)
    for (int64_t t = 0; t < T; ++t) {
      float s = 0.f;
      for (int64_t k = 0; k < C; ++k) s += widen(base[r * C + k], BF16) * widen(x[t * C + k], BF16);
      out[t * ostride + r] = s;
    }
}
#endif

// One matrix against rows x [T, cols] -> [T, rows]: the kernels alone, for tests and QuantLinear.
// exact: quantized weights against fp32 activations (weight-only, the reference's arithmetic).
at::Tensor matvec(const at::Tensor& x, int64_t kind, const at::Tensor& w, const at::Tensor& scales,
                  const at::Tensor& zeros, int64_t rows, int64_t cols, int64_t group, bool exact) {
  const bool bf16_acts = kind == BF16_ACTS;  // bf16 weights, activations that are bf16 values
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols && (x.scalar_type() == at::kFloat ||
                                                      (bf16_acts && x.scalar_type() == at::kBFloat16)),
              "matvec: x must be fp32 [T, ", cols, "] (or bf16 with kind ", BF16_ACTS, ")");
  if (bf16_acts) kind = BF16;
  const at::Tensor ts[3] = {w.contiguous(), scales, zeros};
  const int64_t meta[4] = {kind, rows, cols, group};
  Mat m = make_mat(ts, meta);
  m.exact = exact;
  const int64_t T = x.size(0);
  at::Tensor out = at::empty({T, rows}, at::kFloat);
  const int nt = std::max(1, at::get_num_threads());
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (bf16_acts) {
    const at::Tensor xb = x.to(at::kBFloat16).contiguous();  // exact: they are bf16 values
    const uint16_t* X = reinterpret_cast<const uint16_t*>(xb.data_ptr());
    const int64_t tasks = (rows + TASK_ROWS - 1) / TASK_ROWS;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t task = 0; task < tasks; ++task)
      rows_bf16(m, T, X, out.data_ptr<float>(), rows, task * TASK_ROWS, std::min(rows, (task + 1) * TASK_ROWS));
    return out;
  }
#endif
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  QRows xq;
  if (m.quantized() && !exact) xq.quantize(xc.data_ptr<float>(), T, cols);
#pragma omp parallel num_threads(nt)
  matvec_team({{&m, out.data_ptr<float>(), rows}}, T, xc.data_ptr<float>(), cols, &xq);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(velocis_cpu, m) {
  m.def("decode_plan_new(Tensor[] tensors, int[] meta, float eps) -> int", decode_plan_new);
  m.def("decode_plan_free(int plan) -> ()", decode_plan_free);
  m.def("decode_chunk(int plan, Tensor tokens, int start, Tensor(a!) kcache, Tensor(b!) vcache, Tensor cos, "
        "Tensor sin) -> Tensor");
  m.def("matvec(Tensor x, int kind, Tensor w, Tensor scales, Tensor zeros, int rows, int cols, int group, bool exact=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(velocis_cpu, CPU, m) {
  m.impl("decode_chunk", decode_chunk);
  m.impl("matvec", matvec);
}
