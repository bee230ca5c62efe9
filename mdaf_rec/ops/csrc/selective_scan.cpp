// Selective scan for CPU: forward and analytic backward, registered as the custom ops
// mdaf_rec::selective_scan_fwd / mdaf_rec::selective_scan_bwd (schemas below; Python side:
// mdaf_rec/ops/scan_cpu.py builds this file and registers the fake kernels and the autograd formula).
//
// Recurrence, per batch row b, channel d and state n (see mdaf_rec/ops/scan_reference.py):
//   dt_t = softplus(delta_t + bias)            (each optional)
//   h_t  = exp(dt_t A[d,n]) h_{t-1} + dt_t u_t B_t[n]
//   y_t  = (sum_n C_t[n] h_t[n] + D u_t) * silu(z_t)
//
// Layout: u, delta, z, out are (batch, dim, L); A is (dim, N); B and C are either constant
// (dim, N) or variable (batch, groups, N, L), transposed here to (batch, groups, L, N) so that a
// time step's N values are contiguous. One task = one batch row x one block of W channels
// (W = 16 floats or 8 doubles, one 64-byte vector): the block's u, delta, z are loaded as
// (L, W) tiles, its N x W states stay in L1, and every inner loop runs over the W lanes, so the
// recurrence and the output contraction C . h are lane-wise multiply-adds without horizontal
// sums (B_t and C_t are broadcast over the lanes when the lanes share a group). Loops are written
// so that gcc vectorises them (-O3 -march=native -fopenmp: "#pragma omp simd"; exp, log1p and
// sigmoid are the inline polynomials of vec_math.h, no libm calls). Batch rows are split into one
// contiguous range per thread (at::parallel_for, the torch intra-op pool); per-channel gradient
// sums (dA, dD, constant dB/dC) go to one slot per range and are summed in a fixed order
// afterwards, so results do not depend on scheduling.
//
// The backward pass recomputes a block's states (exp(dt A) and h_t for all t, L x N x W values, in
// a per-thread buffer that stays in L2) and then runs the adjoint recurrence
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

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace mdaf_rec_math;

// ---------------------------------------------------------------------- arguments

// Channels per block: one 64-byte vector (16 float or 8 double lanes).
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

// A (batch, dim, L) tensor -- or (batch, dim), with st = 0 -- of any strides (Mamba hands
// over transposed, channel-contiguous views of its projections).
template <typename T>
struct View {
  T* p = nullptr;
  int64_t sb = 0, sd = 0, st = 0;
  View() = default;
  explicit View(const at::Tensor& t)
      : p(t.data_ptr<T>()), sb(t.stride(0)), sd(t.stride(1)), st(t.dim() == 3 ? t.stride(2) : 0) {}
  T& at2(int64_t b, int64_t d) const { return p[b * sb + d * sd]; }  // (batch, dim) element
};

template <typename T>
struct Scan {
  int64_t batch, dim, L, N;
  View<T> u, delta, z;  // z.p nullable; z is (batch, dim) with positions
  const T* A;
  const T* B;  // (dim, N) or (batch, groups_b, L, N)
  const T* C;
  const T* D;     // nullable
  const T* bias;  // nullable
  const int64_t* pos;  // nullable
  bool softplus, var_b, var_c;
  int64_t groups_b, groups_c;

  // steps of row b that can influence its output; checks the row's position (no separate pass)
  int64_t steps(int64_t b) const {
    if (!pos) return L;
    TORCH_CHECK(pos[b] >= 0 && pos[b] < L, "selective_scan: positions must be in [0, length), got ",
                pos[b], " in row ", b);
    return pos[b] + 1;
  }
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
  s.u = View<T>(u);
  s.delta = View<T>(delta);
  s.A = A.data_ptr<T>();
  s.B = Bt.data_ptr<T>();
  s.C = Ct.data_ptr<T>();
  s.D = D ? D->data_ptr<T>() : nullptr;
  if (z) s.z = View<T>(*z);
  s.bias = bias ? bias->data_ptr<T>() : nullptr;
  s.pos = pos ? pos->data_ptr<int64_t>() : nullptr;
  s.softplus = softplus;
  s.var_b = Bt.dim() == 4;
  s.var_c = Ct.dim() == 4;
  s.groups_b = s.var_b ? Bt.size(1) : 1;
  s.groups_c = s.var_c ? Ct.size(1) : 1;
  return s;
}

// B or C of one block of W channels as an (N, W) lane matrix per time step: a constant matrix
// is filled once; a variable one per step, by broadcasting one (t, :) row when all lanes share a
// group (always with one group), else lane by lane.
template <typename T>
struct LaneMatrix {
  static constexpr int64_t W = kLanes<T>;
  const T* base;  // constant: (dim, N); variable: (batch, groups, L, N)
  bool var, uniform;
  int64_t N, L, groups, group[W];  // group of each lane (variable)

  LaneMatrix(const T* M, bool var_, int64_t groups_, int64_t b, int64_t d0, int64_t lanes,
             int64_t dim, int64_t N_, int64_t L_)
      : var(var_), uniform(true), N(N_), L(L_), groups(groups_) {
    const int64_t per_group = dim / groups;
    for (int64_t l = 0; l < W; ++l) {
      group[l] = (d0 + std::min(l, lanes - 1)) / per_group;
      uniform = uniform && group[l] == group[0];
    }
    base = var ? M + b * groups * L * N : M;
  }

  // out[n * W + l] = M[lane l's channel or group, t, n]; padded lanes repeat the last lane
  void fill(int64_t t, int64_t d0, int64_t lanes, T* __restrict__ out) const {
    if (!var) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t l = 0; l < W; ++l) out[n * W + l] = base[(d0 + std::min(l, lanes - 1)) * N + n];
    } else if (uniform) {
      const T* __restrict__ row = base + (group[0] * L + t) * N;
      for (int64_t n = 0; n < N; ++n) {
        const T v = row[n];
#pragma omp simd
        for (int64_t l = 0; l < W; ++l) out[n * W + l] = v;
      }
    } else {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t l = 0; l < W; ++l) out[n * W + l] = base[(group[l] * L + t) * N + n];
    }
  }
};

// Per-thread scratch for one block of W channels x L steps (T values, lane-minor).
template <typename T>
struct Block {
  static constexpr int64_t W = kLanes<T>;
  std::vector<T> mem;
  T *x, *dt, *dtu, *u, *z, *y, *dy, *t0, *t1;  // (L, W)
  T *A, *Bl, *Cl, *h, *g, *zero, *dA;           // (N, W)
  T *a_all, *h_all, *acc_b, *acc_c;             // (L, N, W)
  T D[W], dD[W];

  Block(int64_t L, int64_t N, bool backward)
      : mem(9 * L * W + 7 * N * W + (backward ? 4 : 0) * L * N * W, T(0)) {
    T* p = mem.data();
    for (T** q : {&x, &dt, &dtu, &u, &z, &y, &dy, &t0, &t1}) *q = p, p += L * W;
    for (T** q : {&A, &Bl, &Cl, &h, &g, &zero, &dA}) *q = p, p += N * W;
    a_all = h_all = acc_b = acc_c = nullptr;
    if (backward) {
      for (T** q : {&a_all, &h_all, &acc_b, &acc_c}) *q = p, p += L * N * W;
    }
  }
};

// dst[t * W + l] = v[b, d0 + l, t] for l < lanes (0 for padded lanes), t < steps
template <typename T>
static void load_lanes(const View<T>& v, int64_t b, int64_t d0, int64_t steps, int64_t lanes,
                       T* __restrict__ dst) {
  constexpr int64_t W = kLanes<T>;
  const T* __restrict__ src = v.p + b * v.sb + d0 * v.sd;
  for (int64_t t = 0; t < steps; ++t)
    for (int64_t l = 0; l < W; ++l) dst[t * W + l] = l < lanes ? src[l * v.sd + t * v.st] : T(0);
}

// v[b, d0 + l, t] = src[t * W + l] for l < lanes, t < steps
template <typename T>
static void store_lanes(const T* __restrict__ src, const View<T>& v, int64_t b, int64_t d0,
                        int64_t steps, int64_t lanes) {
  constexpr int64_t W = kLanes<T>;
  T* __restrict__ dst = v.p + b * v.sb + d0 * v.sd;
  for (int64_t t = 0; t < steps; ++t)
    for (int64_t l = 0; l < lanes; ++l) dst[l * v.sd + t * v.st] = src[t * W + l];
}

// Loads a block's u, x = delta + bias, dt = softplus(x) or x, dtu = dt * u, A (N, W), D.
template <typename T>
static void load_block(const Scan<T>& s, int64_t b, int64_t d0, int64_t lanes, int64_t steps,
                       Block<T>& k) {
  constexpr int64_t W = kLanes<T>;
  const int64_t N = s.N;
  load_lanes(s.u, b, d0, steps, lanes, k.u);
  load_lanes(s.delta, b, d0, steps, lanes, k.x);
  T bias[W];
  for (int64_t l = 0; l < W; ++l) {
    const bool in = l < lanes;
    bias[l] = s.bias && in ? s.bias[d0 + l] : T(0);
    k.D[l] = s.D && in ? s.D[d0 + l] : T(0);
    for (int64_t n = 0; n < N; ++n) k.A[n * W + l] = in ? s.A[(d0 + l) * N + n] : T(0);
  }
  T* __restrict__ x = k.x;
  T* __restrict__ dt = k.dt;
  T* __restrict__ dtu = k.dtu;
  const T* __restrict__ u = k.u;
  for (int64_t t = 0; t < steps; ++t) {
#pragma omp simd
    for (int64_t l = 0; l < W; ++l) {
      const T xv = x[t * W + l] + bias[l];
      x[t * W + l] = xv;
      const T d = s.softplus ? softplus_(xv) : xv;
      dt[t * W + l] = d;
      dtu[t * W + l] = d * u[t * W + l];
    }
  }
}

// The recurrence of one block over steps [0, steps): k.h holds the state (N, W). With kStore,
// exp(dt A) and the states of every step go to k.a_all / k.h_all (L, N, W). y[t] = C_t . h_t
// (lane-wise, no horizontal sums) is written where want_y(t).
template <bool kStore, typename T, typename WantY>
static void scan_block(const Scan<T>& s, int64_t d0, int64_t lanes, int64_t steps,
                       const LaneMatrix<T>& Bm, const LaneMatrix<T>& Cm, Block<T>& k,
                       const WantY& want_y) {
  constexpr int64_t W = kLanes<T>;
  const int64_t N = s.N;
  T* __restrict__ h = k.h;
  T* __restrict__ Bl = k.Bl;
  T* __restrict__ Cl = k.Cl;
  const T* __restrict__ A = k.A;
  std::fill(h, h + N * W, T(0));
  if (!Bm.var) Bm.fill(0, d0, lanes, Bl);
  if (!Cm.var) Cm.fill(0, d0, lanes, Cl);
  for (int64_t t = 0; t < steps; ++t) {
    if (Bm.var) Bm.fill(t, d0, lanes, Bl);
    const T* __restrict__ dt = k.dt + t * W;
    const T* __restrict__ dtu = k.dtu + t * W;
    T* __restrict__ at = kStore ? k.a_all + t * N * W : nullptr;
    T* __restrict__ ht = kStore ? k.h_all + t * N * W : nullptr;
    for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) {
        const T a = exp_(dt[l] * A[n * W + l]);
        const T hn = a * h[n * W + l] + dtu[l] * Bl[n * W + l];
        h[n * W + l] = hn;
        if (kStore) {
          at[n * W + l] = a;
          ht[n * W + l] = hn;
        }
      }
    }
    if (want_y(t)) {
      if (Cm.var) Cm.fill(t, d0, lanes, Cl);
      T acc[W] = {};
      for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
        for (int64_t l = 0; l < W; ++l) acc[l] += Cl[n * W + l] * h[n * W + l];
      }
      for (int64_t l = 0; l < W; ++l) k.y[t * W + l] = acc[l];
    }
  }
}

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

// ---------------------------------------------------------------------- forward

template <typename T>
static void fwd_kernel(const Scan<T>& s, at::Tensor& out, at::Tensor& last) {
  constexpr int64_t W = kLanes<T>;
  const int64_t dim = s.dim, L = s.L, N = s.N;
  const View<T> out_v(out);
  T* last_p = last.data_ptr<T>();
  for_each_slot(s.batch, num_slots(s.batch), [&](int64_t, int64_t b0, int64_t b1) {
    Block<T> k(L, N, /*backward=*/false);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t steps = s.steps(b);
      for (int64_t d0 = 0; d0 < dim; d0 += W) {
        const int64_t lanes = std::min(W, dim - d0), row0 = b * dim + d0;
        const LaneMatrix<T> Bm(s.B, s.var_b, s.groups_b, b, d0, lanes, dim, N, L);
        const LaneMatrix<T> Cm(s.C, s.var_c, s.groups_c, b, d0, lanes, dim, N, L);
        load_block(s, b, d0, lanes, steps, k);
        scan_block<false>(s, d0, lanes, steps, Bm, Cm, k,
                          [&](int64_t t) { return !s.pos || t == steps - 1; });
        for (int64_t l = 0; l < lanes; ++l)
          for (int64_t n = 0; n < N; ++n) last_p[(row0 + l) * N + n] = k.h[n * W + l];
        if (s.pos) {  // one output per row and channel
          const int64_t t = steps - 1;
          for (int64_t l = 0; l < lanes; ++l) {
            T y = k.y[t * W + l] + k.D[l] * k.u[t * W + l];
            if (s.z.p) {
              const T zz = s.z.at2(b, d0 + l);
              y *= zz * sigmoid_(zz);
            }
            out_v.at2(b, d0 + l) = y;
          }
          continue;
        }
        T* __restrict__ o = k.t0;
        const T* __restrict__ y = k.y;
        const T* __restrict__ u = k.u;
        if (s.z.p) load_lanes(s.z, b, d0, L, lanes, k.z);
        const T* __restrict__ z = k.z;
        for (int64_t t = 0; t < L; ++t) {
#pragma omp simd
          for (int64_t l = 0; l < W; ++l) {
            const int64_t i = t * W + l;
            const T v = y[i] + k.D[l] * u[i];
            o[i] = s.z.p ? v * (z[i] * sigmoid_(z[i])) : v;
          }
        }
        store_lanes(o, out_v, b, d0, L, lanes);
      }
    }
  });
}

// ---------------------------------------------------------------------- backward

// Adds a block's lane-wise sums of a variable B/C gradient (acc, (L, N, W)) to dM
// (batch, groups, L, N) and clears them: one horizontal sum per (t, n) when all lanes share a
// group, lane by lane otherwise.
template <typename T>
static void flush_lanes(const LaneMatrix<T>& M, int64_t b, int64_t steps, int64_t lanes,
                        T* __restrict__ acc, T* __restrict__ dM) {
  constexpr int64_t W = kLanes<T>;
  const int64_t N = M.N, L = M.L;
  T* base = dM + b * M.groups * L * N;
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      T* __restrict__ a = acc + (t * N + n) * W;
      if (M.uniform) {
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < W; ++l) sum += a[l];
        base[(M.group[0] * L + t) * N + n] += sum;
      } else {
        for (int64_t l = 0; l < lanes; ++l) base[(M.group[l] * L + t) * N + n] += a[l];
      }
      std::fill(a, a + W, T(0));
    }
  }
}

// Adds a constant B/C gradient's lane sums (acc, (N, W), over the block's steps) to the slot's
// (dim, N) sum and clears them.
template <typename T>
static void flush_const(int64_t d0, int64_t lanes, int64_t N, T* __restrict__ acc,
                        T* __restrict__ dM) {
  constexpr int64_t W = kLanes<T>;
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t n = 0; n < N; ++n) dM[(d0 + l) * N + n] += acc[n * W + l];
  std::fill(acc, acc + N * W, T(0));
}

template <typename T>
static void bwd_kernel(const Scan<T>& s, const at::Tensor& dout, int64_t slots, at::Tensor& du,
                       at::Tensor& ddelta, at::Tensor& dz, at::Tensor& dA_s, at::Tensor& dD_s,
                       at::Tensor& dB_s, at::Tensor& dC_s) {
  constexpr int64_t W = kLanes<T>;
  const int64_t dim = s.dim, L = s.L, N = s.N;
  const View<T> dout_v(dout), du_v(du), dd_v(ddelta);
  const View<T> dz_v = s.z.p ? View<T>(dz) : View<T>();
  for_each_slot(s.batch, slots, [&](int64_t slot, int64_t b0, int64_t b1) {
    Block<T> k(L, N, /*backward=*/true);
    T* dA_acc = dA_s.data_ptr<T>() + slot * dim * N;
    T* dD_acc = dD_s.data_ptr<T>() + slot * dim;
    // constant B/C: per-slot (dim, N) sums; variable: (batch, groups, L, N), rows owned here
    T* dB = dB_s.data_ptr<T>() + (s.var_b ? 0 : slot * dim * N);
    T* dC = dC_s.data_ptr<T>() + (s.var_c ? 0 : slot * dim * N);
    std::fill(k.acc_b, k.acc_b + L * N * W, T(0));
    std::fill(k.acc_c, k.acc_c + L * N * W, T(0));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t steps = s.steps(b);
      for (int64_t d0 = 0; d0 < dim; d0 += W) {
        const int64_t lanes = std::min(W, dim - d0);
        const LaneMatrix<T> Bm(s.B, s.var_b, s.groups_b, b, d0, lanes, dim, N, L);
        const LaneMatrix<T> Cm(s.C, s.var_c, s.groups_c, b, d0, lanes, dim, N, L);
        load_block(s, b, d0, lanes, steps, k);
        // recompute exp(dt A) and the states; y (pre-gate C . h) only where dz needs it
        scan_block<true>(s, d0, lanes, steps, Bm, Cm, k, [&](int64_t t) {
          return s.z.p && (!s.pos || t == steps - 1);
        });
        // dy = dL/d(pre-gate y) per step (lane-minor); dz
        T* __restrict__ dy = k.dy;
        std::fill(dy, dy + steps * W, T(0));
        if (s.pos) {
          const int64_t t = steps - 1;
          for (int64_t l = 0; l < lanes; ++l) {
            T go = dout_v.at2(b, d0 + l);
            if (s.z.p) {
              const T zz = s.z.at2(b, d0 + l), sig = sigmoid_(zz);
              dz_v.at2(b, d0 + l) = go * (k.y[t * W + l] + k.D[l] * k.u[t * W + l]) *
                               (sig * (T(1) + zz * (T(1) - sig)));
              go *= zz * sig;
            }
            dy[t * W + l] = go;
          }
        } else {
          load_lanes(dout_v, b, d0, L, lanes, dy);
          if (s.z.p) {
            load_lanes(s.z, b, d0, L, lanes, k.z);
            T* __restrict__ dzl = k.t0;
            const T* __restrict__ z = k.z;
            const T* __restrict__ y = k.y;
            const T* __restrict__ u = k.u;
            for (int64_t t = 0; t < L; ++t) {
#pragma omp simd
              for (int64_t l = 0; l < W; ++l) {
                const int64_t i = t * W + l;
                const T sig = sigmoid_(z[i]);
                dzl[i] = dy[i] * (y[i] + k.D[l] * u[i]) * (sig * (T(1) + z[i] * (T(1) - sig)));
                dy[i] *= z[i] * sig;
              }
            }
            store_lanes(dzl, dz_v, b, d0, L, lanes);
          }
        }
        // adjoint, backwards in time: g_t = a_{t+1} g_{t+1} + C_t dy_t
        T* __restrict__ g = k.g;
        T* __restrict__ dAl = k.dA;
        T* __restrict__ du_l = k.t0;
        T* __restrict__ dd_l = k.t1;
        std::fill(g, g + N * W, T(0));
        std::fill(dAl, dAl + N * W, T(0));
        std::fill(k.dD, k.dD + W, T(0));
        if (!Bm.var) Bm.fill(0, d0, lanes, k.Bl);
        if (!Cm.var) Cm.fill(0, d0, lanes, k.Cl);
        const T* __restrict__ A = k.A;
        for (int64_t t = steps - 1; t >= 0; --t) {
          if (Bm.var) Bm.fill(t, d0, lanes, k.Bl);
          if (Cm.var) Cm.fill(t, d0, lanes, k.Cl);
          const T* __restrict__ Bl = k.Bl;
          const T* __restrict__ Cl = k.Cl;
          const T* __restrict__ at = k.a_all + t * N * W;
          const T* __restrict__ an = k.a_all + (t + 1 < steps ? t + 1 : t) * N * W;  // g = 0 at the end
          const T* __restrict__ ht = k.h_all + t * N * W;
          const T* __restrict__ hp = t > 0 ? k.h_all + (t - 1) * N * W : k.zero;
          T* __restrict__ rb = Bm.var ? k.acc_b + t * N * W : k.acc_b;
          T* __restrict__ rc = Cm.var ? k.acc_c + t * N * W : k.acc_c;
          const T* __restrict__ dyt = dy + t * W;
          const T* __restrict__ dtt = k.dt + t * W;
          const T* __restrict__ dtut = k.dtu + t * W;
          T s_gb[W] = {}, s_wa[W] = {};
          for (int64_t n = 0; n < N; ++n) {
            const int64_t o = n * W;
#pragma omp simd
            for (int64_t l = 0; l < W; ++l) {
              const T gn = an[o + l] * g[o + l] + Cl[o + l] * dyt[l];
              g[o + l] = gn;
              rc[o + l] += dyt[l] * ht[o + l];
              rb[o + l] += gn * dtut[l];
              s_gb[l] += gn * Bl[o + l];
              const T w = gn * hp[o + l] * at[o + l];  // dL/d(dt_t A) = g_t a_t h_{t-1}
              s_wa[l] += w * A[o + l];
              dAl[o + l] += w * dtt[l];
            }
          }
          const T* __restrict__ u = k.u + t * W;
          const T* __restrict__ x = k.x + t * W;
#pragma omp simd
          for (int64_t l = 0; l < W; ++l) {
            du_l[t * W + l] = s_gb[l] * dtt[l] + dyt[l] * k.D[l];
            const T d_dt = s_wa[l] + s_gb[l] * u[l];
            dd_l[t * W + l] = s.softplus ? d_dt * dsoftplus_(x[l]) : d_dt;
            k.dD[l] += dyt[l] * u[l];
          }
        }
        store_lanes(du_l, du_v, b, d0, steps, lanes);
        store_lanes(dd_l, dd_v, b, d0, steps, lanes);
        for (int64_t l = 0; l < lanes; ++l) {
          dD_acc[d0 + l] += k.dD[l];
          for (int64_t n = 0; n < N; ++n) dA_acc[(d0 + l) * N + n] += dAl[n * W + l];
        }
        // variable B/C: lane sums keep accumulating while the next block lies in the same
        // group (one flush per row with one group); constant: per block
        for (auto [M, acc, dM] : {std::make_tuple(&Bm, k.acc_b, dB),
                                  std::make_tuple(&Cm, k.acc_c, dC)}) {
          if (!M->var) {
            flush_const(d0, lanes, N, acc, dM);
            continue;
          }
          const int64_t per_group = dim / M->groups, next = d0 + W;
          const bool defer = M->uniform && next < dim && next / per_group == M->group[0] &&
                             (std::min(next + W, dim) - 1) / per_group == M->group[0];
          if (!defer) flush_lanes(*M, b, steps, lanes, acc, dM);
        }
      }
    }
  });
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
                "selective_scan: positions must be int64 (batch,)");  // values: Scan::steps
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

// ---------------------------------------------------------------------- operators

std::tuple<at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const c10::optional<at::Tensor>& D_in,
    const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& bias_in,
    bool delta_softplus, const c10::optional<at::Tensor>& pos_in) {
  check_args(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, bias_in, pos_in);
  const at::Tensor &u = u_in, &delta = delta_in;  // any strides (View)
  const at::Tensor A = A_in.contiguous();
  const at::Tensor Bt = time_major(B_in), Ct = time_major(C_in);
  const auto D = contig(D_in), bias = contig(bias_in), pos = contig(pos_in);
  const c10::optional<at::Tensor>& z = z_in;  // any strides (View)
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  at::Tensor out = pos ? at::empty({batch, dim}, u.options()) : at::empty_like(u);
  at::Tensor last = at::empty({batch, dim, N}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_fwd", [&] {
    fwd_kernel(make_scan<scalar_t>(u, delta, A, Bt, Ct, D, z, bias, pos, delta_softplus), out,
               last);
  });
  return {out, last};
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
  const at::Tensor &u = u_in, &delta = delta_in;  // any strides (View)
  const at::Tensor A = A_in.contiguous();
  const at::Tensor Bt = time_major(B_in), Ct = time_major(C_in);
  const at::Tensor& dout = dout_in;
  const auto D = contig(D_in), bias = contig(bias_in), pos = contig(pos_in);
  const c10::optional<at::Tensor>& z = z_in;  // any strides (View)
  TORCH_CHECK(dout.sizes() == (pos ? at::IntArrayRef({u.size(0), u.size(1)}) : u.sizes()),
              "selective_scan_bwd: dout has the wrong shape");
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  const int64_t slots = num_slots(batch);
  const bool var_b = Bt.dim() == 4, var_c = Ct.dim() == 4;
  at::Tensor du = at::zeros_like(u), ddelta = at::zeros_like(delta);  // their layouts
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
