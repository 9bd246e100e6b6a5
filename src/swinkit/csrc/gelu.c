/* The gradient of GELU (exact, erf form) for the fused path's training step, one CPU thread.
 *
 * Built into the same library as window_attention.c (swinkit/native.py). PyTorch's gelu_backward
 * evaluates exp through a slower, more precise routine than its forward's erf does, and took twice a
 * forward GELU's time (6.8 against 3.1 ms on a stage-1 hidden layer of 4 images, one thread): 3% of
 * a Swin-T training step in a profile, and a plain multiply in its place made the step 1.04-1.08x
 * faster (benchmarks/RESULTS.md). Here one exp serves both terms:
 *
 *   GELU'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi),
 *   Phi(x) = 1 - erfc(|x| / sqrt 2) / 2 for x >= 0, erfc(|x| / sqrt 2) / 2 for x < 0,
 *
 * with erfc(a) = t (p1 + t (p2 + ... + t p5)) exp(-a^2), t = 1 / (1 + p a) (Abramowitz and Stegun
 * 7.1.26, absolute error below 1.5e-7: the erf of PyTorch's vectorized GELU). For x < 0 Phi is
 * formed from erfc directly, not as 1 minus a number near 1, so it keeps its relative precision.
 */
#include "vector.h"

#define SQRT_HALF 0.70710678118654752f
#define INVERSE_SQRT_2PI 0.39894228040143268f

static inline vec gelu_slope(vec x) {
  const vec a = (vec)((ivec)(x * splat(SQRT_HALF)) & splat_bits(0x7fffffff));
  const vec t = splat(1.0f) / (splat(1.0f) + splat(0.3275911f) * a);
  vec poly = splat(1.061405429f);
  poly = poly * t + splat(-1.453152027f);
  poly = poly * t + splat(1.421413741f);
  poly = poly * t + splat(-0.284496736f);
  poly = poly * t + splat(0.254829592f);
  poly = poly * t;
  /* exp(-x^2 / 2): 0 below float's normal range, so that an infinite x gives inf * 0 = NaN, as
   * PyTorch's does; a NaN x stays NaN (`larger` returns its second operand then). */
  const vec exponent = splat(-0.5f) * x * x;
  const ivec underflow = exponent < splat(-87.0f);
  const vec e = (vec)(~underflow & (ivec)exp_nonpositive(larger(splat(-87.0f), exponent)));
  const vec tail = splat(0.5f) * poly * e; /* erfc(|x| / sqrt 2) / 2 */
  const ivec negative = x < splat(0.0f);
  const vec cdf = (vec)((negative & (ivec)tail) | (~negative & (ivec)(splat(1.0f) - tail)));
  return cdf + x * (e * splat(INVERSE_SQRT_2PI));
}

/* out[i] = grad[i] * GELU'(x[i]) for i < n; out may be grad. The last n % LANES values go through
 * the same vector code, zero-padded. */
void swinkit_gelu_backward(const float *grad, const float *x, float *out, long n) {
  const long whole = n / LANES * LANES;
  for (long i = 0; i < whole; i += LANES) store(out + i, load(grad + i) * gelu_slope(load(x + i)));
  if (whole < n) {
    float g[LANES] = {0}, v[LANES] = {0}, result[LANES];
    memcpy(g, grad + whole, (n - whole) * sizeof(float));
    memcpy(v, x + whole, (n - whole) * sizeof(float));
    store(result, load(g) * gelu_slope(load(v)));
    memcpy(out + whole, result, (n - whole) * sizeof(float));
  }
}
