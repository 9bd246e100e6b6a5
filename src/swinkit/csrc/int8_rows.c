/* The passes around an int8 matrix product for swinkit.quantize.Int8Linear, one CPU thread each.
 *
 * Built into the same library as window_attention.c (swinkit/native.py). In PyTorch operations the
 * input's quantization took five passes over memory (abs, amax, div, round, the cast to int8) and
 * the output's four (the cast to float, two scalings, the bias) plus the residual add: together
 * more time than the int8 product itself. Here each is one pass, a row at a time while it is in
 * the L1 cache. The arithmetic is PyTorch's, in its order: x / scale rounded half to even, and
 * ((float) acc * row_scale) * column_scale + bias.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define LEVELS 127.0f           /* symmetric int8: -127..127 */
#define SMALLEST 1e-30f         /* the scale of an all-zero row: its values stay 0 */
#define LARGEST_FINITE 0x7f7fffffu /* FLT_MAX's bits */

/* x: rows x cols floats, rows `stride` floats apart; q: rows x cols int8, contiguous; scale: rows.
 * scale[r] = max(max |x[r, :]|, SMALLEST) / LEVELS and q[r, c] = round_half_even(x[r, c] / scale[r]).
 * A row holding a NaN or an infinity gets scale NaN and q 0, so that its outputs are NaN, as a
 * float32 product's would be. */
void swinkit_quantize_rows(const float *x, long rows, long cols, long stride, int8_t *q, float *scale) {
  for (long r = 0; r < rows; r++) {
    const float *row = x + r * stride;
    int8_t *out = q + r * cols;
    /* |x| as bits: for non-negative floats the integer order is the float order, with every
     * infinity and NaN above the finite values (and an integer maximum vectorizes). */
    uint32_t largest = 0;
    for (long c = 0; c < cols; c++) {
      uint32_t bits;
      memcpy(&bits, row + c, sizeof bits);
      bits &= 0x7fffffffu;
      largest = bits > largest ? bits : largest;
    }
    if (largest > LARGEST_FINITE) {
      scale[r] = NAN;
      memset(out, 0, (size_t)cols);
      continue;
    }
    float magnitude;
    memcpy(&magnitude, &largest, sizeof magnitude);
    float s = (magnitude > SMALLEST ? magnitude : SMALLEST) / LEVELS;
    scale[r] = s;
    for (long c = 0; c < cols; c++)
      out[c] = (int8_t)(int32_t)rintf(row[c] / s); /* the default rounding mode: to nearest, ties to even */
  }
}

/* out[r, c] = ((float) acc[r, c] * row_scale[r]) * column_scale[c] + bias[c] (+ residual[r, c]);
 * acc, out and residual are rows x cols, contiguous; bias and residual may be NULL. out may be acc
 * (swinkit passes it so): each value is read before the one written in its place, and the three
 * steps stay separate loops so that no multiply and add fuse into one rounding (PyTorch's order). */
void swinkit_dequantize_rows(const int32_t *acc, long rows, long cols, const float *row_scale,
                             const float *column_scale, const float *bias, const float *residual, float *out) {
  for (long r = 0; r < rows; r++) {
    const int32_t *in = acc + r * cols;
    float *row = out + r * cols, s = row_scale[r];
    for (long c = 0; c < cols; c++)
      row[c] = ((float)in[c] * s) * column_scale[c];
    if (bias != NULL)
      for (long c = 0; c < cols; c++)
        row[c] += bias[c];
    if (residual != NULL) {
      const float *add = residual + r * cols;
      for (long c = 0; c < cols; c++)
        row[c] += add[c];
    }
  }
}
