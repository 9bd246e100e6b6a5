/* Window attention for one CPU core, float32: softmax(scale q k^T + bias) v per window and head.
 *
 * Built by swinkit/native.py on first use and called through ctypes by the fused path
 * (swinkit/fast.py), one call per chunk of windows; swinkit_window_attention_backward gives the
 * gradients for training (V1 and V2), and the _bf16 entry points at the end do both on bfloat16
 * qkv (CPU autocast), computing in float32. It replaces, per head, two small batched
 * matrix products (49 x 32 x 49: MKL runs those at a third of its large-GEMM rate), the scale, the
 * bias add, the softmax and the copy that interleaves the heads again: each window's q, k, v stay
 * in the L1 cache from the first product to the output.
 *
 * Written with GCC vector extensions, so one source builds for AVX-512 (LANES 16, TILE 64, ROWS 4)
 * and AVX2 (LANES 8, TILE 16, ROWS 4); native.py passes those with -m flags.
 *
 * Layout: qkv is (windows, N, 3C), the qkv projection's output (q | k | v, each head's d = 32
 * channels together); bias is (groups, heads, N, N) and window w uses bias[w % groups]; out is
 * (windows, N, C) with the heads side by side, as the output projection reads it.
 * mask (optional, NULL for none): the shift mask as its distinct patterns, (patterns, N, N), shared by
 * the heads; window w adds pattern mask_index[w % mask_windows], none where that is -1. A shifted
 * block's mask has at most three patterns (last column, last row, corner; inner windows: none), so
 * the position bias and the mask stay in cache across the windows, where a bias-plus-mask block per
 * window (1.8 MB in Swin-T's first stage, 20 MB with Swin-B 384's 12 x 12 windows) did not; the
 * logits get (q k^T + bias) + mask, the official code's order.
 * cosine != 0: V2's cosine attention, q and k rows divided by max(|row|, 1e-12) first.
 * scales[h] multiplies the logits of head h (V1: d^-0.5; V2: the clamped exp(logit_scale)).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <xmmintrin.h>

#include "vector.h"

#ifndef TILE
#define TILE 64 /* key positions per pass of q k^T, in TILE / LANES vectors */
#endif
#ifndef ROWS
#define ROWS 4 /* query rows per register block: ROWS * TILE / LANES accumulators */
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T0 /* where the next head's rows go: L1 (native.py: L2 on non-Intel CPUs) */
#endif
#define D 32            /* head size of every Swin configuration */
#define MAX_TOKENS 1024 /* windows up to 32 x 32 */
#define KEY_VECTORS (TILE / LANES)
#define OUT_VECTORS (D / LANES)

/* Horizontal max / sum as a tree: halves folded onto each other (a loop over the lanes would be a
 * chain of LANES dependent operations, about 50 cycles per softmax row). */
typedef float quarter __attribute__((vector_size(4 * sizeof(float))));
typedef int quarter_mask __attribute__((vector_size(4 * sizeof(float))));
static inline quarter quarter_max(quarter a, quarter b) {
  quarter_mask a_wins = a > b;
  return (quarter)((a_wins & (quarter_mask)a) | (~a_wins & (quarter_mask)b));
}
static inline quarter fold_to_quarter(vec v, int maximum) {
  quarter part[LANES / 4];
  memcpy(part, &v, sizeof v);
  for (int width = LANES / 4; width > 1; width /= 2)
    for (int i = 0; i < width / 2; i++)
      part[i] = maximum ? quarter_max(part[i], part[i + width / 2]) : part[i] + part[i + width / 2];
  return part[0];
}
static inline float largest_lane(vec v) {
  quarter q = fold_to_quarter(v, 1);
  return fmaxf(fmaxf(q[0], q[1]), fmaxf(q[2], q[3]));
}
static inline float lane_sum(vec v) {
  quarter q = fold_to_quarter(v, 0);
  return (q[0] + q[1]) + (q[2] + q[3]);
}

/* Subnormal floats flushed to zero for the duration of a call (the MXCSR's flush-to-zero and
 * denormals-are-zero bits), the thread's own mode restored after. A masked logit (-100 in the shift
 * mask) gives a probability near 1e-38 / sum, below float's normal range, and every product with
 * such a number takes a microcode assist: measured on Swin-T's stage 1 with masked windows, the
 * forward ran 2.4x and the backward 12x slower. Results move by less than 1.2e-38. */
static unsigned int flush_subnormals(void) {
  const unsigned int mode = _mm_getcsr();
  _mm_setcsr(mode | 0x8040); /* FTZ (bit 15) | DAZ (bit 6) */
  return mode;
}

/* The rows of the next window-head into L1 while this one computes. A qkv row is 3C values (1.1 KB
 * of float32 in Swin-T's stage 1, 4.5 KB in stage 3), so a head's slices of D values lie far apart,
 * from stage 3 on each on a 4 KB page of its own, where the hardware prefetchers do not follow;
 * without these the kernel waited on its loads of k and v: in Swin-T's forward a head took 1.3x as
 * long in stage 1 and 1.6x in stage 3 (benchmarks/RESULTS.md). `parts` slices, `part_step` bytes
 * apart, in each of N rows `stride` bytes apart; a slice is D values of `size` bytes (two cache
 * lines in float32, one in bfloat16). */
static inline __attribute__((always_inline)) void prefetch_rows(const char *first, long stride, long N, int parts,
                                                                long part_step, long size) {
  for (long r = 0; r < N; r++)
    for (int part = 0; part < parts; part++)
      for (long line = 0; line < D * size; line += 64)
        _mm_prefetch(first + r * stride + part * part_step + line, PREFETCH_HINT);
}

/* Before window w's head h: prefetch the q, k, v rows (and the output-gradient rows, unless dout
 * is NULL) of the next head, the same rows D values on, or after the last head, the next window's
 * first. qkv and dout hold values of `size` bytes. (Inlined: as a call, with its byte counts
 * unknown to the compiler, a head took 1.2-1.3x as long in stages 2-4 of Swin-T.) */
static inline __attribute__((always_inline)) void prefetch_next_head(const void *qkv, const void *dout, long w, long h,
                                                                     long windows, long heads, long N, long C,
                                                                     long size) {
  long window, head;
  if (h + 1 < heads)
    window = w, head = h + 1;
  else if (w + 1 < windows)
    window = w + 1, head = 0;
  else
    return;
  const long stride = 3 * C * size;
  prefetch_rows((const char *)qkv + window * N * stride + head * D * size, stride, N, 3, C * size, size);
  if (dout != NULL)
    prefetch_rows((const char *)dout + (window * N * C + head * D) * size, C * size, N, 1, 0, size);
}

/* Logits of ROWS rows (`row_stride` floats apart, N logits each, `padded` = N rounded up to LANES)
 * plus their bias rows (and mask rows, unless mask is NULL), turned into exp(logit - max) in place,
 * the padding lanes' logits set to -inf; inverse_sum[r] = 1 / the sum of row r. The rows go
 * together so that their dependency chains (maximum, exp's polynomial, sum) interleave instead of
 * waiting on each other's latency (with the prefetches, 1.08-1.12x on the forward kernel inside
 * Swin-T). Rows must not overlap; bias and mask rows may repeat. */
static inline __attribute__((always_inline)) void softmax_rows(float *rows, long row_stride,
                                                               const float *const bias[ROWS],
                                                               const float *const mask[ROWS], long N, long padded,
                                                               float inverse_sum[ROWS]) {
  const long whole = N / LANES * LANES;
  vec top[ROWS];
  for (int r = 0; r < ROWS; r++) top[r] = splat(-INFINITY);
  for (long j = 0; j < whole; j += LANES)
    for (int r = 0; r < ROWS; r++) {
      vec v = load(rows + r * row_stride + j) + load(bias[r] + j);
      if (mask) v += load(mask[r] + j); /* loop-invariant: the compiler makes two loops */
      store(rows + r * row_stride + j, v);
      top[r] = larger(top[r], v);
    }
  if (whole < N) {
    ivec lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    const ivec valid = lane < (int)(N - whole);
    for (int r = 0; r < ROWS; r++) {
      vec tail_bias = splat(0.0f), tail_mask = splat(0.0f);
      for (long i = 0; i < N - whole; i++) tail_bias[i] = bias[r][whole + i];
      if (mask)
        for (long i = 0; i < N - whole; i++) tail_mask[i] = mask[r][whole + i];
      float *row = rows + r * row_stride;
      const vec logit = load(row + whole) + tail_bias + tail_mask;
      vec v = (vec)((valid & (ivec)logit) | (~valid & (ivec)splat(-INFINITY)));
      store(row + whole, v);
      top[r] = larger(top[r], v);
    }
  }
  /* exp(x) for x < -87 (the padding's -inf among them) is below float's normal range: 1.6e-38 in
   * its place is negligible next to the row maximum's exp(0) = 1 in the sum. The floor goes first:
   * `larger` returns its second operand where either is NaN, so a NaN logit, a +inf one (inf - inf)
   * and a row of -inf ones stay NaN through exp and the sum, as PyTorch's softmax makes their rows
   * (the floor second dropped them: the kernel gave finite rows there). */
  const vec floor = splat(-87.0f);
  vec maximum[ROWS], sum[ROWS];
  for (int r = 0; r < ROWS; r++) maximum[r] = splat(largest_lane(top[r])), sum[r] = splat(0.0f);
  for (long j = 0; j < padded; j += LANES)
    for (int r = 0; r < ROWS; r++) {
      vec e = exp_nonpositive(larger(floor, load(rows + r * row_stride + j) - maximum[r]));
      store(rows + r * row_stride + j, e);
      sum[r] += e;
    }
  for (int r = 0; r < ROWS; r++) inverse_sum[r] = 1.0f / lane_sum(sum[r]);
}

static float inverse_norm(const float *row) {
  float sum = 0.0f;
  for (int c = 0; c < D; c++) sum += row[c] * row[c];
  return 1.0f / fmaxf(sqrtf(sum), 1e-12f);
}

/* Transposes LANES x LANES floats held as LANES row vectors, in registers: log2(LANES) rounds, each
 * swapping the off-diagonal blocks of every 2 x 2 block of `width` x `width` (4x faster than scalar
 * copies; the copies took a fifth of the kernel's time). */
static inline __attribute__((always_inline)) void transpose_block(vec rows[LANES]) {
#pragma GCC unroll 8
  for (int width = LANES / 2; width >= 1; width /= 2) {
    ivec upper, lower; /* indices into the two rows side by side: 0 .. LANES - 1, then LANES .. */
    for (int lane = 0; lane < LANES; lane++) {
      upper[lane] = lane & width ? LANES + lane - width : lane;
      lower[lane] = lane & width ? LANES + lane : lane + width;
    }
#pragma GCC unroll 16
    for (int i = 0; i < LANES; i++)
      if (!(i & width)) {
        const vec top = rows[i], bottom = rows[i + width];
        rows[i] = __builtin_shuffle(top, bottom, upper);
        rows[i + width] = __builtin_shuffle(top, bottom, lower);
      }
  }
}

/* keys = k^T (D x `stride_keys`), zero past N; with cosine, k's rows normalised first. */
static inline __attribute__((always_inline)) void transpose_keys(const float *k, long stride, long N,
                                                                 long stride_keys, int cosine, float *keys) {
  for (long first = 0; first < stride_keys; first += LANES) {
    float factor[LANES]; /* per key row: its 1 / norm with cosine, 1 without, 0 past N */
    for (int j = 0; j < LANES; j++)
      factor[j] = first + j >= N ? 0.0f : cosine ? inverse_norm(k + (first + j) * stride) : 1.0f;
    for (int channel = 0; channel < D; channel += LANES) {
      vec rows[LANES];
      for (int j = 0; j < LANES; j++)
        rows[j] = first + j < N ? load(k + (first + j) * stride + channel) * splat(factor[j]) : splat(0.0f);
      transpose_block(rows);
      for (int c = 0; c < LANES; c++) store(keys + (channel + c) * stride_keys + first, rows[c]);
    }
  }
}

/* logits[r * stride_keys + first_key ...] for ROWS query rows against one TILE of keys. */
static inline __attribute__((always_inline)) void logits_tile(const float *queries, const float *keys,
                                                              long stride_keys, long first_key, float *logits) {
  vec acc[ROWS][KEY_VECTORS];
  for (int r = 0; r < ROWS; r++)
    for (int t = 0; t < KEY_VECTORS; t++) acc[r][t] = splat(0.0f);
  for (int c = 0; c < D; c++) {
    vec key[KEY_VECTORS];
    for (int t = 0; t < KEY_VECTORS; t++) key[t] = load(keys + c * stride_keys + first_key + t * LANES);
    for (int r = 0; r < ROWS; r++) {
      vec a = splat(queries[r * D + c]);
      for (int t = 0; t < KEY_VECTORS; t++) acc[r][t] += a * key[t];
    }
  }
  for (int r = 0; r < ROWS; r++)
    for (int t = 0; t < KEY_VECTORS; t++) store(logits + r * stride_keys + first_key + t * LANES, acc[r][t]);
}

/* One window, one head. q, k, v rows are `stride` floats apart; out rows `out_stride`. */
static inline __attribute__((always_inline)) void window_head(const float *q, const float *k, const float *v,
                                                              long stride, long N, const float *bias,
                                                              const float *mask, float scale, int cosine, float *out,
                                                              long out_stride, float *keys, float *logits) {
  const long stride_keys = (N + TILE - 1) / TILE * TILE, padded = (N + LANES - 1) / LANES * LANES;
  float queries[ROWS * D];
  transpose_keys(k, stride, N, stride_keys, cosine, keys);
  for (long first = 0; first < N; first += ROWS) {
    const long rows = N - first < ROWS ? N - first : ROWS;
    for (int r = 0; r < ROWS; r++) { /* a short last block repeats its last row */
      const float *row = q + (first + (r < rows ? r : rows - 1)) * stride;
      const float factor = cosine ? scale * inverse_norm(row) : scale;
      for (int c = 0; c < D; c++) queries[r * D + c] = row[c] * factor;
    }
    for (long first_key = 0; first_key < stride_keys; first_key += TILE)
      logits_tile(queries, keys, stride_keys, first_key, logits);
    float inverse_sum[ROWS];
    const float *bias_rows[ROWS], *mask_rows[ROWS];
    for (int r = 0; r < ROWS; r++) {
      const long i = first + (r < rows ? r : rows - 1);
      bias_rows[r] = bias + i * N, mask_rows[r] = mask ? mask + i * N : NULL;
    }
    softmax_rows(logits, stride_keys, bias_rows, mask ? mask_rows : NULL, N, padded, inverse_sum);

    vec acc[ROWS][OUT_VECTORS];
    for (int r = 0; r < ROWS; r++)
      for (int t = 0; t < OUT_VECTORS; t++) acc[r][t] = splat(0.0f);
    for (long j = 0; j < N; j++) {
      vec value[OUT_VECTORS];
      for (int t = 0; t < OUT_VECTORS; t++) value[t] = load(v + j * stride + t * LANES);
      for (int r = 0; r < ROWS; r++) {
        vec a = splat(logits[r * stride_keys + j]);
        for (int t = 0; t < OUT_VECTORS; t++) acc[r][t] += a * value[t];
      }
    }
    for (int r = 0; r < rows; r++)
      for (int t = 0; t < OUT_VECTORS; t++)
        store(out + (first + r) * out_stride + t * LANES, acc[r][t] * splat(inverse_sum[r]));
  }
}

/* out row i = factor * sum over j < inner of a(i, j) * b row j, for i < count; a(i, j) is
 * a[i * row_step + j * column_step]: a matrix (column_step 1) or a transposed one (row_step 1), read
 * in place either way. The last register block reads up to ROWS - 1 values of i past `count`
 * (finite slack; their results are dropped). b and out rows hold D floats. */
static inline __attribute__((always_inline)) void rows_times(const float *a, long row_step, long column_step,
                                                             long count, long inner, const float *b, long stride_b,
                                                             float factor, float *out, long stride_out) {
  for (long first = 0; first < count; first += ROWS) {
    const long rows = count - first < ROWS ? count - first : ROWS;
    vec acc[ROWS][OUT_VECTORS];
    for (int r = 0; r < ROWS; r++)
      for (int t = 0; t < OUT_VECTORS; t++) acc[r][t] = splat(0.0f);
    for (long j = 0; j < inner; j++) {
      vec value[OUT_VECTORS];
      for (int t = 0; t < OUT_VECTORS; t++) value[t] = load(b + j * stride_b + t * LANES);
      for (int r = 0; r < ROWS; r++) {
        vec s = splat(a[(first + r) * row_step + j * column_step]);
        for (int t = 0; t < OUT_VECTORS; t++) acc[r][t] += s * value[t];
      }
    }
    for (int r = 0; r < rows; r++)
      for (int t = 0; t < OUT_VECTORS; t++) store(out + (first + r) * stride_out + t * LANES, acc[r][t] * splat(factor));
  }
}

/* rows[i] . keys for every row i < N of `rows` (stride floats apart, times `factor`) into
 * products[i][0 .. stride_keys), keys being D x stride_keys (a transposed k or v). */
static void rows_by_keys(const float *rows_in, long stride, long N, float factor, const float *keys, long stride_keys,
                         float *products) {
  float queries[ROWS * D];
  for (long first = 0; first < N; first += ROWS) {
    const long rows = N - first < ROWS ? N - first : ROWS;
    for (int r = 0; r < ROWS; r++) { /* a short last block repeats its last row */
      const float *row = rows_in + (first + (r < rows ? r : rows - 1)) * stride;
      for (int c = 0; c < D; c++) queries[r * D + c] = row[c] * factor;
    }
    for (long first_key = 0; first_key < stride_keys; first_key += TILE)
      logits_tile(queries, keys, stride_keys, first_key, products + first * stride_keys);
  }
}

/* Rows of x (N of them, `stride` floats apart) divided by max(|row|, 1e-12) into `unit` (rows D
 * floats apart); the divisors' inverses into `inverse`. */
static void normalise_rows(const float *x, long stride, long N, float *unit, float *inverse) {
  for (long i = 0; i < N; i++) {
    inverse[i] = inverse_norm(x + i * stride);
    for (int c = 0; c < D; c++) unit[i * D + c] = x[i * stride + c] * inverse[i];
  }
}

/* Each row g of `grad` arrives as the gradient of a unit row u = x / max(|x|, 1e-12) and leaves
 * as that of x: (g - u (u . g)) / |x|, or g / 1e-12 where the norm was clamped (no projection
 * then, as the clamp's derivative is zero). Returns the sum over rows of u . g as it arrived. */
static float through_normalisation(float *grad, long stride, long N, const float *unit, const float *inverse) {
  float total = 0.0f;
  for (long i = 0; i < N; i++) {
    float *g = grad + i * stride;
    const float *u = unit + i * D;
    float dot = 0.0f;
    for (int c = 0; c < D; c++) dot += u[c] * g[c];
    total += dot;
    const float along = inverse[i] < 1.0f / 1e-12f ? dot : 0.0f;
    for (int c = 0; c < D; c++) g[c] = inverse[i] * (g[c] - u[c] * along);
  }
  return total;
}

/* Gradients of one window and head: the probabilities P are recomputed as the forward computed
 * them; dP = dO v^T, dS = P (dP - rowsum(P dP)), dq = scale dS k, dk = scale dS^T q,
 * dv = P^T dO, and dS added onto the bias gradient. With cosine, q and k are the unit rows, the
 * gradients are taken back through the normalisation and the scale's gradient, sum(dS q k^T),
 * is added onto *dscale. `work` holds D + 2 (N + ROWS) rows of stride_keys floats, all finite,
 * then 2 N D + 2 N floats. */
static inline __attribute__((always_inline)) void window_head_backward(
    const float *q, const float *k, const float *v, long stride, long N, const float *bias, const float *mask,
    float scale, int cosine, const float *dout, long dout_stride, float *dq, float *dk, float *dv, float *dbias,
    float *dscale, float *work) {
  const long stride_keys = (N + TILE - 1) / TILE * TILE, padded = (N + LANES - 1) / LANES * LANES;
  float *keys = work, *p = keys + D * stride_keys, *ds = p + (N + ROWS) * stride_keys;
  float *unit_q = ds + (N + ROWS) * stride_keys;
  float *unit_k = unit_q + N * D, *inverse_q = unit_k + N * D, *inverse_k = inverse_q + N;
  long qk_stride = stride;
  if (cosine) {
    normalise_rows(q, stride, N, unit_q, inverse_q);
    normalise_rows(k, stride, N, unit_k, inverse_k);
    q = unit_q, k = unit_k, qk_stride = D;
  }
  transpose_keys(k, qk_stride, N, stride_keys, 0, keys);
  rows_by_keys(q, qk_stride, N, scale, keys, stride_keys, p);
  for (long first = 0; first < N; first += ROWS) { /* rows past N: the slack rows, never read */
    float inverse_sum[ROWS];
    const float *bias_rows[ROWS], *mask_rows[ROWS];
    for (int r = 0; r < ROWS; r++) {
      const long i = first + r < N ? first + r : N - 1;
      bias_rows[r] = bias + i * N, mask_rows[r] = mask ? mask + i * N : NULL;
    }
    softmax_rows(p + first * stride_keys, stride_keys, bias_rows, mask ? mask_rows : NULL, N, padded, inverse_sum);
    for (int r = 0; r < ROWS && first + r < N; r++) {
      float *row = p + (first + r) * stride_keys;
      for (long j = 0; j < N; j++) row[j] *= inverse_sum[r];
      for (long j = N; j < stride_keys; j++) row[j] = 0.0f;
    }
  }
  transpose_keys(v, stride, N, stride_keys, 0, keys);
  rows_by_keys(dout, dout_stride, N, 1.0f, keys, stride_keys, ds); /* dP; zero past N (v^T is) */
  for (long i = 0; i < N; i++) {
    const float *p_row = p + i * stride_keys;
    float *row = ds + i * stride_keys, *bias_row = dbias + i * N;
    vec dot = splat(0.0f);
    for (long j = 0; j < padded; j += LANES) dot += load(p_row + j) * load(row + j);
    const vec delta = splat(lane_sum(dot));
    for (long j = 0; j < padded; j += LANES) store(row + j, load(p_row + j) * (load(row + j) - delta));
    for (long j = 0; j < N; j++) bias_row[j] += row[j];
  }
  rows_times(ds, stride_keys, 1, N, N, k, qk_stride, scale, dq, stride);
  rows_times(ds, 1, stride_keys, N, N, q, qk_stride, scale, dk, stride); /* dS^T and P^T read in place */
  rows_times(p, 1, stride_keys, N, N, dout, dout_stride, 1.0f, dv, stride);
  if (cosine) { /* dq holds scale dS k here, so q . dq summed is scale times the scale's gradient */
    *dscale += through_normalisation(dq, stride, N, unit_q, inverse_q) / scale;
    through_normalisation(dk, stride, N, unit_k, inverse_k);
  }
}

/* The mask pattern of window w: NULL where it has none. */
static inline const float *window_mask(const float *mask, const int *mask_index, long mask_windows, long w, long N) {
  if (mask == NULL) return NULL;
  const int pattern = mask_index[w % mask_windows];
  return pattern < 0 ? NULL : mask + (long)pattern * N * N;
}

/* window_head_backward for N, through a copy compiled for the published window sizes. */
static __attribute__((noinline)) void head_backward_sized(const float *q, long C, long stride, long N,
                                                          const float *bias, const float *mask, float scale,
                                                          int cosine, const float *dout, float *dq, float *dbias,
                                                          float *dscale, float *work) {
  if (N == 49)
    window_head_backward(q, q + C, q + 2 * C, stride, 49, bias, mask, scale, cosine, dout, C, dq, dq + C, dq + 2 * C,
                         dbias, dscale, work);
  else if (N == 64)
    window_head_backward(q, q + C, q + 2 * C, stride, 64, bias, mask, scale, cosine, dout, C, dq, dq + C, dq + 2 * C,
                         dbias, dscale, work);
  else
    window_head_backward(q, q + C, q + 2 * C, stride, N, bias, mask, scale, cosine, dout, C, dq, dq + C, dq + 2 * C,
                         dbias, dscale, work);
}

/* The gradients of swinkit_window_attention given dout, (windows, N, C) like out: dqkv
 * (windows, N, 3C) is written whole; dbias (groups, heads, N, N) and, with cosine, dscales
 * (heads) are added to (pass zeros). Returns 0, or -1 for sizes it does not take (nothing
 * written then). */
int swinkit_window_attention_backward(const float *qkv, long windows, long N, long C, long heads, const float *bias,
                                      long groups, const float *mask, const int *mask_index, long mask_windows,
                                      const float *scales, int cosine, const float *dout, float *dqkv, float *dbias,
                                      float *dscales) {
  if (N < 1 || N > MAX_TOKENS || C != heads * D || groups < 1 || (mask && mask_windows < 1)) return -1;
  const long stride = 3 * C, stride_keys = (N + TILE - 1) / TILE * TILE;
  const size_t floats = (size_t)(D + 2 * (N + ROWS)) * stride_keys + 2 * N * D + 2 * N;
  float *work = aligned_alloc(64, (sizeof(float) * floats + 63) / 64 * 64);
  if (work == NULL) return -1;
  memset(work, 0, sizeof(float) * floats);
  const unsigned int mode = flush_subnormals();
  for (long w = 0; w < windows; w++) {
    const float *m = window_mask(mask, mask_index, mask_windows, w, N);
    for (long h = 0; h < heads; h++) {
      const float *q = qkv + w * N * stride + h * D, *o = dout + w * N * C + h * D;
      const float *b = bias + ((w % groups) * heads + h) * N * N;
      float *dq = dqkv + w * N * stride + h * D, *db = dbias + ((w % groups) * heads + h) * N * N;
      prefetch_next_head(qkv, dout, w, h, windows, heads, N, C, sizeof(float));
      head_backward_sized(q, C, stride, N, b, m, scales[h], cosine, o, dq, db, dscales + h, work);
    }
  }
  _mm_setcsr(mode);
  free(work);
  return 0;
}

/* window_head for N, through a copy compiled for the published window sizes: fixed trip counts
 * let the compiler unroll the softmax and the products (1.1-1.3x on the kernel for 7 x 7). Out of
 * line, as head_backward_sized: the float32 and bfloat16 entry points share one copy (the build
 * takes 8 s instead of 11; the same speed within noise, benchmarks/RESULTS.md). */
static __attribute__((noinline)) void head_sized(const float *q, long C, long stride, long N, const float *bias,
                                                 const float *mask, float scale, int cosine, float *out, float *keys,
                                                 float *logits) {
  if (N == 49)
    window_head(q, q + C, q + 2 * C, stride, 49, bias, mask, scale, cosine, out, C, keys, logits);
  else if (N == 64)
    window_head(q, q + C, q + 2 * C, stride, 64, bias, mask, scale, cosine, out, C, keys, logits);
  else if (N == 144)
    window_head(q, q + C, q + 2 * C, stride, 144, bias, mask, scale, cosine, out, C, keys, logits);
  else
    window_head(q, q + C, q + 2 * C, stride, N, bias, mask, scale, cosine, out, C, keys, logits);
}

/* Every window and head of the chunk. Returns 0, or -1 for sizes it does not take (nothing written then). */
int swinkit_window_attention(const float *qkv, long windows, long N, long C, long heads, const float *bias,
                             long groups, const float *mask, const int *mask_index, long mask_windows,
                             const float *scales, int cosine, float *out) {
  if (N < 1 || N > MAX_TOKENS || C != heads * D || groups < 1 || (mask && mask_windows < 1)) return -1;
  const long stride = 3 * C, stride_keys = (N + TILE - 1) / TILE * TILE;
  /* k^T, then the ROWS rows of logits, on cache-line boundaries */
  float *keys = aligned_alloc(64, sizeof(float) * (D + ROWS) * stride_keys);
  if (keys == NULL) return -1;
  const unsigned int mode = flush_subnormals();
  for (long w = 0; w < windows; w++) {
    const float *m = window_mask(mask, mask_index, mask_windows, w, N);
    for (long h = 0; h < heads; h++) {
      const float *q = qkv + w * N * stride + h * D;
      const float *b = bias + ((w % groups) * heads + h) * N * N;
      float *o = out + w * N * C + h * D, *logits = keys + D * stride_keys;
      prefetch_next_head(qkv, NULL, w, h, windows, heads, N, C, sizeof(float));
      head_sized(q, C, stride, N, b, m, scales[h], cosine, o, keys, logits);
    }
  }
  _mm_setcsr(mode);
  free(keys);
  return 0;
}

/* bfloat16 in and out (CPU autocast): a bfloat16 is the upper half of a float32, so widening is a
 * shift, exact; narrowing rounds to nearest even, as PyTorch's conversion does (NaN stays NaN). */
typedef unsigned short bf16;
typedef bf16 bf16_lanes __attribute__((vector_size(LANES * sizeof(bf16))));
typedef unsigned int uvec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec widen(const bf16 *p) {
  bf16_lanes h;
  memcpy(&h, p, sizeof h);
  const uvec bits = __builtin_convertvector(h, uvec) << 16;
  vec v;
  memcpy(&v, &bits, sizeof v);
  return v;
}

static inline void narrow(bf16 *p, vec v) {
  uvec bits;
  memcpy(&bits, &v, sizeof bits);
  const uvec nan = (uvec)((bits & 0x7FFFFFFFu) > 0x7F800000u); /* all ones where NaN */
  const uvec rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bf16_lanes h = __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), bf16_lanes);
  memcpy(p, &h, sizeof h);
}

/* One head's slices of a window's bfloat16 rows (`parts` of D values, C apart, in N rows `stride`
 * apart: q, k and v in qkv, or one in the output gradient) as N rows of parts * D floats. */
static void widen_head(const bf16 *first, long stride, long C, int parts, long N, float *local) {
  for (long r = 0; r < N; r++)
    for (int part = 0; part < parts; part++)
      for (int t = 0; t < D; t += LANES)
        store(local + (r * parts + part) * D + t, widen(first + r * stride + part * C + t));
}

/* The inverse of widen_head: N rows of parts * D floats into the head's bfloat16 slices, rounded. */
static void narrow_head(const float *local, long N, int parts, bf16 *first, long stride, long C) {
  for (long r = 0; r < N; r++)
    for (int part = 0; part < parts; part++)
      for (int t = 0; t < D; t += LANES)
        narrow(first + r * stride + part * C + t, load(local + (r * parts + part) * D + t));
}

/* swinkit_window_attention on bfloat16 qkv and out (bias, mask and scales stay float32): each
 * window-head's rows are widened into a float32 copy in L1 and its output rounded on the way out,
 * instead of a widened copy of the whole qkv and a rounding pass over the whole output in PyTorch. */
int swinkit_window_attention_bf16(const bf16 *qkv, long windows, long N, long C, long heads, const float *bias,
                                  long groups, const float *mask, const int *mask_index, long mask_windows,
                                  const float *scales, int cosine, bf16 *out) {
  if (N < 1 || N > MAX_TOKENS || C != heads * D || groups < 1 || (mask && mask_windows < 1)) return -1;
  const long stride = 3 * C, stride_keys = (N + TILE - 1) / TILE * TILE;
  /* k^T, the ROWS rows of logits, the head's widened rows and its output, on cache-line boundaries */
  float *keys = aligned_alloc(64, sizeof(float) * ((D + ROWS) * stride_keys + 4 * D * N));
  if (keys == NULL) return -1;
  float *logits = keys + D * stride_keys, *local = logits + ROWS * stride_keys, *result = local + 3 * D * N;
  const unsigned int mode = flush_subnormals();
  for (long w = 0; w < windows; w++) {
    const float *m = window_mask(mask, mask_index, mask_windows, w, N);
    for (long h = 0; h < heads; h++) {
      const bf16 *q = qkv + w * N * stride + h * D;
      const float *b = bias + ((w % groups) * heads + h) * N * N;
      prefetch_next_head(qkv, NULL, w, h, windows, heads, N, C, sizeof(bf16));
      widen_head(q, stride, C, 3, N, local);
      head_sized(local, D, 3 * D, N, b, m, scales[h], cosine, result, keys, logits);
      narrow_head(result, N, 1, out + w * N * C + h * D, C, 0);
    }
  }
  _mm_setcsr(mode);
  free(keys);
  return 0;
}

/* swinkit_window_attention_backward on bfloat16 qkv, dout and dqkv (bias, mask, scales and their
 * gradients stay float32): each window-head's q, k, v and dout rows widened into float32 copies,
 * its dq, dk, dv rounded on the way out, as the forward above does. */
int swinkit_window_attention_backward_bf16(const bf16 *qkv, long windows, long N, long C, long heads,
                                           const float *bias, long groups, const float *mask, const int *mask_index,
                                           long mask_windows, const float *scales, int cosine, const bf16 *dout,
                                           bf16 *dqkv, float *dbias, float *dscales) {
  if (N < 1 || N > MAX_TOKENS || C != heads * D || groups < 1 || (mask && mask_windows < 1)) return -1;
  const long stride = 3 * C, stride_keys = (N + TILE - 1) / TILE * TILE;
  /* window_head_backward's work space, then the head's widened q | k | v rows, dout rows and dq | dk | dv rows */
  const size_t floats = (size_t)(D + 2 * (N + ROWS)) * stride_keys + 2 * N * D + 2 * N;
  const size_t local = (floats + 15) / 16 * 16;
  float *work = aligned_alloc(64, (sizeof(float) * (local + 7 * N * D) + 63) / 64 * 64);
  if (work == NULL) return -1;
  memset(work, 0, sizeof(float) * floats);
  float *rows = work + local, *dout_rows = rows + 3 * N * D, *grad_rows = dout_rows + N * D;
  const unsigned int mode = flush_subnormals();
  for (long w = 0; w < windows; w++) {
    const float *m = window_mask(mask, mask_index, mask_windows, w, N);
    for (long h = 0; h < heads; h++) {
      const bf16 *q = qkv + w * N * stride + h * D, *o = dout + w * N * C + h * D;
      const float *b = bias + ((w % groups) * heads + h) * N * N;
      float *db = dbias + ((w % groups) * heads + h) * N * N;
      prefetch_next_head(qkv, dout, w, h, windows, heads, N, C, sizeof(bf16));
      widen_head(q, stride, C, 3, N, rows);
      widen_head(o, C, 0, 1, N, dout_rows);
      head_backward_sized(rows, D, 3 * D, N, b, m, scales[h], cosine, dout_rows, grad_rows, db, dscales + h, work);
      narrow_head(grad_rows, N, 3, dqkv + w * N * stride + h * D, stride, C);
    }
  }
  _mm_setcsr(mode);
  free(work);
  return 0;
}

/* The argument layout of the entry points above (native.py refuses a build of another). */
int swinkit_window_attention_abi(void) { return 3; }
