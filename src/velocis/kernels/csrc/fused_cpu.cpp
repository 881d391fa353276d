// One-pass CPU kernels for the element-wise work around the matmuls (fp32, contiguous rows).
//
// Each replaces a chain of PyTorch ops that each read and write a whole activation: RMSNorm
// forward/backward, SwiGLU forward/backward and the cross-entropy gradient of a chunk of logits.
// References: kernels/rms_norm.py, kernels/swiglu.py, kernels/linear_cross_entropy.py.
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

// --- Cross-entropy of a chunk of logits, and their gradient in place ----------------------------
// Row i: loss_i = logsumexp(z_i) - z_i[t_i]; z_i <- (softmax(z_i) - onehot(t_i)) * scale.
// Rows whose target is ignore_index get loss 0 and gradient 0. Returns the summed loss.
double xent_grad_(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index, double scale_) {
  check_rows(logits, "logits");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == logits.size(0),
              "targets must be a contiguous int64 tensor with one entry per logits row");
  const int64_t N = logits.size(0), V = logits.size(1);
  const float scale = static_cast<float>(scale_);
  float* zp = logits.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  std::vector<double> row_loss(N, 0.0);
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* z = zp + i * V;
      const int64_t t = tp[i];
      if (t == ignore_index) {
        std::fill(z, z + V, 0.f);
        continue;
      }
      TORCH_CHECK(t >= 0 && t < V, "target ", t, " is out of range for ", V, " classes");
      const float mx = *std::max_element(z, z + V);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < V; ++j) sum += std::exp(z[j] - mx);
      const float lse = mx + std::log(sum);
      row_loss[i] = static_cast<double>(lse - z[t]);
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) z[j] = std::exp(z[j] - lse) * scale;
      z[t] -= scale;
    }
  });
  double total = 0.0;
  for (double l : row_loss) total += l;
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(velocis_cpu, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor w, Tensor rstd) -> (Tensor, Tensor)");
  m.def("swiglu_fwd(Tensor g, Tensor u) -> Tensor");
  m.def("swiglu_bwd(Tensor dh, Tensor g, Tensor u) -> (Tensor, Tensor)");
  m.def("xent_grad_(Tensor(a!) logits, Tensor targets, int ignore_index, float scale) -> float");
}

TORCH_LIBRARY_IMPL(velocis_cpu, CPU, m) {
  m.impl("rms_norm_fwd", rms_norm_fwd);
  m.impl("rms_norm_bwd", rms_norm_bwd);
  m.impl("swiglu_fwd", swiglu_fwd);
  m.impl("swiglu_bwd", swiglu_bwd);
  m.impl("xent_grad_", xent_grad_);
}
