// Causal self-attention for CPU training (fp32): forward and backward, GQA-aware.
//
// Reference: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).
// Tensors are [B, heads, T, D] with D contiguous and any other strides: the projections' own
// [B, T, heads, D] layout needs no copy, and outputs come back in it. Each thread takes one
// (batch, kv head) at a time with the G query heads that share it, stacked: the scores of a block
// of 64 query rows of all G heads (G*64 x T floats) stay in the core's cache between the QK^T gemm,
// the softmax and the PV gemm, and each gemm is one single-threaded BLAS call on [G*64, T] x
// [T, D] blocks (PyTorch's CPU flash kernel tiles keys too and pays per-tile overhead).
// Causality: a query block only multiplies the keys up to its last row. The backward recomputes
// the probabilities from the saved log-sum-exp (as flash attention does); owning a whole kv head,
// it accumulates dK/dV without races.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

// The Fortran BLAS entry point PyTorch's own CPU build exports (MKL's, on x86); the extension does
// not load without it and Velocis then uses SDPA.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr int64_t kRows = 64;  // query rows per block

// Row-major C[M, N] = alpha * op(A) * op(B) + beta * C, single-threaded (each thread owns a block):
// csrc/gemm_cpu.cpp's loop nest where it is built (AVX2 + FMA), else the column-major BLAS.
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (velocis_gemm::supported()) {
    const velocis_gemm::Mat a = ta ? velocis_gemm::Mat{A, 1, lda} : velocis_gemm::Mat{A, lda, 1};
    const velocis_gemm::Mat b = tb ? velocis_gemm::Mat{B, 1, ldb} : velocis_gemm::Mat{B, ldb, 1};
    velocis_gemm::gemm_serial(M, N, K, alpha, a, b, beta, C, ldc);
    return;
  }
  // C^T = op(B)^T op(A)^T in column-major terms: swap the operands, keep each one's flag
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&tB, &tA, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

// A [B, heads, T, D] fp32 CPU tensor whose D is contiguous: the layout the projections produce,
// [B, T, heads, D], seen through transpose(1, 2), is taken as it is (a row stride, no copy).
struct Heads {
  float* p;
  int64_t sb, sh, st;
  float* at(int64_t b, int64_t h) const { return p + b * sb + h * sh; }
};

Heads view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.stride(3) == 1, name,
              " must be an fp32 CPU tensor [B, heads, T, D] with D contiguous");
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// An output laid out as [B, T, heads, D] (what the output projection reads without a copy),
// returned as its [B, heads, T, D] view.
at::Tensor new_heads(const at::Tensor& like, bool zero) {
  auto opts = like.options();
  const int64_t B = like.size(0), H = like.size(1), T = like.size(2), D = like.size(3);
  auto t = zero ? at::zeros({B, T, H, D}, opts) : at::empty({B, T, H, D}, opts);
  return t.transpose(1, 2);
}

// row[0:len] <- exp(row[0:len] - shift), row[len:n] <- 0; returns the sum of the exps.
inline float exp_row(float* row, int64_t len, int64_t n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < len; ++j) {
    float e = std::exp(row[j] - shift);
    row[j] = e;
    sum += e;
  }
  std::fill(row + len, row + n, 0.f);
  return sum;
}

// The G query heads that share a kv head, rows r0..r0+m-1 of each, stacked into one [G*m, D]
// block (row g*m + i = head g, position r0 + i): one gemm against that kv head's K or V instead
// of G gemms half the height, which MKL runs faster at these small sizes.
inline void stack_rows(const Heads& X, int64_t b, int64_t h0, int64_t G, int64_t r0, int64_t m, int64_t D,
                       float* out) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < m; ++i) std::copy_n(X.at(b, h0 + g) + (r0 + i) * X.st, D, out + (g * m + i) * D);
}

inline void unstack_rows(const float* in, const Heads& X, int64_t b, int64_t h0, int64_t G, int64_t r0, int64_t m,
                         int64_t D) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < m; ++i) std::copy_n(in + (g * m + i) * D, D, X.at(b, h0 + g) + (r0 + i) * X.st);
}

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, double scale_) {
  const Heads Q = view(q, "q"), K = view(k, "k"), V = view(v, "v");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(H % KV == 0 && k.size(2) == T && v.sizes() == k.sizes() && k.size(3) == D, "q/k/v shapes do not match");
  const int64_t G = H / KV;
  const float scale = static_cast<float>(scale_);
  auto o = new_heads(q, false);
  auto lse = at::empty({B, H, T}, q.options());
  const Heads O = view(o, "o");
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(G * kRows * T), Qs(G * kRows * D), Os(G * kRows * D);
    for (int64_t bkv = begin; bkv < end; ++bkv) {
      const int64_t b = bkv / KV, kvh = bkv % KV, h0 = kvh * G;
      const float *Kp = K.at(b, kvh), *Vp = V.at(b, kvh);
      for (int64_t r0 = 0; r0 < T; r0 += kRows) {
        const int64_t m = std::min(kRows, T - r0), n = r0 + m;  // rows r0.. of each head, keys 0..n-1
        stack_rows(Q, b, h0, G, r0, m, D, Qs.data());
        gemm_rm(false, true, G * m, n, D, scale, Qs.data(), D, Kp, K.st, 0.f, S.data(), n);
        for (int64_t g = 0; g < G; ++g) {
          float* L = lp + (b * H + h0 + g) * T + r0;
          for (int64_t i = 0; i < m; ++i) {
            float* row = S.data() + (g * m + i) * n;
            const int64_t len = r0 + i + 1;
            const float mx = *std::max_element(row, row + len);
            const float sum = exp_row(row, len, n, mx);
            const float inv = 1.f / sum;
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) row[j] *= inv;
            L[i] = mx + std::log(sum);
          }
        }
        gemm_rm(false, false, G * m, D, n, 1.f, S.data(), n, Vp, V.st, 0.f, Os.data(), D);
        unstack_rows(Os.data(), O, b, h0, G, r0, m, D);
      }
    }
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
    const at::Tensor& dout, double scale_) {
  const Heads Q = view(q, "q"), K = view(k, "k"), V = view(v, "v"), O = view(o, "o"), dO = view(dout, "dout");
  TORCH_CHECK(lse.is_contiguous(), "lse must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1), G = H / KV;
  const float scale = static_cast<float>(scale_);
  auto dq = new_heads(q, false);
  auto dk = new_heads(k, true);
  auto dv = new_heads(v, true);
  const Heads dQ = view(dq, "dq"), dK = view(dk, "dk"), dV = view(dv, "dv");
  const float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    const int64_t R = G * kRows;
    std::vector<float> P(R * T), dS(R * T), Qs(R * D), dOs(R * D), dQs(R * D);
    for (int64_t bkv = begin; bkv < end; ++bkv) {
      const int64_t b = bkv / KV, kvh = bkv % KV, h0 = kvh * G;
      const float *Kp = K.at(b, kvh), *Vp = V.at(b, kvh);
      float *dKp = dK.at(b, kvh), *dVp = dV.at(b, kvh);
      for (int64_t r0 = 0; r0 < T; r0 += kRows) {
        const int64_t m = std::min(kRows, T - r0), n = r0 + m, M = G * m;
        stack_rows(Q, b, h0, G, r0, m, D, Qs.data());
        stack_rows(dO, b, h0, G, r0, m, D, dOs.data());
        gemm_rm(false, true, M, n, D, scale, Qs.data(), D, Kp, K.st, 0.f, P.data(), n);
        for (int64_t g = 0; g < G; ++g) {
          const float* L = lp + (b * H + h0 + g) * T + r0;
          for (int64_t i = 0; i < m; ++i) exp_row(P.data() + (g * m + i) * n, r0 + i + 1, n, L[i]);
        }
        gemm_rm(true, false, n, D, M, 1.f, P.data(), n, dOs.data(), D, 1.f, dVp, dV.st);  // dV += P^T dO
        gemm_rm(false, true, M, n, D, 1.f, dOs.data(), D, Vp, V.st, 0.f, dS.data(), n);  // dP = dO V^T
        for (int64_t r = 0; r < M; ++r) {  // row r = head h0 + r / m, position r0 + r % m
          const float *orow = O.at(b, h0 + r / m) + (r0 + r % m) * O.st, *grow = dOs.data() + r * D;
          float di = 0.f;
#pragma omp simd reduction(+ : di)
          for (int64_t d = 0; d < D; ++d) di += orow[d] * grow[d];  // rowsum(dP * P) = rowsum(dO * O)
          float* srow = dS.data() + r * n;
          const float* prow = P.data() + r * n;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) srow[j] = prow[j] * (srow[j] - di);
        }
        gemm_rm(false, false, M, D, n, scale, dS.data(), n, Kp, K.st, 0.f, dQs.data(), D);  // dQ = dS K
        unstack_rows(dQs.data(), dQ, b, h0, G, r0, m, D);
        gemm_rm(true, false, n, D, M, scale, dS.data(), n, Qs.data(), D, 1.f, dKp, dK.st);  // dK += dS^T Q
      }
    }
  });
  return {dq, dk, dv};
}

// bf16 / fp16 key and value slots widened to fp32 as they are read
inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen(c10::Half v) { return static_cast<float>(v); }

// One query token per row against that row's first lens[r] keys (the inference engine's batched
// decodes over its working copy): q [R, H, D] fp32, k/v [R, KV, S, D] (fp32, bf16 or fp16, read as
// stored) with D contiguous and any other strides, lens [R] -> [R, H, D] fp32. Reference: SDPA with
// -inf past each row's length. Each task is one (row, kv head): every key and value row is read once
// for the G query heads that share it, and nothing past the row's length is touched (SDPA over the
// padded copy reads it all).
template <typename T>
void decode_attention_impl(const float* Q, const T* K, const T* V, const int64_t* len, float* O, int64_t R,
                           int64_t H, int64_t KV, int64_t D, const int64_t* ks, const int64_t* vs, float sc) {
  const int64_t G = H / KV;
  at::parallel_for(0, R * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, kf(D), vf(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / KV, h = task % KV, n = len[r];
      const T* kr = K + r * ks[0] + h * ks[1];
      const T* vr = V + r * vs[0] + h * vs[1];
      const float* qg = Q + (r * H + h * G) * D;
      float* og = O + (r * H + h * G) * D;
      p.assign(G * n, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const T* kj = kr + j * ks[2];
        for (int64_t i = 0; i < D; ++i) kf[i] = widen(kj[i]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qh = qg + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < D; ++i) s += qh[i] * kf[i];
          p[g * n + j] = s * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* pg = &p[g * n];
        const float mx = *std::max_element(pg, pg + n);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (pg[j] = std::exp(pg[j] - mx));
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) pg[j] *= inv;
        std::fill(og + g * D, og + (g + 1) * D, 0.f);
      }
      for (int64_t j = 0; j < n; ++j) {
        const T* vj = vr + j * vs[2];
        for (int64_t i = 0; i < D; ++i) vf[i] = widen(vj[i]);
        for (int64_t g = 0; g < G; ++g) {
          float* oh = og + g * D;
          const float pj = p[g * n + j];
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) oh[i] += pj * vf[i];
        }
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(3) && q.size(1) % k.size(1) == 0,
              "decode_attention: q [R, H, D], k/v [R, KV, S, D]");
  const auto kt = k.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat && v.scalar_type() == kt &&
                  (kt == at::kFloat || kt == at::kBFloat16 || kt == at::kHalf) && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: q fp32, k/v one of fp32/bf16/fp16, D contiguous");
  const at::Tensor qc = q.contiguous(), lc = lens.to(at::kLong).contiguous();
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), S = k.size(2);
  const int64_t* len = lc.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(len[r] >= 1 && len[r] <= S, "decode_attention: lens in [1, S]");
  at::Tensor out = at::empty({R, H, D}, q.options());
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float sc = static_cast<float>(scale);
  const float* Q = qc.data_ptr<float>();
  float* O = out.data_ptr<float>();
  if (kt == at::kFloat)
    decode_attention_impl(Q, k.data_ptr<float>(), v.data_ptr<float>(), len, O, R, H, KV, D, ks, vs, sc);
  else if (kt == at::kBFloat16)
    decode_attention_impl(Q, k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), len, O, R, H, KV, D, ks, vs, sc);
  else
    decode_attention_impl(Q, k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>(), len, O, R, H, KV, D, ks, vs, sc);
  return out;
}

}  // namespace

TORCH_LIBRARY(velocis_cpu, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dout, float scale)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(velocis_cpu, CPU, m) {
  m.impl("causal_attention_fwd", causal_attention_fwd);
  m.impl("causal_attention_bwd", causal_attention_bwd);
  m.impl("decode_attention", decode_attention);
}
