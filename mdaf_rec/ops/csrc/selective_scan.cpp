// Selective scan for CPU: forward and analytic backward, registered as the custom ops
// mdaf_rec::selective_scan_fwd / mdaf_rec::selective_scan_bwd (schemas below; Python side:
// mdaf_rec/ops/selective_scan.py registers the fake kernels and the autograd formula).
//
// Recurrence, per batch row b, channel d and state n (see mdaf_rec/ops/selective_scan.py):
//   dt_t = softplus(delta_t + bias)            (each optional)
//   h_t  = exp(dt_t A[d,n]) h_{t-1} + dt_t u_t B_t[n]
//   y_t  = (sum_n C_t[n] h_t[n] + D u_t) * silu(z_t)
//
// Layout: u, delta, z, out are (batch, dim, L); A is (dim, N); B and C are either constant
// (dim, N) or variable (batch, groups, N, L), transposed here to (batch, groups, L, N) so that a
// time step's N values are contiguous. One task = one batch row x one channel: its N states
// live in registers/L1, the inner loops run over N (or over time for the element-wise
// prologue/epilogue) and are written so that gcc vectorises them (-O3 -march=native
// -fopenmp: "#pragma omp simd"; exp, log1p and sigmoid are inline polynomial forms, no libm
// calls). Batch rows are split into one contiguous range per thread (at::parallel_for, the torch
// intra-op pool); per-channel gradient sums (dA, dD, constant dB/dC) go to one slot per range and
// are summed in a fixed order afterwards, so results do not depend on scheduling.
//
// The backward pass recomputes a row's states (exp(dt A) and h_t for all t, L x N values, in a
// per-thread buffer that stays in L1/L2) and then runs the adjoint recurrence
//   g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}
// backwards in time. Nothing of size batch x dim x L x N is ever stored.
//
// positions (optional, int64 (batch,)): the output is read at one time step per row only.
// Then out and z are (batch, dim) (the values at t = positions[b]), last_state is the state at
// that step, and steps after it are not computed at all (they cannot influence the output).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// ---------------------------------------------------------------------- math, vectorisable

// exp(x) = 2^k 2^f with k = round(x log2 e), |f| <= 1/2; 2^f by its degree-6 Taylor polynomial
// (relative error < 2e-7). Arguments are clamped to [-127, 127] in base 2: exp(x) = 0 below
// (as float32's exp, up to denormals) and finite above.
static inline __attribute__((always_inline)) float exp_(float x) {
  float t = x * 1.44269504088896341f;
  t = t < -127.0f ? -127.0f : t;  // (std::fmin/fmax would not vectorise: NaN rules)
  t = t > 127.0f ? 127.0f : t;
  const float k = std::nearbyint(t);
  const float f = t - k;
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k; k = -127 gives 0.0
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

static inline __attribute__((always_inline)) double exp_(double x) { return std::exp(x); }

// log1p(y) for y in [0, 1]: 2 atanh(s), s = y / (2 + y) in [0, 1/3], odd series to s^11
// (relative error < 2e-7).
static inline __attribute__((always_inline)) float log1p_unit(float y) {
  const float s = y / (2.0f + y);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

static inline __attribute__((always_inline)) double log1p_unit(double y) { return std::log1p(y); }

// softplus as torch's F.softplus (beta 1, threshold 20): x above 20, else log(1 + e^x)
// = max(x, 0) + log1p(e^-|x|).
template <typename T>
static inline __attribute__((always_inline)) T softplus_(T x) {
  const T sp = (x > T(0) ? x : T(0)) + log1p_unit(exp_(-std::fabs(x)));
  return x > T(20) ? x : sp;
}

// softplus'(x) = sigmoid(x), exactly 1 above the threshold (the function is x there).
template <typename T>
static inline __attribute__((always_inline)) T dsoftplus_(T x) {
  const T s = T(1) / (T(1) + exp_(-x));
  return x > T(20) ? T(1) : s;
}

template <typename T>
static inline __attribute__((always_inline)) T sigmoid_(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// ---------------------------------------------------------------------- arguments

template <typename T>
struct Scan {
  int64_t batch, dim, L, N;
  const T* u;
  const T* delta;
  const T* A;
  const T* B;  // (dim, N) or (batch, groups_b, L, N)
  const T* C;
  const T* D;     // nullable
  const T* z;     // nullable; (batch, dim, L), or (batch, dim) with positions
  const T* bias;  // nullable
  const int64_t* pos;  // nullable
  bool softplus, var_b, var_c;
  int64_t groups_b, groups_c;

  // first element of B / C for (b, d), and the stride between time steps
  const T* b_row(int64_t b, int64_t d) const {
    return var_b ? B + (b * groups_b + d / (dim / groups_b)) * L * N : B + d * N;
  }
  const T* c_row(int64_t b, int64_t d) const {
    return var_c ? C + (b * groups_c + d / (dim / groups_c)) * L * N : C + d * N;
  }
  int64_t b_step() const { return var_b ? N : 0; }
  int64_t c_step() const { return var_c ? N : 0; }
  int64_t steps(int64_t b) const { return pos ? pos[b] + 1 : L; }
};

template <typename T>
static Scan<T> make_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& Bt, const at::Tensor& Ct,
                         const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                         const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& pos, bool softplus) {
  Scan<T> s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.L = u.size(2);
  s.N = A.size(1);
  s.u = u.data_ptr<T>();
  s.delta = delta.data_ptr<T>();
  s.A = A.data_ptr<T>();
  s.B = Bt.data_ptr<T>();
  s.C = Ct.data_ptr<T>();
  s.D = D ? D->data_ptr<T>() : nullptr;
  s.z = z ? z->data_ptr<T>() : nullptr;
  s.bias = bias ? bias->data_ptr<T>() : nullptr;
  s.pos = pos ? pos->data_ptr<int64_t>() : nullptr;
  s.softplus = softplus;
  s.var_b = Bt.dim() == 4;
  s.var_c = Ct.dim() == 4;
  s.groups_b = s.var_b ? Bt.size(1) : 1;
  s.groups_c = s.var_c ? Ct.size(1) : 1;
  return s;
}

// Step sizes of one row: x = delta + bias, dt = softplus(x) or x, dtu = dt * u.
template <typename T>
static inline void row_prologue(const Scan<T>& s, int64_t row, int64_t d, int64_t steps, T* x,
                                T* dt, T* dtu) {
  const T* __restrict__ delta = s.delta + row * s.L;
  const T* __restrict__ u = s.u + row * s.L;
  const T bias = s.bias ? s.bias[d] : T(0);
  if (s.softplus) {
#pragma omp simd
    for (int64_t t = 0; t < steps; ++t) {
      x[t] = delta[t] + bias;
      dt[t] = softplus_(x[t]);
      dtu[t] = dt[t] * u[t];
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < steps; ++t) {
      x[t] = delta[t] + bias;
      dt[t] = x[t];
      dtu[t] = dt[t] * u[t];
    }
  }
}

// The recurrence over steps [0, steps) of one (b, d) row; h holds the running state (N).
// If a_all / h_all are given, exp(dt A) and the states of every step are stored there
// (steps x N, for the backward pass). y[t] = C_t . h_t is written for t in [y_from, steps).
template <typename T>
static inline void row_scan(const Scan<T>& s, int64_t b, int64_t d, int64_t steps,
                            const T* __restrict__ dt, const T* __restrict__ dtu, T* __restrict__ h,
                            T* __restrict__ a_all, T* __restrict__ h_all, T* __restrict__ y,
                            int64_t y_from) {
  const int64_t N = s.N;
  const T* __restrict__ A = s.A + d * N;
  const T* __restrict__ Bp = s.b_row(b, d);
  const T* __restrict__ Cp = s.c_row(b, d);
  const int64_t bs = s.b_step(), cs = s.c_step();
  for (int64_t t = 0; t < steps; ++t) {
    const T dtt = dt[t], dtut = dtu[t];
    const T* __restrict__ Bt = Bp + t * bs;
    T* __restrict__ at = a_all ? a_all + t * N : nullptr;
    if (a_all) {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        const T a = exp_(dtt * A[n]);
        at[n] = a;
        h[n] = a * h[n] + dtut * Bt[n];
      }
      std::memcpy(h_all + t * N, h, N * sizeof(T));
    } else {
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        h[n] = exp_(dtt * A[n]) * h[n] + dtut * Bt[n];
      }
    }
    if (t >= y_from) {
      const T* __restrict__ Ct = Cp + t * cs;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < N; ++n) acc += Ct[n] * h[n];
      y[t] = acc;
    }
  }
}

// Per-thread scratch of one row (T values): x, dt, dtu, y (L each) + a, h (L x N each) + g (N).
template <typename T>
struct RowBuffers {
  std::vector<T> mem;
  T *x, *dt, *dtu, *y, *a, *h, *g;
  RowBuffers(int64_t L, int64_t N) : mem(4 * L + 2 * L * N + 2 * N) {
    x = mem.data();
    dt = x + L;
    dtu = dt + L;
    y = dtu + L;
    a = y + L;
    h = a + L * N;
    g = h + L * N;
  }
};

// Splits [0, batch) into one contiguous range per slot; calls f(slot, b0, b1) in parallel.
template <typename F>
static void for_each_slot(int64_t batch, int64_t slots, const F& f) {
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      f(slot, batch * slot / slots, batch * (slot + 1) / slots);
    }
  });
}

static int64_t num_slots(int64_t batch) {
  return std::max<int64_t>(1, std::min<int64_t>(batch, at::get_num_threads()));
}

// (batch, groups, N, L) -> (batch, groups, L, N) contiguous; constant (dim, N) as is.
static at::Tensor time_major(const at::Tensor& M) {
  return M.dim() == 4 ? M.transpose(2, 3).contiguous() : M.contiguous();
}

static void check_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C,
                       const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& pos) {
  TORCH_CHECK(u.dim() == 3, "selective_scan: u must be (batch, dim, length)");
  TORCH_CHECK(delta.sizes() == u.sizes(), "selective_scan: delta must have u's shape");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "selective_scan: A must be (dim, d_state)");
  const int64_t N = A.size(1);
  for (const at::Tensor* M : {&B, &C}) {
    TORCH_CHECK((M->dim() == 2 && M->size(0) == dim && M->size(1) == N) ||
                    (M->dim() == 4 && M->size(0) == batch && M->size(1) >= 1 &&
                     dim % M->size(1) == 0 && M->size(2) == N && M->size(3) == L),
                "selective_scan: B and C must be (dim, d_state) or (batch, groups, d_state, length)");
  }
  for (const at::Tensor* t : {&delta, &A, &B, &C}) {
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "selective_scan: dtypes differ");
  }
  for (const auto* t : {&D, &bias}) {
    TORCH_CHECK(!t->has_value() || ((*t)->dim() == 1 && (*t)->size(0) == dim &&
                                    (*t)->scalar_type() == u.scalar_type()),
                "selective_scan: D and delta_bias must be (dim,) in u's dtype");
  }
  if (pos) {
    TORCH_CHECK(pos->dim() == 1 && pos->size(0) == batch && pos->scalar_type() == at::kLong,
                "selective_scan: positions must be int64 (batch,)");
    if (batch > 0) {
      const auto lo = pos->min().item<int64_t>(), hi = pos->max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < L, "selective_scan: positions must be in [0, length)");
    }
  }
  if (z) {
    TORCH_CHECK(z->scalar_type() == u.scalar_type(), "selective_scan: z must have u's dtype");
    if (pos) {
      TORCH_CHECK(z->dim() == 2 && z->size(0) == batch && z->size(1) == dim,
                  "selective_scan: with positions, z must be (batch, dim)");
    } else {
      TORCH_CHECK(z->sizes() == u.sizes(), "selective_scan: z must have u's shape");
    }
  }
}

static c10::optional<at::Tensor> contig(const c10::optional<at::Tensor>& t) {
  return t ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// ---------------------------------------------------------------------- forward

// The forward pass over all rows (scan arguments in s; outputs out, last).
template <typename scalar_t>
static void fwd_kernel(const Scan<scalar_t>& s, at::Tensor& out, at::Tensor& last) {
  const int64_t batch = s.batch, dim = s.dim, L = s.L, N = s.N;
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* last_p = last.data_ptr<scalar_t>();
  for_each_slot(batch, num_slots(batch), [&](int64_t, int64_t b0, int64_t b1) {
    RowBuffers<scalar_t> buf(L, N);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t steps = s.steps(b);
      for (int64_t d = 0; d < dim; ++d) {
        const int64_t row = b * dim + d;
        row_prologue(s, row, d, steps, buf.x, buf.dt, buf.dtu);
        scalar_t* h = last_p + row * N;
        std::fill(h, h + N, scalar_t(0));
        const int64_t y_from = s.pos ? steps - 1 : 0;
        row_scan(s, b, d, steps, buf.dt, buf.dtu, h, (scalar_t*)nullptr, (scalar_t*)nullptr,
                 buf.y, y_from);
        const scalar_t Dd = s.D ? s.D[d] : scalar_t(0);
        const scalar_t* __restrict__ uu = s.u + row * L;
        if (s.pos) {  // one output per row
          scalar_t y = buf.y[steps - 1] + Dd * uu[steps - 1];
          if (s.z) y *= s.z[row] * sigmoid_(s.z[row]);
          out_p[row] = y;
        } else {
          scalar_t* __restrict__ o = out_p + row * L;
          const scalar_t* __restrict__ y = buf.y;
          if (s.z) {
            const scalar_t* __restrict__ zz = s.z + row * L;
#pragma omp simd
            for (int64_t t = 0; t < L; ++t) {
              o[t] = (y[t] + Dd * uu[t]) * (zz[t] * sigmoid_(zz[t]));
            }
          } else {
#pragma omp simd
            for (int64_t t = 0; t < L; ++t) o[t] = y[t] + Dd * uu[t];
          }
        }
      }
    }
  });
}


std::tuple<at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const c10::optional<at::Tensor>& D_in,
    const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& bias_in,
    bool delta_softplus, const c10::optional<at::Tensor>& pos_in) {
  check_args(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, pos_in);
  const at::Tensor u = u_in.contiguous(), delta = delta_in.contiguous(), A = A_in.contiguous();
  const at::Tensor Bt = time_major(B_in), Ct = time_major(C_in);
  const auto D = contig(D_in), z = contig(z_in), bias = contig(bias_in), pos = contig(pos_in);
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  at::Tensor out = pos ? at::empty({batch, dim}, u.options()) : at::empty_like(u);
  at::Tensor last = at::empty({batch, dim, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    fwd_kernel(make_scan<scalar_t>(u, delta, A, Bt, Ct, D, z, bias, pos, delta_softplus), out,
               last);
  });
  return {out, last};
}

// ---------------------------------------------------------------------- backward

// The backward pass over all rows: gradients into du, ddelta, dz and the per-slot sums.
template <typename T>
static void bwd_kernel(const Scan<T>& s, const at::Tensor& dout, int64_t slots, at::Tensor& du,
                       at::Tensor& ddelta, at::Tensor& dz, at::Tensor& dA_s, at::Tensor& dD_s,
                       at::Tensor& dB_s, at::Tensor& dC_s) {
  const int64_t batch = s.batch, dim = s.dim, L = s.L, N = s.N;
  const bool var_b = s.var_b, var_c = s.var_c;
  const T* dout_p = dout.data_ptr<T>();
  T *du_p = du.data_ptr<T>(), *dd_p = ddelta.data_ptr<T>();
  T* dz_p = s.z ? dz.data_ptr<T>() : nullptr;
  for_each_slot(batch, slots, [&](int64_t slot, int64_t b0, int64_t b1) {
    RowBuffers<T> buf(L, N);
    T* __restrict__ dA_acc = dA_s.data_ptr<T>() + slot * dim * N;
    T* __restrict__ dD_acc = dD_s.data_ptr<T>() + slot * dim;
    // gradient of B / C at (b, d): like b_row / c_row, into the per-slot sum if constant
    T* dB_base = dB_s.data_ptr<T>() + (var_b ? 0 : slot * dim * N);
    T* dC_base = dC_s.data_ptr<T>() + (var_c ? 0 : slot * dim * N);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t steps = s.steps(b);
      for (int64_t d = 0; d < dim; ++d) {
        const int64_t row = b * dim + d;
        T* __restrict__ x = buf.x;
        T* __restrict__ dt = buf.dt;
        T* __restrict__ dtu = buf.dtu;
        T* __restrict__ a = buf.a;
        T* __restrict__ h = buf.h;
        T* __restrict__ g = buf.g;
        row_prologue(s, row, d, steps, x, dt, dtu);
        std::fill(g, g + N, T(0));  // g doubles as the running state of the recompute
        // recompute exp(dt A) and the states; y (pre-gate C . h) is needed only for dz
        const int64_t y_from = !s.z ? steps : (s.pos ? steps - 1 : 0);
        row_scan(s, b, d, steps, dt, dtu, g, a, h, buf.y, y_from);
        const T Dd = s.D ? s.D[d] : T(0);
        const T* __restrict__ uu = s.u + row * L;
        const T* __restrict__ A_d = s.A + d * N;
        const T* __restrict__ Bp = s.b_row(b, d);
        const T* __restrict__ Cp = s.c_row(b, d);
        T* __restrict__ dBp = dB_base + (s.b_row(b, d) - s.B);
        T* __restrict__ dCp = dC_base + (s.c_row(b, d) - s.C);
        const int64_t bs = s.b_step(), cs = s.c_step();
        // dL/d(pre-gate y) per step; with positions only the last step has one
        T* __restrict__ dy = buf.y;  // reuses y (read before it is overwritten)
        if (s.pos) {
          T g_out = dout_p[row];
          if (s.z) {
            const T zz = s.z[row], sig = sigmoid_(zz);
            dz_p[row] = g_out * (buf.y[steps - 1] + Dd * uu[steps - 1]) *
                        (sig * (T(1) + zz * (T(1) - sig)));
            g_out *= zz * sig;
          }
          std::fill(dy, dy + steps - 1, T(0));
          dy[steps - 1] = g_out;
        } else if (s.z) {
          const T* __restrict__ zz = s.z + row * L;
          const T* __restrict__ go = dout_p + row * L;
          T* __restrict__ dzz = dz_p + row * L;
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) {
            const T sig = sigmoid_(zz[t]);
            dzz[t] = go[t] * (dy[t] + Dd * uu[t]) * (sig * (T(1) + zz[t] * (T(1) - sig)));
            dy[t] = go[t] * zz[t] * sig;
          }
        } else {
          std::memcpy(dy, dout_p + row * L, L * sizeof(T));
        }
        T dD_sum = 0;
        T* __restrict__ dut = du_p + row * L;
        T* __restrict__ ddt = dd_p + row * L;
        std::fill(g, g + N, T(0));  // adjoint state dL/dh_t
        for (int64_t t = steps - 1; t >= 0; --t) {
          const T dyt = dy[t], dtt = dt[t], dtut = dtu[t];
          const T* __restrict__ at = a + t * N;
          const T* __restrict__ an = a + (t + 1 < steps ? t + 1 : t) * N;  // g = 0 at the end
          const T* __restrict__ ht = h + t * N;
          const T* __restrict__ Bt = Bp + t * bs;
          const T* __restrict__ Ct = Cp + t * cs;
          T* __restrict__ dBt = dBp + t * bs;
          T* __restrict__ dCt = dCp + t * cs;
          T d_dtu = 0, d_dtA = 0;
          if (t > 0) {
            const T* __restrict__ hp = h + (t - 1) * N;
#pragma omp simd reduction(+ : d_dtu, d_dtA)
            for (int64_t n = 0; n < N; ++n) {
              const T gn = an[n] * g[n] + Ct[n] * dyt;  // g_t = a_{t+1} g_{t+1} + C_t dy_t
              g[n] = gn;
              dCt[n] += dyt * ht[n];
              dBt[n] += gn * dtut;
              d_dtu += gn * Bt[n];
              const T w = gn * hp[n] * at[n];  // dL/d(dt_t A) = g_t a_t h_{t-1}
              d_dtA += w * A_d[n];
              dA_acc[d * N + n] += w * dtt;
            }
          } else {
#pragma omp simd reduction(+ : d_dtu)
            for (int64_t n = 0; n < N; ++n) {
              const T gn = an[n] * g[n] + Ct[n] * dyt;
              g[n] = gn;
              dCt[n] += dyt * ht[n];
              dBt[n] += gn * dtut;
              d_dtu += gn * Bt[n];
            }
          }
          dD_sum += dyt * uu[t];
          dut[t] = d_dtu * dtt + dyt * Dd;
          const T d_dt = d_dtA + d_dtu * uu[t];
          ddt[t] = s.softplus ? d_dt * dsoftplus_(x[t]) : d_dt;
        }
        dD_acc[d] += dD_sum;
      }
    }
  });
}

// Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); dB/dC in B/C's shapes. dD, dz and
// ddelta_bias are empty (0,) tensors when D, z, delta_bias are absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_bwd(const at::Tensor& dout_in, const at::Tensor& u_in, const at::Tensor& delta_in,
                   const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& C_in,
                   const c10::optional<at::Tensor>& D_in, const c10::optional<at::Tensor>& z_in,
                   const c10::optional<at::Tensor>& bias_in, bool delta_softplus,
                   const c10::optional<at::Tensor>& pos_in) {
  check_args(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, pos_in);
  const at::Tensor u = u_in.contiguous(), delta = delta_in.contiguous(), A = A_in.contiguous();
  const at::Tensor Bt = time_major(B_in), Ct = time_major(C_in);
  const at::Tensor dout = dout_in.contiguous();
  const auto D = contig(D_in), z = contig(z_in), bias = contig(bias_in), pos = contig(pos_in);
  TORCH_CHECK(dout.sizes() == (pos ? at::IntArrayRef({u.size(0), u.size(1)}) : u.sizes()),
              "selective_scan_bwd: dout has the wrong shape");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t slots = num_slots(batch);
  const bool var_b = Bt.dim() == 4, var_c = Ct.dim() == 4;
  at::Tensor du = at::zeros_like(u), ddelta = at::zeros_like(u);
  at::Tensor dz = z ? at::zeros_like(*z) : at::empty({0}, u.options());
  // per-slot sums: dA, dD, and constant dB / dC
  at::Tensor dA_s = at::zeros({slots, dim, N}, u.options());
  at::Tensor dD_s = at::zeros({slots, dim}, u.options());
  at::Tensor dB_s = var_b ? at::zeros_like(Bt) : at::zeros({slots, dim, N}, u.options());
  at::Tensor dC_s = var_c ? at::zeros_like(Ct) : at::zeros({slots, dim, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_bwd", [&] {
    bwd_kernel(make_scan<scalar_t>(u, delta, A, Bt, Ct, D, z, bias, pos, delta_softplus), dout,
               slots, du, ddelta, dz, dA_s, dD_s, dB_s, dC_s);
  });
  const at::Tensor dA = dA_s.sum(0);
  at::Tensor dB = var_b ? dB_s.transpose(2, 3).contiguous() : dB_s.sum(0);
  at::Tensor dC = var_c ? dC_s.transpose(2, 3).contiguous() : dC_s.sum(0);
  at::Tensor dD = D ? dD_s.sum(0) : at::empty({0}, u.options());
  at::Tensor dbias = bias ? ddelta.sum({0, 2}) : at::empty({0}, u.options());
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

}  // namespace

TORCH_LIBRARY(mdaf_rec, m) {
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? positions) -> (Tensor, Tensor)");
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? positions) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mdaf_rec, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
}
