"""Triton kernels of ``attn_impl="triton"``: window attention forward and backward on the map, and
the blocks' LayerNorms with their residual adds and casts (last: ``layer_norm_rows`` and its
backward for V1, ``residual_plus_layer_norm_rows`` for V2's inference).

Imported only when ``attn_impl="triton"`` runs (it imports triton). ``triton.jit`` compiles them
for GPU tensors; under ``TRITON_INTERPRET=1`` (set before triton is imported) they run in Triton's
interpreter on CPU tensors: slow, exact, and how they are tested on machines without a GPU.

Every attention program works on one (image, window, head) and a tile of its tokens. Window token
``t`` of window ``w`` is map token ``index[w * N + t]`` when that is >= 0; a negative entry
``-1 - s`` is padded token ``s`` of the image, whose q, k, v are the qkv bias (its input is zero)
and whose gradient goes to ``pad_grad[image, s]``. So shift, padding and partition are all in the
reads. The norm kernels work on a tile of whole rows (tokens) each.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _window_tokens(index, window, N, start, BLOCK: tl.constexpr):
    """Positions ``start + arange(BLOCK)`` of a window: in range, map token (or -1 - slot), real."""
    positions = start + tl.arange(0, BLOCK)
    in_range = positions < N
    token = tl.load(index + window * N + positions, mask=in_range, other=-1)
    return positions, in_range, token, token >= 0


@triton.jit
def _load_part(source, pad_values, token, real, channels, channel_ok, C):
    """One part (q, k or v: ``source`` and ``pad_values`` point at it) of the given tokens' rows."""
    offsets = tl.where(real, token, 0).to(tl.int64)[:, None] * (3 * C) + channels[None, :]
    values = tl.load(source + offsets, mask=real[:, None] & channel_ok[None, :], other=0.0)
    pad = tl.load(pad_values + channels, mask=channel_ok, other=0.0)
    return tl.where(real[:, None], values, pad[None, :])


@triton.jit
def _program(qkv, qkv_bias, scales, L, C, windows, heads, d, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Which (image, window, head) this program works on, its scale, and where its head's q / k / v start."""
    program = tl.program_id(0)
    head = program % heads
    window = (program // heads) % windows
    image = (program // (heads * windows)).to(tl.int64)
    scale = tl.load(scales + head).to(ACC)
    channels = tl.arange(0, BLOCK_D)
    source = qkv + image * L * 3 * C + head * d
    return program, head, window, image, scale, channels, channels < d, source, qkv_bias + head * d


@triton.jit
def _load_queries(source, pad_values, index, window, N, start, channels, channel_ok, C, BLOCK: tl.constexpr):
    """A tile of the window's queries (before V2's normalisation) and which tokens they are."""
    rows, row_ok, token, real = _window_tokens(index, window, N, start, BLOCK)
    return rows, row_ok, token, real, _load_part(source, pad_values, token, real, channels, channel_ok, C)


@triton.jit
def _load_keys(source, pad_values, index, window, N, start, channels, channel_ok, C, BLOCK: tl.constexpr):
    """A tile of the window's keys (before V2's normalisation) and values, and which tokens they are."""
    cols, col_ok, token, real = _window_tokens(index, window, N, start, BLOCK)
    k = _load_part(source + C, pad_values + C, token, real, channels, channel_ok, C)
    v = _load_part(source + 2 * C, pad_values + 2 * C, token, real, channels, channel_ok, C)
    return cols, col_ok, token, real, k, v


@triton.jit
def _bias_block(bias, window, bias_windows, heads, head, N):
    """Window ``window`` uses ``bias[window % bias_windows, head]``, an ``N x N`` block."""
    return bias + ((window % bias_windows) * heads + head).to(tl.int64) * N * N


@triton.jit
def _normalize(x, eps, ACC: tl.constexpr):
    """V2's cosine attention: rows over ``max(norm, eps)``, as ``F.normalize``, back in x's dtype."""
    wide = x.to(ACC)
    return (wide / tl.maximum(tl.sqrt(tl.sum(wide * wide, axis=1)), eps)[:, None]).to(x.dtype)


@triton.jit
def _normalize_backward(x, grad_hat, eps, ACC: tl.constexpr):
    """Gradient through ``x / max(|x|, eps)`` given the gradient ``grad_hat`` of the result."""
    wide = x.to(ACC)
    norm = tl.sqrt(tl.sum(wide * wide, axis=1))
    hat = wide / tl.maximum(norm, eps)[:, None]
    radial = tl.sum(hat * grad_hat, axis=1)
    through_norm = (grad_hat - hat * radial[:, None]) / tl.maximum(norm, eps)[:, None]
    return tl.where((norm > eps)[:, None], through_norm, grad_hat / eps)


@triton.jit
def _scores(q, k, bias_rows, row_ok, cols, col_ok, scale, ACC: tl.constexpr):
    """``scale * q k^T + bias`` of one tile (float32 or float64), and ``q k^T`` itself."""
    # "ieee": float32 inputs are multiplied in float32 (not TF32), like the reference.
    raw = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC)
    bias = tl.load(bias_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
    return raw * scale + bias, raw


@triton.jit
def _store_rows(values, target, pad_target, token, real, in_range, channels, channel_ok, C):
    """Rows of real tokens to ``target`` (map order), of padded tokens to ``pad_target`` (by slot)."""
    channel_mask = channel_ok[None, :]
    real_offsets = tl.where(real, token, 0).to(tl.int64)[:, None] * (3 * C) + channels[None, :]
    tl.store(target + real_offsets, values.to(target.dtype.element_ty), mask=real[:, None] & channel_mask)
    padded = in_range & (token < 0)
    pad_offsets = tl.where(padded, -1 - token, 0).to(tl.int64)[:, None] * (3 * C) + channels[None, :]
    tl.store(pad_target + pad_offsets, values.to(pad_target.dtype.element_ty), mask=padded[:, None] & channel_mask)


@triton.jit
def window_attention_forward(
    qkv,  # (B, L, 3C): q, k, v of every map token, in map order
    qkv_bias,  # (3C,): q, k, v of a padded token
    index,  # (nW * N,) int32: map token of every window token, -1 - slot for padding
    bias,  # (nWb, nH, N, N): position bias (+ shift mask); window w uses bias[w % nWb]
    scales,  # (nH,): d**-0.5 (V1) or 1 / tau (V2's cosine attention)
    out,  # (B, L, C): attention output of every map token, in map order
    lse,  # (B * nW * nH, N): log-sum-exp of each query's scores, kept for the backward pass
    L,
    N,
    windows,
    heads,
    bias_windows,
    d,
    C,
    eps,
    COSINE: tl.constexpr,
    SAVE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # float32, or float64 for float64 inputs
):
    # BLOCK_M queries against keys in BLOCK_N tiles with the running-max softmax, so any window
    # size fits; N = 49 or 64 is a single tile.
    program, head, window, image, scale, channels, channel_ok, source, pad_values = _program(
        qkv, qkv_bias, scales, L, C, windows, heads, d, BLOCK_D, ACC
    )
    rows, row_ok, row_token, row_real, q = _load_queries(
        source, pad_values, index, window, N, tl.program_id(1) * BLOCK_M, channels, channel_ok, C, BLOCK_M
    )
    if COSINE:
        q = _normalize(q, eps, ACC)
    bias_rows = _bias_block(bias, window, bias_windows, heads, head, N) + rows[:, None] * N
    row_max = tl.full([BLOCK_M], float("-inf"), ACC)
    row_sum = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(0, N, BLOCK_N):
        cols, col_ok, _, _, k, v = _load_keys(
            source, pad_values, index, window, N, start, channels, channel_ok, C, BLOCK_N
        )
        if COSINE:
            k = _normalize(k, eps, ACC)
        scores, _ = _scores(q, k, bias_rows, row_ok, cols, col_ok, scale, ACC)
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp(row_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee", out_dtype=ACC)
        row_max = new_max
    acc = acc / row_sum[:, None]
    if SAVE_LSE:
        tl.store(lse + program.to(tl.int64) * N + rows, row_max + tl.log(row_sum), mask=row_ok)
    # Padded tokens are dropped on the way back: every real map token is written exactly once.
    target = out + image * L * C + head * d + tl.where(row_real, row_token, 0).to(tl.int64)[:, None] * C
    tl.store(target + channels[None, :], acc.to(out.dtype.element_ty), mask=row_real[:, None] & channel_ok[None, :])


@triton.jit
def _row_gradients(out_grad, delta, lse, token, real, rows, in_range, channels, channel_ok, C, heads):
    """dO of the given query rows (zero for padded tokens: their outputs are dropped), rowsum(dO * O), lse.

    ``out_grad``, ``delta`` and ``lse`` point at this program's image and head (and window, for lse).
    """
    map_rows = tl.where(real, token, 0).to(tl.int64)
    grad = tl.load(
        out_grad + map_rows[:, None] * C + channels[None, :], mask=real[:, None] & channel_ok[None, :], other=0.0
    )
    row_delta = tl.load(delta + map_rows * heads, mask=real, other=0.0)
    row_lse = tl.load(lse + rows, mask=in_range, other=0.0)
    return grad, row_delta, row_lse


@triton.jit
def _score_gradient(q, k, v, grad, bias_rows, row_ok, cols, col_ok, scale, row_lse, row_delta, ACC: tl.constexpr):
    """The forward's softmax ``p`` recomputed from the log-sum-exp, dS, and ``q k^T`` of one tile."""
    scores, raw = _scores(q, k, bias_rows, row_ok, cols, col_ok, scale, ACC)
    p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(scores - row_lse[:, None]), 0.0)
    p_grad = tl.dot(grad, tl.trans(v), input_precision="ieee", out_dtype=ACC)
    return p, p * (p_grad - row_delta.to(ACC)[:, None]), raw


@triton.jit
def window_attention_backward_keys(
    qkv,
    qkv_bias,
    index,
    bias,
    scales,
    lse,
    delta,  # (B, L, nH): rowsum(dO * O) per map token and head
    out_grad,  # (B, L, C): dO
    qkv_grad,  # (B, L, 3C): its k and v parts are written here
    pad_grad,  # (B, P, 3C): gradient of each padded token's qkv (summed into the qkv bias)
    bias_grad,  # (B * nW * nH, N, N): dS of every window, summed over images outside
    scale_grad,  # (B * nW * nH, key tiles): partial sums of dS * q k^T
    L,
    N,
    windows,
    heads,
    bias_windows,
    d,
    C,
    padded_count,
    eps,
    COSINE: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    # One program: a tile of keys; dK and dV summed over every query tile of the window.
    program, head, window, image, scale, channels, channel_ok, source, pad_values = _program(
        qkv, qkv_bias, scales, L, C, windows, heads, d, BLOCK_D, ACC
    )
    cols, col_ok, col_token, col_real, k_raw, v = _load_keys(
        source, pad_values, index, window, N, tl.program_id(1) * BLOCK_N, channels, channel_ok, C, BLOCK_N
    )
    k = k_raw
    if COSINE:
        k = _normalize(k_raw, eps, ACC)
    bias_block = _bias_block(bias, window, bias_windows, heads, head, N)
    k_grad = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    v_grad = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    scale_sum = tl.zeros([BLOCK_N], ACC)
    for start in range(0, N, BLOCK_M):
        rows, row_ok, row_token, row_real, q = _load_queries(
            source, pad_values, index, window, N, start, channels, channel_ok, C, BLOCK_M
        )
        if COSINE:
            q = _normalize(q, eps, ACC)
        grad, row_delta, row_lse = _row_gradients(
            out_grad + image * L * C + head * d, delta + image * L * heads + head, lse + program.to(tl.int64) * N,
            row_token, row_real, rows, row_ok, channels, channel_ok, C, heads,
        )  # fmt: skip
        p, s_grad, raw = _score_gradient(
            q, k, v, grad, bias_block + rows[:, None] * N, row_ok, cols, col_ok, scale, row_lse, row_delta, ACC
        )
        v_grad += tl.dot(tl.trans(p.to(grad.dtype)), grad, input_precision="ieee", out_dtype=ACC)
        k_grad += tl.dot(tl.trans(s_grad.to(q.dtype)), q, input_precision="ieee", out_dtype=ACC)
        if SCALE_GRAD:
            scale_sum += tl.sum(s_grad * raw, axis=0)
        if BIAS_GRAD:
            pairs = program.to(tl.int64) * N * N + rows[:, None] * N + cols[None, :]
            tl.store(bias_grad + pairs, s_grad.to(bias_grad.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    k_grad = k_grad * scale
    if COSINE:
        k_grad = _normalize_backward(k_raw, k_grad, eps, ACC)
    if SCALE_GRAD:
        tl.store(scale_grad + program.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), tl.sum(scale_sum, axis=0))
    target = qkv_grad + image * L * 3 * C + head * d
    pad_target = pad_grad + image * padded_count * 3 * C + head * d
    _store_rows(k_grad, target + C, pad_target + C, col_token, col_real, col_ok, channels, channel_ok, C)
    _store_rows(v_grad, target + 2 * C, pad_target + 2 * C, col_token, col_real, col_ok, channels, channel_ok, C)


@triton.jit
def window_attention_backward_queries(
    qkv,
    qkv_bias,
    index,
    bias,
    scales,
    lse,
    delta,
    out_grad,
    qkv_grad,  # its q part is written here
    pad_grad,
    L,
    N,
    windows,
    heads,
    bias_windows,
    d,
    C,
    padded_count,
    eps,
    COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    # One program: a tile of queries; dQ summed over every key tile of the window.
    program, head, window, image, scale, channels, channel_ok, source, pad_values = _program(
        qkv, qkv_bias, scales, L, C, windows, heads, d, BLOCK_D, ACC
    )
    rows, row_ok, row_token, row_real, q_raw = _load_queries(
        source, pad_values, index, window, N, tl.program_id(1) * BLOCK_M, channels, channel_ok, C, BLOCK_M
    )
    q = q_raw
    if COSINE:
        q = _normalize(q_raw, eps, ACC)
    grad, row_delta, row_lse = _row_gradients(
        out_grad + image * L * C + head * d, delta + image * L * heads + head, lse + program.to(tl.int64) * N,
        row_token, row_real, rows, row_ok, channels, channel_ok, C, heads,
    )  # fmt: skip
    bias_rows = _bias_block(bias, window, bias_windows, heads, head, N) + rows[:, None] * N
    q_grad = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(0, N, BLOCK_N):
        cols, col_ok, _, _, k, v = _load_keys(
            source, pad_values, index, window, N, start, channels, channel_ok, C, BLOCK_N
        )
        if COSINE:
            k = _normalize(k, eps, ACC)
        _, s_grad, _ = _score_gradient(q, k, v, grad, bias_rows, row_ok, cols, col_ok, scale, row_lse, row_delta, ACC)
        q_grad += tl.dot(s_grad.to(k.dtype), k, input_precision="ieee", out_dtype=ACC)
    q_grad = q_grad * scale
    if COSINE:
        q_grad = _normalize_backward(q_raw, q_grad, eps, ACC)
    target = qkv_grad + image * L * 3 * C + head * d
    pad_target = pad_grad + image * padded_count * 3 * C + head * d
    _store_rows(q_grad, target, pad_target, row_token, row_real, row_ok, channels, channel_ok, C)


@triton.jit
def _row_tile(rows, C, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's ``BLOCK_ROWS`` rows of ``C`` channels: row numbers, element offsets, masks,
    channel numbers."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    channel = tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    ok = (row < rows)[:, None] & channel_ok[None, :]
    return row, row.to(tl.int64)[:, None] * C + channel[None, :], ok, channel, channel_ok


@triton.jit
def _layer_norm(values, ok, channel, channel_ok, weight, bias, C, eps):
    """LayerNorm of rows (masked lanes hold 0) in their own float dtype: mean, then the variance
    about it. Returns the normalised rows, their means and reciprocal standard deviations."""
    mean = tl.sum(values, axis=1) / C
    centred = tl.where(ok, values - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    scale = tl.load(weight + channel, mask=channel_ok, other=0.0).to(values.dtype)
    shift = tl.load(bias + channel, mask=channel_ok, other=0.0).to(values.dtype)
    return centred * rstd[:, None] * scale[None, :] + shift[None, :], mean, rstd


@triton.jit
def layer_norm_rows(
    x,
    branch,
    total,
    out,
    weight,
    bias,
    mean,
    rstd,
    rows,
    C,
    eps,
    HAS_BRANCH: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """V1 (pre-norm): LayerNorm over the ``C`` channels of ``BLOCK_ROWS`` rows, computed in ``ACC``
    (float32; float64 for float64 work), written in ``out``'s dtype (the next linear layer's input
    dtype: the cast autocast would make, in the same pass). With ``HAS_BRANCH`` the rows are the
    residual sum ``x + branch`` first, rounded to and written in ``total``'s dtype as the separate
    add would be, and normalised as rounded. ``SAVE_STATS``: each row's mean and reciprocal
    standard deviation too, for the backward kernel."""
    row, offsets, ok, channel, channel_ok = _row_tile(rows, C, BLOCK_ROWS, BLOCK_C)
    values = tl.load(x + offsets, mask=ok, other=0.0).to(ACC)
    if HAS_BRANCH:
        summed = (values + tl.load(branch + offsets, mask=ok, other=0.0).to(ACC)).to(total.dtype.element_ty)
        tl.store(total + offsets, summed, mask=ok)
        values = summed.to(ACC)
    normed, row_mean, row_rstd = _layer_norm(values, ok, channel, channel_ok, weight, bias, C, eps)
    tl.store(out + offsets, normed.to(out.dtype.element_ty), mask=ok)
    if SAVE_STATS:
        tl.store(mean + row, row_mean, mask=row < rows)
        tl.store(rstd + row, row_rstd, mask=row < rows)


@triton.jit
def layer_norm_rows_backward(
    total,
    mean,
    rstd,
    out_grad,
    total_grad,
    weight,
    x_grad,
    weight_grad,
    bias_grad,
    rows,
    C,
    HAS_TOTAL_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """The gradients of :func:`layer_norm_rows` from its saved rows (``total``: ``x + branch``, or
    ``x``), means and reciprocal standard deviations, given the gradient of its output and (with
    ``HAS_TOTAL_GRAD``) of ``total``: ``x_grad`` (the rows' gradient, which is also the branch's),
    and this program's sums over its rows of the weight's and bias's gradients, one row of
    ``weight_grad`` / ``bias_grad`` per program (summed afterwards: the same order every run)."""
    row, offsets, ok, channel, channel_ok = _row_tile(rows, C, BLOCK_ROWS, BLOCK_C)
    row_ok = row < rows
    values = tl.load(total + offsets, mask=ok, other=0.0).to(ACC)
    row_mean = tl.load(mean + row, mask=row_ok, other=0.0)
    row_rstd = tl.load(rstd + row, mask=row_ok, other=0.0)
    unit = tl.where(ok, (values - row_mean[:, None]) * row_rstd[:, None], 0.0)
    grad = tl.load(out_grad + offsets, mask=ok, other=0.0).to(ACC)
    scaled = grad * tl.load(weight + channel, mask=channel_ok, other=0.0).to(ACC)[None, :]
    # d(unit): the scaled gradient less its mean and its projection on the normalised row.
    along_unit = tl.sum(scaled * unit, axis=1) / C
    average = tl.sum(scaled, axis=1) / C
    rows_grad = (scaled - unit * along_unit[:, None] - average[:, None]) * row_rstd[:, None]
    if HAS_TOTAL_GRAD:
        rows_grad += tl.load(total_grad + offsets, mask=ok, other=0.0).to(ACC)
    tl.store(x_grad + offsets, rows_grad.to(x_grad.dtype.element_ty), mask=ok)
    partial = tl.program_id(0).to(tl.int64) * C + channel
    tl.store(weight_grad + partial, tl.sum(grad * unit, axis=0), mask=channel_ok)
    tl.store(bias_grad + partial, tl.sum(grad, axis=0), mask=channel_ok)


@triton.jit
def residual_plus_layer_norm_rows(
    x,
    branch,
    total,
    out,
    weight,
    bias,
    rows,
    C,
    eps,
    WRITE_OUT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """V2 (res-post-norm): ``total = x + LayerNorm(branch)`` in ``ACC`` (``x`` and ``total`` float32,
    the residual stream autocast keeps, or float64), the norm computed as autocast's is; with
    ``WRITE_OUT`` also ``total`` in ``out``'s dtype, the next linear layer's cast of it."""
    _, offsets, ok, channel, channel_ok = _row_tile(rows, C, BLOCK_ROWS, BLOCK_C)
    values = tl.load(branch + offsets, mask=ok, other=0.0).to(ACC)
    normed, _, _ = _layer_norm(values, ok, channel, channel_ok, weight, bias, C, eps)
    summed = tl.load(x + offsets, mask=ok, other=0.0) + normed
    tl.store(total + offsets, summed, mask=ok)
    if WRITE_OUT:
        tl.store(out + offsets, summed.to(out.dtype.element_ty), mask=ok)
