// Causal self-attention for CPU training (fp32): forward and backward, GQA-aware.
//
// Reference: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).
// One (batch, head) at a time per thread: its scores for a block of 64 query rows (64 x T floats)
// stay in the core's cache between the QK^T gemm, the softmax and the PV gemm, and each gemm is one
// single-threaded BLAS call on whole [64, T] x [T, D] blocks (PyTorch's CPU flash kernel tiles
// keys too and pays per-tile overhead). Causality: a query block only multiplies the keys up to its
// last row. The backward recomputes the probabilities from the saved log-sum-exp (as flash
// attention does) and owns a whole kv head, so dK/dV of its query-head group accumulate without
// races.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Row-major C[M, N] = alpha * op(A) * op(B) + beta * C, through the column-major BLAS.
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  // C^T = op(B)^T op(A)^T in column-major terms: swap the operands, keep each one's flag
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&tB, &tA, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 4,
              name, " must be a contiguous fp32 CPU tensor [B, heads, T, D]");
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

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, double scale_) {
  check(q, "q"); check(k, "k"); check(v, "v");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(H % KV == 0 && k.size(2) == T && v.sizes() == k.sizes() && k.size(3) == D, "q/k/v shapes do not match");
  const int64_t G = H / KV;
  const float scale = static_cast<float>(scale_);
  auto o = at::empty_like(q);
  auto lse = at::empty({B, H, T}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = o.data_ptr<float>(), *lp = lse.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kRows * T);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, kvh = b * KV + (bh % H) / G;
      const float *Q = qp + bh * T * D, *K = kp + kvh * T * D, *V = vp + kvh * T * D;
      float *O = op + bh * T * D, *L = lp + bh * T;
      for (int64_t r0 = 0; r0 < T; r0 += kRows) {
        const int64_t m = std::min(kRows, T - r0), n = r0 + m;  // rows r0.., keys 0..n-1
        gemm_rm(false, true, m, n, D, scale, Q + r0 * D, D, K, D, 0.f, S.data(), n);
        for (int64_t i = 0; i < m; ++i) {
          float* row = S.data() + i * n;
          const int64_t len = r0 + i + 1;
          const float mx = *std::max_element(row, row + len);
          const float sum = exp_row(row, len, n, mx);
          const float inv = 1.f / sum;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) row[j] *= inv;
          L[r0 + i] = mx + std::log(sum);
        }
        gemm_rm(false, false, m, D, n, 1.f, S.data(), n, V, D, 0.f, O + r0 * D, D);
      }
    }
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
    const at::Tensor& dout, double scale_) {
  check(q, "q"); check(k, "k"); check(v, "v"); check(o, "o"); check(dout, "dout");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1), G = H / KV;
  const float scale = static_cast<float>(scale_);
  auto dq = at::empty_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *op = o.data_ptr<float>(), *lp = lse.data_ptr<float>(), *gp = dout.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> P(kRows * T), dS(kRows * T);
    for (int64_t bkv = begin; bkv < end; ++bkv) {
      const int64_t b = bkv / KV, kvh = bkv % KV;
      const float *K = kp + bkv * T * D, *V = vp + bkv * T * D;
      float *dK = dkp + bkv * T * D, *dV = dvp + bkv * T * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = b * H + kvh * G + g;
        const float *Q = qp + bh * T * D, *O = op + bh * T * D, *dO = gp + bh * T * D, *L = lp + bh * T;
        float* dQ = dqp + bh * T * D;
        for (int64_t r0 = 0; r0 < T; r0 += kRows) {
          const int64_t m = std::min(kRows, T - r0), n = r0 + m;
          gemm_rm(false, true, m, n, D, scale, Q + r0 * D, D, K, D, 0.f, P.data(), n);
          for (int64_t i = 0; i < m; ++i) exp_row(P.data() + i * n, r0 + i + 1, n, L[r0 + i]);
          gemm_rm(true, false, n, D, m, 1.f, P.data(), n, dO + r0 * D, D, 1.f, dV, D);  // dV += P^T dO
          gemm_rm(false, true, m, n, D, 1.f, dO + r0 * D, D, V, D, 0.f, dS.data(), n);  // dP = dO V^T
          for (int64_t i = 0; i < m; ++i) {
            const float *orow = O + (r0 + i) * D, *grow = dO + (r0 + i) * D;
            float di = 0.f;
#pragma omp simd reduction(+ : di)
            for (int64_t d = 0; d < D; ++d) di += orow[d] * grow[d];  // rowsum(dP * P) = rowsum(dO * O)
            float *srow = dS.data() + i * n;
            const float* prow = P.data() + i * n;
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) srow[j] = prow[j] * (srow[j] - di);
          }
          gemm_rm(false, false, m, D, n, scale, dS.data(), n, K, D, 0.f, dQ + r0 * D, D);  // dQ = dS K
          gemm_rm(true, false, n, D, m, scale, dS.data(), n, Q + r0 * D, D, 1.f, dK, D);  // dK += dS^T Q
        }
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(velocis_cpu, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dout, float scale)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(velocis_cpu, CPU, m) {
  m.impl("causal_attention_fwd", causal_attention_fwd);
  m.impl("causal_attention_bwd", causal_attention_bwd);
}
