// One-pass CPU kernels for the element-wise work around the matmuls (fp32).
//
// Each replaces a chain of PyTorch ops that each read and write a whole activation: RMSNorm
// forward/backward, SwiGLU forward/backward, the rotary embedding and the cross-entropy gradient
// of a chunk of logits. References: kernels/rms_norm.py, kernels/swiglu.py, kernels/rope.py,
// kernels/linear_cross_entropy.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous fp32 CPU tensor");
}

// --- RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) ----------------------------------
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "x"); check_rows(w, "weight");
  const int64_t H = x.size(-1), N = x.numel() / H;
  auto y = at::empty_like(x);
  auto rstd = at::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = xp + i * H;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) ss += xr[j] * xr[j];
      const float r = 1.f / std::sqrt(ss / H + static_cast<float>(eps));
      rp[i] = r;
      float* yr = yp + i * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) yr[j] = xr[j] * r * wp[j];
    }
  });
  return {y, rstd};
}

// dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), dw = sum over rows of dy * xhat
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                                const at::Tensor& rstd) {
  check_rows(dy, "dy"); check_rows(x, "x"); check_rows(w, "weight"); check_rows(rstd, "rstd");
  const int64_t H = x.size(-1), N = x.numel() / H;
  auto dx = at::empty_like(x);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  auto partial = at::zeros({chunks, H}, x.options());  // per-chunk dw: no races, fixed summation order
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  const int64_t per = (N + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float* dw = pp + c * H;
      for (int64_t i = c * per; i < std::min(N, (c + 1) * per); ++i) {
        const float *dyr = dyp + i * H, *xr = xp + i * H;
        const float r = rp[i];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < H; ++j) {
          dot += dyr[j] * wp[j] * xr[j];
          dw[j] += dyr[j] * xr[j] * r;
        }
        const float m = dot * r / H;  // mean(dxhat * xhat)
        float* dxr = dxp + i * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) dxr[j] = r * (dyr[j] * wp[j] - xr[j] * r * m);
      }
    }
  });
  return {dx, partial.sum(0)};
}

// --- SwiGLU: h = silu(g) * u --------------------------------------------------------------------
at::Tensor swiglu_fwd(const at::Tensor& g, const at::Tensor& u) {
  check_rows(g, "gate"); check_rows(u, "up");
  TORCH_CHECK(g.sizes() == u.sizes(), "gate and up must have one shape");
  auto h = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, g.numel(), 4096, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) hp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i];
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& dh, const at::Tensor& g, const at::Tensor& u) {
  check_rows(dh, "dh"); check_rows(g, "gate"); check_rows(u, "up");
  auto dg = at::empty_like(g);
  auto du = at::empty_like(u);
  const float *dp = dh.data_ptr<float>(), *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
  at::parallel_for(0, g.numel(), 4096, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      const float s = 1.f / (1.f + std::exp(-gp[i]));
      dup[i] = dp[i] * gp[i] * s;
      dgp[i] = dp[i] * up[i] * s * (1.f + gp[i] * (1.f - s));
    }
  });
  return {dg, du};
}

// --- Rotary embedding: out1 = x1*c - x2*s, out2 = x2*c + x1*s (halves of each head vector) ------
// x [B, heads, T, D] with D contiguous and any other strides (the projections' [B, T, heads, D]
// seen through a transpose); out has x's layout. c, s [T, D/2]. inverse rotates by -angle: the
// backward. One pass instead of PyTorch's four strided half-width ops.
at::Tensor rope(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s, bool inverse) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && x.stride(3) == 1,
              "x must be an fp32 CPU tensor [B, heads, T, D] with D contiguous");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && c.dim() == 2 && c.size(0) == T && c.size(1) == half && c.sizes() == s.sizes() &&
                  c.stride(1) == 1 && s.stride(1) == 1 && c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat,
              "cos/sin must be fp32 [T, D/2] tables with unit column stride");
  auto out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xb = x.stride(0), xh = x.stride(1), xt = x.stride(2);
  const int64_t ob = out.stride(0), oh = out.stride(1), ot = out.stride(2), cs = c.stride(0), ss = s.stride(0);
  const float sign = inverse ? -1.f : 1.f;
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const float *cr = cp + t * cs, *sr = sp + t * ss;
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = xp + b * xb + h * xh + t * xt;
        float* orow = op + b * ob + h * oh + t * ot;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = xr[j], x2 = xr[j + half], cj = cr[j], sj = sign * sr[j];
          orow[j] = x1 * cj - x2 * sj;
          orow[j + half] = x2 * cj + x1 * sj;
        }
      }
    }
  });
  return out;
}

// --- Cross-entropy of a chunk of logits, and their gradient in place ----------------------------
// Logits come vocab-major, zt [V, N] (column i is row i's logits): the layout the output
// projection's matmuls run fastest in at a small hidden size. Column i: loss_i = logsumexp(z_i) -
// z_i[t_i]; z_i <- (softmax(z_i) - onehot(t_i)) * scale. Columns whose target is ignore_index get
// loss 0 and gradient 0. Returns the summed loss. Columns go W at a time (a cache line of each
// vocab row): a max pass, an exp pass that keeps the exps, and a scaling pass.
template <int64_t W>
void xent_cols_block(float* z, int64_t V, int64_t N, const int64_t* tp, int64_t ignore_index, float scale,
                     double* loss) {
  float mx[W], sum[W], mul[W];
  for (int64_t j = 0; j < W; ++j) mx[j] = -INFINITY, sum[j] = 0.f;
  for (int64_t v = 0; v < V; ++v) {
    const float* row = z + v * N;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) mx[j] = std::max(mx[j], row[j]);
  }
  for (int64_t j = 0; j < W; ++j)
    if (tp[j] != ignore_index) loss[j] = -static_cast<double>(z[tp[j] * N + j]);  // - z_target, before overwrite
  for (int64_t v = 0; v < V; ++v) {
    float* row = z + v * N;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const float ex = std::exp(row[j] - mx[j]);
      row[j] = ex;
      sum[j] += ex;
    }
  }
  for (int64_t j = 0; j < W; ++j) {
    const bool ignored = tp[j] == ignore_index;
    mul[j] = ignored ? 0.f : scale / sum[j];
    if (!ignored) loss[j] += static_cast<double>(mx[j] + std::log(sum[j]));
  }
  for (int64_t v = 0; v < V; ++v) {
    float* row = z + v * N;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) row[j] *= mul[j];
  }
  for (int64_t j = 0; j < W; ++j)
    if (tp[j] != ignore_index) z[tp[j] * N + j] -= scale;
}

double xent_grad_cols_(at::Tensor& zt, const at::Tensor& targets, int64_t ignore_index, double scale) {
  check_rows(zt, "logits");
  const int64_t V = zt.size(0), N = zt.size(1);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == N,
              "targets must be a contiguous int64 tensor with one entry per logits column");
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < V), "target ", tp[i], " is out of range for ", V,
                " classes");
  constexpr int64_t W = 16;
  float* zp = zt.data_ptr<float>();
  std::vector<double> col_loss(N, 0.0);
  at::parallel_for(0, N / W, 1, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk)
      xent_cols_block<W>(zp + blk * W, V, N, tp + blk * W, ignore_index, static_cast<float>(scale),
                         col_loss.data() + blk * W);
  });
  for (int64_t c = N / W * W; c < N; ++c)  // the last N % W columns, one at a time
    xent_cols_block<1>(zp + c, V, N, tp + c, ignore_index, static_cast<float>(scale), col_loss.data() + c);
  double total = 0.0;
  for (double l : col_loss) total += l;
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(velocis_cpu, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor w, Tensor rstd) -> (Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor g, Tensor u) -> Tensor");
  m.def("swiglu_bwd(Tensor dh, Tensor g, Tensor u) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool inverse) -> Tensor");
  m.def("xent_grad_cols_(Tensor(a!) logits, Tensor targets, int ignore_index, float scale) -> float");
}

TORCH_LIBRARY_IMPL(velocis_cpu, CPU, m) {
  m.impl("rms_norm_fwd", rms_norm_fwd);
  m.impl("rms_norm_bwd", rms_norm_bwd);
  m.impl("swiglu_fwd", swiglu_fwd);
  m.impl("swiglu_bwd", swiglu_bwd);
  m.impl("rope", rope);
  m.impl("xent_grad_cols_", xent_grad_cols_);
}
