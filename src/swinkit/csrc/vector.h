/* The vector type and helpers shared by the native sources (window_attention.c, gelu.c).
 *
 * GCC vector extensions, so one source builds for AVX-512 (LANES 16) and AVX2 (LANES 8); native.py
 * passes LANES and the -m flags.
 */
#ifndef SWINKIT_VECTOR_H
#define SWINKIT_VECTOR_H

#include <string.h>

#ifndef LANES
#define LANES 16 /* floats per vector register */
#endif

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int ivec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec splat(float x) { /* a broadcast (x + a zero vector would be a scalar add first) */
  vec v = {x};
  return __builtin_shuffle(v, (ivec){0});
}
static inline ivec splat_bits(int x) {
  ivec v = {x};
  return __builtin_shuffle(v, (ivec){0});
}
static inline vec load(const float *p) {
  vec v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }
#if defined(__AVX512F__) && LANES == 16
#include <immintrin.h>
static inline vec larger(vec a, vec b) { return (vec)_mm512_max_ps((__m512)a, (__m512)b); }
#elif defined(__AVX__) && LANES == 8
#include <immintrin.h>
static inline vec larger(vec a, vec b) { return (vec)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vec larger(vec a, vec b) {
  ivec a_wins = a > b;
  return (vec)((a_wins & (ivec)a) | (~a_wins & (ivec)b));
}
#endif
/* exp(x) for x in [-87, 0] (callers clamp: a logit minus its row maximum, GELU's -x^2 / 2): x = n ln2 + r, |r| <= ln2 / 2,
 * e^r by its Taylor series to degree 7 (truncation error below 6e-9, under float's 6e-8 half-ulp),
 * times 2^n written straight into the exponent bits (n >= -126 keeps it a normal float). */
static inline vec exp_nonpositive(vec x) {
  const vec round = splat(12582912.0f); /* 1.5 * 2^23: adding and subtracting rounds to an integer */
  vec n = (x * splat(1.44269504088896341f) + round) - round;
  vec r = x - n * splat(0.693145751953125f); /* ln2, its high 16 bits: n * it is exact */
  r = r - n * splat(1.428606765330187e-06f); /* ln2, the rest */
  vec p = splat(1.0f / 5040.0f);
  p = p * r + splat(1.0f / 720.0f);
  p = p * r + splat(1.0f / 120.0f);
  p = p * r + splat(1.0f / 24.0f);
  p = p * r + splat(1.0f / 6.0f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  ivec two_to_n = (__builtin_convertvector(n, ivec) + 127) << 23;
  return p * (vec)two_to_n;
}

#endif
