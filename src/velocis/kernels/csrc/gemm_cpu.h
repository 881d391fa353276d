// The serial fp32 GEMM of gemm_cpu.cpp, for the other kernels that call it per block (attention).
#pragma once

#include <cstdint>

namespace velocis_gemm {

struct Mat {  // element (i, j) at p[i * rs + j * cs]
  const float* p;
  int64_t rs, cs;
};

// Built with AVX2 + FMA; otherwise gemm_serial must not be called.
bool supported();

// C[0:M, 0:N] (row stride ldc, columns contiguous) = alpha * A B + beta * C, on the calling thread.
void gemm_serial(int64_t M, int64_t N, int64_t K, float alpha, const Mat& A, const Mat& B, float beta, float* C,
                 int64_t ldc);

}  // namespace velocis_gemm
