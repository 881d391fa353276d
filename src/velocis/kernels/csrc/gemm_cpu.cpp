// fp32 GEMM for AVX2 + FMA CPUs: C = alpha * A B + beta * C, any strides on A and B.
//
// Reference: torch.addmm (tests hold this to it). Why not MKL: at a small model's shapes (256-700
// deep, thousands of rows) this BLIS-style loop nest (Goto's algorithm) with a 6x16 register tile
// gets closer to the core's FMA peak than MKL's sgemm, and the matmuls are most of a small model's
// CPU training step (figures: benchmarks/RESULTS.md; kernels/gemm.py decides which products come here).
//
// Loop nest (BLIS naming): columns of B in NC blocks -> depth in KC blocks (pack B's KC x NC block
// as 16-column micro-panels) -> rows of A in MC blocks (pack as 6-row micro-panels, kept in L2)
// -> 16-column micro-panel -> 6-row micro-panel: the micro-kernel holds the 6x16 tile of C in 12
// ymm registers for the whole KC depth. Packing also does the transposes: A and B are read
// through their strides, so x W^T, dY^T X etc. need no copies. Threads split the output in two
// (rows or columns, whichever is longer), each running the serial nest with its own buffers: no
// barriers, and each C element sums in the same order for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "gemm_cpu.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VELOCIS_GEMM 1
#else
#define VELOCIS_GEMM 0
#endif

namespace velocis_gemm {

#if VELOCIS_GEMM

// KC: the depth of one pass. Depths up to 1024 go in one pass, the B micro-panel streaming from
// L2 (one pass ran faster than two at K = 512). Deeper
// products (the weight gradient, K = tokens) take passes of ~KC_DEEP, whose B block stays in L2.
constexpr int64_t MR = 6, NR = 16, KC = 1024, KC_DEEP = 256, MC = 120, NC = 3072;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// A per-thread 64-byte-aligned scratch buffer that only grows.
float* scratch(int slot, size_t floats) {
  thread_local std::unique_ptr<float, FreeDeleter> buf[2];
  thread_local size_t cap[2] = {0, 0};
  if (cap[slot] < floats) {
    buf[slot].reset(static_cast<float*>(std::aligned_alloc(64, ((floats * 4 + 63) / 64) * 64)));
    TORCH_CHECK(buf[slot], "velocis gemm: out of memory for a ", floats, "-float packing buffer");
    cap[slot] = floats;
  }
  return buf[slot].get();
}

// 8 rows of 8 floats -> their transpose, in place (r[j] becomes column j).
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// A[i0:i0+mc, p0:p0+kc] -> 6-row micro-panels, each kc x 6 (row index fastest), zero-padded rows.
// Packing A element by element was a large share of the time: row-major A (x in x W^T) goes
// through 8x8 register transposes, and each k's 6 values are stored as 8 floats, the next store
// overwriting the 2 spare ones (so `out` needs 2 floats of slack past the last panel).
void pack_a(const Mat& A, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* out) {
  for (int64_t i = 0; i < mc; i += MR, out += MR * kc) {
    const int64_t m = std::min(MR, mc - i);
    const float* src = A.p + (i0 + i) * A.rs + p0 * A.cs;
    int64_t k = 0;
    if (m == MR && A.cs == 1) {
      for (; k + 8 <= kc; k += 8) {
        __m256 r[8];
        for (int j = 0; j < MR; ++j) r[j] = _mm256_loadu_ps(src + j * A.rs + k);
        r[6] = r[7] = _mm256_setzero_ps();
        transpose8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (k + j) * MR, r[j]);
      }
    } else if (m == MR && A.rs == 1) {  // A = dY^T: each k's 6 values are contiguous
      for (; k + 1 < kc; ++k) _mm256_storeu_ps(out + k * MR, _mm256_loadu_ps(src + k * A.cs));
    }
    for (; k < kc; ++k) {
      for (int64_t r = 0; r < m; ++r) out[k * MR + r] = src[k * A.cs + r * A.rs];
      for (int64_t r = m; r < MR; ++r) out[k * MR + r] = 0.f;
    }
  }
}

// B[p0:p0+kc, j0:j0+nc] -> 16-column micro-panels, each kc x 16, zero-padded columns.
void pack_b(const Mat& B, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* out) {
  for (int64_t j = 0; j < nc; j += NR, out += NR * kc) {
    const int64_t n = std::min(NR, nc - j);
    const float* src = B.p + p0 * B.rs + (j0 + j) * B.cs;
    if (B.cs == 1 && n == NR) {
      for (int64_t k = 0; k < kc; ++k) std::memcpy(out + k * NR, src + k * B.rs, NR * sizeof(float));
    } else if (B.rs == 1) {  // B = W^T with W row-major: each column of B is a contiguous row of W
      int64_t k = 0;
      if (n == NR) {  // 8x8 register transposes, two per 8 steps of k
        for (; k + 8 <= kc; k += 8)
          for (int64_t c0 = 0; c0 < NR; c0 += 8) {
            __m256 r[8];
            for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(src + (c0 + c) * B.cs + k);
            transpose8(r);
            for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (k + j) * NR + c0, r[j]);
          }
      }
      for (int64_t c = 0; c < n; ++c) {
        const float* col = src + c * B.cs;
        for (int64_t kk = k; kk < kc; ++kk) out[kk * NR + c] = col[kk];
      }
      for (int64_t c = n; c < NR; ++c)
        for (int64_t kk = k; kk < kc; ++kk) out[kk * NR + c] = 0.f;
    } else {
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t c = 0; c < n; ++c) out[k * NR + c] = src[k * B.rs + c * B.cs];
        for (int64_t c = n; c < NR; ++c) out[k * NR + c] = 0.f;
      }
    }
  }
}

// C[6x16] tile = alpha * Ap Bp + beta * C (beta == 0: C is not read, so it may hold garbage).
// m x n is the part of the tile inside C.
inline void micro_kernel(int64_t kc, const float* __restrict Ap, const float* __restrict Bp, float* C, int64_t ldc,
                         int64_t m, int64_t n, float alpha, float beta) {
  // 12 named accumulators: as an array GCC keeps the tile in memory
  for (int r = 0; r < MR; ++r) {  // C's tile arrives while the k loop runs
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + NR - 1), _MM_HINT_T0);
  }
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(Bp), b1 = _mm256_load_ps(Bp + 8);
    __m256 a = _mm256_broadcast_ss(Ap);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(Ap + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(Ap + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(Ap + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(Ap + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(Ap + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
    Ap += MR;
    Bp += NR;
  }
  const __m256 c[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  if (m == MR && n == NR) {
    for (int r = 0; r < MR; ++r) {
      float* row = C + r * ldc;
      __m256 x0 = _mm256_mul_ps(va, c[r][0]), x1 = _mm256_mul_ps(va, c[r][1]);
      if (beta != 0.f) {
        x0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(row), x0);
        x1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(row + 8), x1);
      }
      _mm256_storeu_ps(row, x0);
      _mm256_storeu_ps(row + 8, x1);
    }
    return;
  }
  alignas(32) float tile[MR * NR];
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(tile + r * NR, c[r][0]);
    _mm256_store_ps(tile + r * NR + 8, c[r][1]);
  }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float* out = C + r * ldc + j;
      *out = alpha * tile[r * NR + j] + (beta != 0.f ? beta * *out : 0.f);
    }
}

// The serial loop nest on C[0:M, 0:N] (row stride ldc, columns contiguous).
void gemm_serial(int64_t M, int64_t N, int64_t K, float alpha, const Mat& A, const Mat& B, float beta, float* C,
                 int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // nothing to multiply: C = beta * C
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  float* bp = scratch(0, static_cast<size_t>(KC) * ((std::min(NC, N) + NR - 1) / NR * NR));
  float* ap = scratch(1, static_cast<size_t>(KC) * ((std::min(MC, M) + MR - 1) / MR * MR) + 8);
  // depth blocks of equal size: K = 1600 is 2 x 800, not 1024 + 576
  const int64_t kblocks = K <= KC ? 1 : (K + KC_DEEP - 1) / KC_DEEP, kstep = (K + kblocks - 1) / kblocks;
  for (int64_t j0 = 0; j0 < N; j0 += NC) {
    const int64_t nc = std::min(NC, N - j0);
    for (int64_t p0 = 0; p0 < K; p0 += kstep) {
      const int64_t kc = std::min(kstep, K - p0);
      const float b = p0 == 0 ? beta : 1.f;  // later depth blocks add to what the first wrote
      pack_b(B, p0, kc, j0, nc, bp);
      for (int64_t i0 = 0; i0 < M; i0 += MC) {
        const int64_t mc = std::min(MC, M - i0);
        pack_a(A, i0, mc, p0, kc, ap);
        // While this block computes, pull the next block's rows of A into L2, a few cache lines
        // before each kernel: packing them then reads L2, not memory (row-major A, e.g. the
        // activations in x W^T, where packing from memory was a visible share of the time).
        const int64_t next_rows = i0 + MC < M ? std::min(MC, M - i0 - MC) : 0;
        const bool by_row = A.cs == 1;  // else A = dY^T (A.rs == 1): k-strips of next_rows floats
        const int64_t strips = by_row ? next_rows : (A.rs == 1 && next_rows ? kc : 0);
        const int64_t strip_lines = by_row ? (kc + 15) / 16 : (next_rows + 15) / 16;
        const int64_t strip_stride = by_row ? A.rs : A.cs, lines = strips * strip_lines;
        const int64_t kernels = (nc + NR - 1) / NR * ((mc + MR - 1) / MR);
        const int64_t per_kernel = (lines + kernels - 1) / kernels;
        const float* next_a = A.p + (i0 + MC) * A.rs + p0 * A.cs;
        int64_t line = 0;
        for (int64_t j = 0; j < nc; j += NR)
          for (int64_t i = 0; i < mc; i += MR) {
            for (int64_t q = 0; q < per_kernel && line < lines; ++q, ++line)
              _mm_prefetch(
                  reinterpret_cast<const char*>(next_a + line / strip_lines * strip_stride + line % strip_lines * 16),
                  _MM_HINT_T1);
            micro_kernel(kc, ap + i * kc, bp + j * kc, C + (i0 + i) * ldc + j0 + j, ldc, std::min(MR, mc - i),
                         std::min(NR, nc - j), alpha, b);
          }
      }
    }
  }
}

#else

void gemm_serial(int64_t, int64_t, int64_t, float, const Mat&, const Mat&, float, float*, int64_t) {
  TORCH_CHECK(false, "velocis gemm_serial needs a CPU with AVX2 and FMA");
}

#endif  // VELOCIS_GEMM

bool supported() { return VELOCIS_GEMM; }

}  // namespace velocis_gemm

namespace {

using velocis_gemm::Mat;

Mat as_mat(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2, name,
              " must be a 2-D fp32 CPU tensor");
  return {t.data_ptr<float>(), t.stride(0), t.stride(1)};
}

// out = beta * out + alpha * a @ b, in place; out's columns contiguous. Threads split out's
// longer side into equal runs of whole register tiles.
at::Tensor gemm_(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
#if VELOCIS_GEMM
  using namespace velocis_gemm;
  const Mat A = as_mat(a, "a"), B = as_mat(b, "b");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 && out.stride(1) == 1,
              "out must be a 2-D fp32 CPU tensor with contiguous rows");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K && out.size(0) == M && out.size(1) == N, "gemm_: shapes ", a.sizes(), " @ ",
              b.sizes(), " -> ", out.sizes(), " do not match");
  float* C = out.data_ptr<float>();
  const int64_t ldc = out.stride(0);
  const bool split_rows = M >= N;
  const int64_t tile = split_rows ? MR : NR, len = split_rows ? M : N;
  const int64_t tiles = (len + tile - 1) / tile;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  const float fa = static_cast<float>(alpha), fb = static_cast<float>(beta);
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t s = std::min(len, tiles * p / parts * tile), e = std::min(len, tiles * (p + 1) / parts * tile);
      if (split_rows)
        gemm_serial(e - s, N, K, fa, Mat{A.p + s * A.rs, A.rs, A.cs}, B, fb, C + s * ldc, ldc);
      else
        gemm_serial(M, e - s, K, fa, A, Mat{B.p + s * B.cs, B.rs, B.cs}, fb, C + s, ldc);
    }
  });
  return out;
#else
  TORCH_CHECK(false, "velocis gemm_ needs a CPU with AVX2 and FMA (use torch.addmm)");
#endif
}

bool gemm_supported() { return velocis_gemm::supported(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(velocis_cpu, m) {
  m.def("gemm_(Tensor(a!) out, Tensor a, Tensor b, float beta=0., float alpha=1.) -> Tensor(a!)");
  m.def("gemm_supported() -> bool", gemm_supported);
}

TORCH_LIBRARY_IMPL(velocis_cpu, CPU, m) { m.impl("gemm_", gemm_); }
