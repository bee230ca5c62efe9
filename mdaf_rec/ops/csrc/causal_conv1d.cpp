// Causal depthwise conv1d + SiLU for CPU, forward and backward, registered as the custom ops
// mdaf_rec::causal_conv1d_silu_fwd / _bwd (Python side: mdaf_rec/ops/causal_conv1d.py):
//   y[b, d, t] = silu(bias[d] + sum_k w[d, k] x[b, d, t - (K - 1) + k]),   x[.., < 0] = 0
// i.e. F.silu(F.conv1d(x, w, bias, padding=K - 1, groups=dim)[..., :L]), the input stage of a Mamba
// block (mamba_ssm's causal_conv1d_fn with activation="silu").
//
// x may have any strides (Mamba's x is a transposed view of in_proj's output, channel-contiguous):
// one task = one batch row x one block of W channels (one 64-byte vector), loaded as an
// (L + K - 1, W) tile with K - 1 leading zeros, so every loop runs lane-wise over channels. The
// backward pass recomputes the pre-activation. Weight and bias gradients are summed per thread
// slot and then in a fixed order (as in selective_scan.cpp).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "vec_math.h"

namespace {

using namespace mdaf_rec_math;

template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

// dst[(t + offset) * W + l] = x[b, d0 + l, t] (0 for padded lanes), t < L
template <typename T>
static void load_tile(const T* __restrict__ x, int64_t sd, int64_t st, int64_t L, int64_t lanes,
                      int64_t offset, T* __restrict__ dst) {
  constexpr int64_t W = kLanes<T>;
  for (int64_t t = 0; t < L; ++t)
    for (int64_t l = 0; l < W; ++l) dst[(t + offset) * W + l] = l < lanes ? x[l * sd + t * st] : T(0);
}

// dst[l * sd + t * st] = src[t * W + l] for l < lanes, t < L
template <typename T>
static void store_tile(const T* __restrict__ src, int64_t sd, int64_t st, int64_t L, int64_t lanes,
                       T* __restrict__ dst) {
  constexpr int64_t W = kLanes<T>;
  for (int64_t t = 0; t < L; ++t)
    for (int64_t l = 0; l < lanes; ++l) dst[l * sd + t * st] = src[t * W + l];
}

struct Conv {
  int64_t batch, dim, L, K, sb, sd, st;  // x's strides
};

static Conv make_conv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 3, "causal_conv1d_silu: x must be (batch, dim, length)");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1), "causal_conv1d_silu: weight must be (dim, K)");
  return {x.size(0), x.size(1), x.size(2), w.size(1), x.stride(0), x.stride(1), x.stride(2)};
}

// Loads a block's input tile, weights (K, W) and bias (W), computes pre (L, W).
template <typename T>
static void pre_activation(const Conv& c, const T* x, const T* w, const T* bias, int64_t b,
                           int64_t d0, int64_t lanes, T* xt, T* wl, T* bl, T* pre) {
  constexpr int64_t W = kLanes<T>;
  const int64_t K = c.K, L = c.L;
  std::fill(xt, xt + (K - 1) * W, T(0));
  load_tile(x + b * c.sb + d0 * c.sd, c.sd, c.st, L, lanes, K - 1, xt);
  for (int64_t l = 0; l < W; ++l) {
    bl[l] = bias && l < lanes ? bias[d0 + l] : T(0);
    for (int64_t k = 0; k < K; ++k) wl[k * W + l] = l < lanes ? w[(d0 + l) * K + k] : T(0);
  }
  for (int64_t t = 0; t < L; ++t) {
    T acc[W];
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) acc[l] = bl[l];
    for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) acc[l] += wl[k * W + l] * xt[(t + k) * W + l];
    }
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) pre[t * W + l] = acc[l];
  }
}

static int64_t num_slots(int64_t batch) {
  return std::max<int64_t>(1, std::min<int64_t>(batch, at::get_num_threads()));
}

template <typename F>
static void for_each_slot(int64_t batch, int64_t slots, const F& f) {
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) f(slot, batch * slot / slots, batch * (slot + 1) / slots);
  });
}

template <typename T>
static void fwd_kernel(const Conv& c, const T* x, const T* w, const T* bias, const at::Tensor& y_t) {
  T* y = y_t.data_ptr<T>();
  const int64_t yb = y_t.stride(0), yd = y_t.stride(1), yt = y_t.stride(2);
  constexpr int64_t W = kLanes<T>;
  const int64_t L = c.L, K = c.K;
  for_each_slot(c.batch, num_slots(c.batch), [&](int64_t, int64_t b0, int64_t b1) {
    std::vector<T> mem((L + K - 1) * W + K * W + W + 2 * L * W);
    T *xt = mem.data(), *wl = xt + (L + K - 1) * W, *bl = wl + K * W, *pre = bl + W,
      *out = pre + L * W;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t d0 = 0; d0 < c.dim; d0 += W) {
        const int64_t lanes = std::min(W, c.dim - d0);
        pre_activation(c, x, w, bias, b, d0, lanes, xt, wl, bl, pre);
#pragma omp simd
        for (int64_t i = 0; i < L * W; ++i) out[i] = pre[i] * sigmoid_(pre[i]);
        store_tile(out, yd, yt, L, lanes, y + b * yb + d0 * yd);
      }
    }
  });
}

template <typename T>
static void bwd_kernel(const Conv& c, const at::Tensor& dy, const T* x, const T* w, const T* bias,
                       const at::Tensor& dx_t, int64_t slots, T* dw_s, T* db_s) {
  T* dx = dx_t.data_ptr<T>();
  const int64_t xb = dx_t.stride(0), xd = dx_t.stride(1), xt_ = dx_t.stride(2);
  constexpr int64_t W = kLanes<T>;
  const int64_t L = c.L, K = c.K;
  const T* dy_p = dy.data_ptr<T>();
  const int64_t gb = dy.stride(0), gd = dy.stride(1), gt = dy.stride(2);
  for_each_slot(c.batch, slots, [&](int64_t slot, int64_t b0, int64_t b1) {
    std::vector<T> mem((L + K - 1) * W * 2 + K * W + W + 2 * L * W);
    T *xt = mem.data(), *dp = xt + (L + K - 1) * W, *wl = dp + (L + K - 1) * W, *bl = wl + K * W,
      *pre = bl + W, *dxt = pre + L * W;
    T* dw = dw_s + slot * c.dim * K;
    T* db = db_s + slot * c.dim;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t d0 = 0; d0 < c.dim; d0 += W) {
        const int64_t lanes = std::min(W, c.dim - d0);
        pre_activation(c, x, w, bias, b, d0, lanes, xt, wl, bl, pre);
        // dp[t] = dL/dpre[t] = dy silu'(pre), followed by K - 1 zeros
        load_tile(dy_p + b * gb + d0 * gd, gd, gt, L, lanes, 0, dp);
        std::fill(dp + L * W, dp + (L + K - 1) * W, T(0));
#pragma omp simd
        for (int64_t i = 0; i < L * W; ++i) {
          const T s = sigmoid_(pre[i]);
          dp[i] *= s * (T(1) + pre[i] * (T(1) - s));
        }
        // dx[t] = sum_k w[k] dp[t + K - 1 - k]; dw[k] = sum_t dp[t] x[t - (K - 1) + k]
        T dwl[32 * W] = {};  // K x W, K <= 32 (checked)
        T dbl[W] = {};
        for (int64_t t = 0; t < L; ++t) {
          T acc[W] = {};
          for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
            for (int64_t l = 0; l < W; ++l) {
              acc[l] += wl[k * W + l] * dp[(t + K - 1 - k) * W + l];
              dwl[k * W + l] += dp[t * W + l] * xt[(t + k) * W + l];
            }
          }
#pragma omp simd
          for (int64_t l = 0; l < W; ++l) {
            dxt[t * W + l] = acc[l];
            dbl[l] += dp[t * W + l];
          }
        }
        store_tile(dxt, xd, xt_, L, lanes, dx + b * xb + d0 * xd);
        for (int64_t l = 0; l < lanes; ++l) {
          db[d0 + l] += dbl[l];
          for (int64_t k = 0; k < K; ++k) dw[(d0 + l) * K + k] += dwl[k * W + l];
        }
      }
    }
  });
}

at::Tensor causal_conv1d_silu_fwd(const at::Tensor& x, const at::Tensor& weight_in,
                                  const c10::optional<at::Tensor>& bias_in) {
  const at::Tensor w = weight_in.contiguous();
  const Conv c = make_conv(x, w);
  TORCH_CHECK(c.K <= 32, "causal_conv1d_silu: kernel width must be <= 32");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "causal_conv1d_silu: dtypes differ");
  const c10::optional<at::Tensor> bias =
      bias_in ? c10::optional<at::Tensor>(bias_in->contiguous()) : c10::nullopt;
  at::Tensor y = at::empty_like(x);  // x's dimension order (channel-contiguous for Mamba's view)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_silu_fwd", [&] {
    fwd_kernel<scalar_t>(c, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                         bias ? bias->data_ptr<scalar_t>() : nullptr, y);
  });
  return y;
}

// Returns (dx, dweight, dbias); dbias is empty (0,) without bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_silu_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& bias_in) {
  const at::Tensor w = weight_in.contiguous();
  const Conv c = make_conv(x, w);
  TORCH_CHECK(c.K <= 32, "causal_conv1d_silu: kernel width must be <= 32");
  TORCH_CHECK(dy.sizes() == x.sizes(), "causal_conv1d_silu_bwd: dy must have x's shape");
  const c10::optional<at::Tensor> bias =
      bias_in ? c10::optional<at::Tensor>(bias_in->contiguous()) : c10::nullopt;
  const int64_t slots = num_slots(c.batch);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw_s = at::zeros({slots, c.dim, c.K}, w.options());
  at::Tensor db_s = at::zeros({slots, c.dim}, w.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_silu_bwd", [&] {
    bwd_kernel<scalar_t>(c, dy, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                         bias ? bias->data_ptr<scalar_t>() : nullptr, dx, slots,
                         dw_s.data_ptr<scalar_t>(), db_s.data_ptr<scalar_t>());
  });
  return {dx, dw_s.sum(0), bias ? db_s.sum(0) : at::empty({0}, w.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mdaf_rec, m) {
  m.def("causal_conv1d_silu_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("causal_conv1d_silu_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mdaf_rec, CPU, m) {
  m.impl("causal_conv1d_silu_fwd", &causal_conv1d_silu_fwd);
  m.impl("causal_conv1d_silu_bwd", &causal_conv1d_silu_bwd);
}
