/* Window attention for one CPU core, AVX-512, float32: softmax(q k^T + bias) v per window and head.
 *
 * Built by swinkit/native.py on first use (cc -O3 -mavx512f -mfma) and called through ctypes by the
 * no-grad fused path (swinkit/fast.py), one call per chunk of windows. It replaces, per head, two
 * small batched matrix products (49 x 32 x 49: MKL runs those at a third of its large-GEMM rate),
 * the scale, the bias add, the softmax and the copy that interleaves the heads again: each window's
 * q, k, v stay in the L1 cache from the first product to the output row.
 *
 * Layout: qkv is (windows, N, 3C), the qkv projection's output (q | k | v, each head's d = 32
 * channels together); bias is (groups, heads, N, N) and window w uses bias[w % groups]; out is
 * (windows, N, C) with the heads side by side, as the output projection reads it. N <= 64.
 * cosine != 0: V2's cosine attention, q and k rows divided by max(|row|, 1e-12) first.
 * scales[h] multiplies the logits of head h (V1: d^-0.5; V2: the clamped exp(logit_scale)).
 */
#include <immintrin.h>
#include <math.h>

#define D 32      /* head dimension of every Swin configuration */
#define COLUMNS 64 /* key positions, padded to 4 vectors of 16 */
#define ROWS 4    /* query rows per register block: 16 accumulators for q k^T, 8 for p v */

/* exp(x) for x in [-87, 0] (x = logit - row maximum, clamped), 16 lanes, inline: x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by its Taylor series to degree 7 (truncation error below 6e-9, under float's
 * 6e-8 half-ulp), times 2^n by vscalefps. About twice as fast here as glibc's vector expf. */
static inline __m512 exp_nonpositive(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln2, high 16 bits */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);   /* ln2, the rest */
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

static __mmask16 valid_lanes(long count) {
  return count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
}

static float inverse_norm(const float *row) {
  float sum = 0.0f;
  for (int c = 0; c < D; c++) sum += row[c] * row[c];
  return 1.0f / fmaxf(sqrtf(sum), 1e-12f);
}

/* Softmax of one row of logits held in 4 registers (lanes >= N ignored) into p, and 1 / its sum. */
static float softmax_row(__m512 logits[4], const float *bias, long N, float *p) {
  const __m512 minus_infinity = _mm512_set1_ps(-INFINITY);
  __m512 largest = minus_infinity;
  for (int t = 0; t < 4; t++) {
    __mmask16 lanes = valid_lanes(N - 16 * t);
    __m512 with_bias = _mm512_add_ps(logits[t], _mm512_maskz_loadu_ps(lanes, bias + 16 * t));
    logits[t] = _mm512_mask_blend_ps(lanes, minus_infinity, with_bias);
    largest = _mm512_max_ps(largest, logits[t]);
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(largest));
  /* exp(x) for x < -87 (the padding lanes' -inf among them) is below float's normal range: 1.6e-38
   * in its place is negligible next to the row maximum's exp(0) = 1 in the sum. */
  const __m512 floor = _mm512_set1_ps(-87.0f);
  __m512 sum = _mm512_setzero_ps();
  for (int t = 0; t < 4; t++) {
    __m512 e = exp_nonpositive(_mm512_max_ps(_mm512_sub_ps(logits[t], top), floor));
    _mm512_store_ps(p + 16 * t, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

/* One window, one head. q, k, v rows are `stride` floats apart; out rows `out_stride`. */
static void window_head(const float *q, const float *k, const float *v, long stride, long N, const float *bias,
                        float scale, int cosine, float *out, long out_stride) {
  float keys[D * COLUMNS] __attribute__((aligned(64))); /* k^T, zero past N */
  float queries[ROWS * D] __attribute__((aligned(64)));
  float p[ROWS][COLUMNS] __attribute__((aligned(64)));
  for (long j = 0; j < N; j++) {
    float norm = cosine ? inverse_norm(k + j * stride) : 1.0f;
    for (int c = 0; c < D; c++) keys[c * COLUMNS + j] = k[j * stride + c] * norm;
  }
  for (int c = 0; c < D; c++)
    for (long j = N; j < COLUMNS; j++) keys[c * COLUMNS + j] = 0.0f;

  for (long first = 0; first < N; first += ROWS) {
    long rows = N - first < ROWS ? N - first : ROWS;
    for (int r = 0; r < ROWS; r++) { /* a short last block repeats its last row */
      const float *row = q + (first + (r < rows ? r : rows - 1)) * stride;
      float factor = cosine ? scale * inverse_norm(row) : scale;
      for (int c = 0; c < D; c++) queries[r * D + c] = row[c] * factor;
    }
    __m512 logits[ROWS][4];
    for (int r = 0; r < ROWS; r++)
      for (int t = 0; t < 4; t++) logits[r][t] = _mm512_setzero_ps();
    for (int c = 0; c < D; c++) {
      const float *key = keys + c * COLUMNS;
      __m512 k0 = _mm512_load_ps(key), k1 = _mm512_load_ps(key + 16), k2 = _mm512_load_ps(key + 32),
             k3 = _mm512_load_ps(key + 48);
      for (int r = 0; r < ROWS; r++) {
        __m512 a = _mm512_set1_ps(queries[r * D + c]);
        logits[r][0] = _mm512_fmadd_ps(a, k0, logits[r][0]);
        logits[r][1] = _mm512_fmadd_ps(a, k1, logits[r][1]);
        logits[r][2] = _mm512_fmadd_ps(a, k2, logits[r][2]);
        logits[r][3] = _mm512_fmadd_ps(a, k3, logits[r][3]);
      }
    }
    float inverse_sum[ROWS] = {0.0f};
    for (int r = 0; r < rows; r++) inverse_sum[r] = softmax_row(logits[r], bias + (first + r) * N, N, p[r]);
    for (int r = rows; r < ROWS; r++)
      for (int j = 0; j < COLUMNS; j++) p[r][j] = 0.0f;

    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (long j = 0; j < N; j++) {
      __m512 v0 = _mm512_loadu_ps(v + j * stride), v1 = _mm512_loadu_ps(v + j * stride + 16);
      for (int r = 0; r < ROWS; r++) {
        __m512 a = _mm512_set1_ps(p[r][j]);
        acc[r][0] = _mm512_fmadd_ps(a, v0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(a, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < rows; r++) {
      __m512 s = _mm512_set1_ps(inverse_sum[r]);
      float *row = out + (first + r) * out_stride;
      _mm512_storeu_ps(row, _mm512_mul_ps(acc[r][0], s));
      _mm512_storeu_ps(row + 16, _mm512_mul_ps(acc[r][1], s));
    }
  }
}

void swinkit_window_attention(const float *qkv, long windows, long N, long C, long heads, const float *bias,
                              long groups, const float *scales, int cosine, float *out) {
  const long stride = 3 * C;
  for (long w = 0; w < windows; w++)
    for (long h = 0; h < heads; h++) {
      const float *q = qkv + w * N * stride + h * D;
      window_head(q, q + C, q + 2 * C, stride, N, bias + ((w % groups) * heads + h) * N * N, scales[h], cosine,
                  out + w * N * C + h * D, C);
    }
}
