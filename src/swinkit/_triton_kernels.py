"""Triton source of the window-attention kernel (imported only when ``attn_impl="triton"`` runs).

The functions here are plain Python until :mod:`swinkit.triton_attention` wraps them: compiled
with ``triton.jit`` for GPU tensors, or run by Triton's interpreter for CPU tensors (slow, exact:
how the kernel is tested on machines without a GPU).
"""

from __future__ import annotations

import triton.language as tl


def window_attention_forward(
    qkv,  # (B, L, 3C): q, k, v of every map token, in map order
    qkv_bias,  # (3C,): q, k, v of a padded token (its input is zero, so only the bias is left)
    index,  # (nW * N,) int32: the map token each window token reads, -1 for padding
    bias,  # (nWb, nH, N, N): position bias (+ shift mask); window w uses bias[w % nWb]
    scales,  # (nH,) float32: d**-0.5 (V1) or 1 / tau (V2's cosine attention)
    out,  # (B, L, C): attention output of every map token, in map order
    L,
    N,
    windows,
    heads,
    bias_windows,
    d,
    C,
    eps,
    COSINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,  # float32, or float64 for float64 inputs
):
    # One program: BLOCK_M query tokens of one (image, window, head), keys in BLOCK_N tiles with
    # the running-max softmax, so any window size fits; N = 49 or 64 is a single tile.
    program = tl.program_id(0)
    head = program % heads
    window = (program // heads) % windows
    image = (program // (heads * windows)).to(tl.int64)
    scale = tl.load(scales + head).to(ACC)
    channels = tl.arange(0, BLOCK_D)
    channel_ok = channels < d
    source = qkv + image * L * 3 * C + head * d
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    # Shift, padding and partition are all in this one read: the index table.
    row_token = tl.load(index + window * N + rows, mask=row_ok, other=-1)
    row_real = row_token >= 0
    row_offsets = tl.where(row_real, row_token, 0).to(tl.int64)[:, None] * (3 * C) + channels[None, :]
    row_mask = row_real[:, None] & channel_ok[None, :]
    q = tl.load(source + row_offsets, mask=row_mask, other=0.0)
    q_pad = tl.load(qkv_bias + head * d + channels, mask=channel_ok, other=0.0)
    q = tl.where(row_real[:, None], q, q_pad[None, :])
    if COSINE:
        q_wide = q.to(ACC)
        q = (q_wide / tl.maximum(tl.sqrt(tl.sum(q_wide * q_wide, axis=1)), eps)[:, None]).to(q.dtype)
    bias_rows = bias + ((window % bias_windows) * heads + head).to(tl.int64) * N * N + rows[:, None] * N

    row_max = tl.full([BLOCK_M], float("-inf"), ACC)
    row_sum = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        col_token = tl.load(index + window * N + cols, mask=col_ok, other=-1)
        col_real = col_token >= 0
        col_offsets = tl.where(col_real, col_token, 0).to(tl.int64)[:, None] * (3 * C) + channels[None, :]
        col_mask = col_real[:, None] & channel_ok[None, :]
        k = tl.load(source + C + col_offsets, mask=col_mask, other=0.0)
        k_pad = tl.load(qkv_bias + C + head * d + channels, mask=channel_ok, other=0.0)
        k = tl.where(col_real[:, None], k, k_pad[None, :])
        v = tl.load(source + 2 * C + col_offsets, mask=col_mask, other=0.0)
        v_pad = tl.load(qkv_bias + 2 * C + head * d + channels, mask=channel_ok, other=0.0)
        v = tl.where(col_real[:, None], v, v_pad[None, :])
        if COSINE:
            k_wide = k.to(ACC)
            k = (k_wide / tl.maximum(tl.sqrt(tl.sum(k_wide * k_wide, axis=1)), eps)[:, None]).to(k.dtype)
        # "ieee": float32 inputs are multiplied in float32 (not TF32), like the reference.
        scores = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=ACC) * scale
        pair_ok = row_ok[:, None] & col_ok[None, :]
        scores += tl.load(bias_rows + cols[None, :], mask=pair_ok, other=0.0).to(ACC)
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp(row_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee", out_dtype=ACC)
        row_max = new_max
    acc = acc / row_sum[:, None]
    # Padded tokens are dropped on the way back: every real map token is written exactly once.
    target = out + image * L * C + head * d + tl.where(row_real, row_token, 0).to(tl.int64)[:, None] * C
    tl.store(target + channels[None, :], acc.to(out.dtype.element_ty), mask=row_ok[:, None] & row_mask)
