// Vectorisable math for the CPU kernels of mdaf_rec/ops (selective_scan.cpp, causal_conv1d.cpp):
// inline polynomial forms of exp, log1p, softplus and sigmoid that gcc vectorises inside
// "#pragma omp simd" loops (libm calls would not be).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mdaf_rec_math {


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


}  // namespace mdaf_rec_math
