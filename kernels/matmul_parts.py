"""The pieces every matmul kernel is made of, shared by the tiled and the split-K linear kernels (only
@triton.jit helpers live here):

    accumulate        the K loop over a range of K: the LayerNorm prologue (from the row's mean and
                      1/std), rounded to W's dtype, then tl.dot into a float32 accumulator
    linear_epilogue   bias, activation, residual (with the output's row moments for the next
                      LayerNorm), then a row-major store or, for c_attn, q to its buffer and k, v into
                      the KV cache
    split_tile        one program of a split-K product of a few rows, with its deterministic reduction
"""

import triton
import triton.language as tl

from .moments import merged_row_statistics, store_block_moments


@triton.jit
def _tanh(x):
    # The interpreter has no libdevice tanh.
    # 2*sigmoid(2x) - 1: exp overflows to inf for large -x, which gives -1 exactly, never NaN.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _softplus(x):
    # torch's softplus returns x itself above 20.
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def apply_activation(x, FORMULA: tl.constexpr):
    """x is float32; FORMULA is a value of ACTIVATIONS."""
    if FORMULA == "gelu_tanh":
        x = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif FORMULA == "gelu_erf":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif FORMULA == "gelu_erf_clip10":
        x = tl.minimum(tl.maximum(0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476)), -10.0), 10.0)
    elif FORMULA == "quick_gelu":
        x = x / (1.0 + tl.exp(-1.702 * x))
    elif FORMULA == "relu":
        x = tl.maximum(x, 0.0)
    elif FORMULA == "relu2":
        x = tl.maximum(x, 0.0)
        x = x * x
    elif FORMULA == "relu6":
        x = tl.minimum(tl.maximum(x, 0.0), 6.0)
    elif FORMULA == "leaky_relu":
        x = tl.where(x >= 0.0, x, 0.01 * x)
    elif FORMULA == "silu":
        x = x / (1.0 + tl.exp(-x))
    elif FORMULA == "sigmoid":
        x = 1.0 / (1.0 + tl.exp(-x))
    elif FORMULA == "tanh":
        x = _tanh(x)
    elif FORMULA == "mish":
        x = x * _tanh(_softplus(x))
    elif FORMULA == "hardswish":
        x = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    elif FORMULA == "laplace":
        x = 0.5 * (1.0 + tl.math.erf((x - 0.707107) / (0.282095 * 1.4142135623730951)))
    elif FORMULA == "sqrtsoftplus":
        x = tl.sqrt(_softplus(x))
    return x


@triton.jit
def store_qkv(
    y, rows, cols, row_in, inside, q_ptr, stride_qm, k_cache_ptr, v_cache_ptr, slots_ptr,
    stride_cb, stride_ch, stride_cs, n_slots, seq_len, width, head_dim,
):
    """c_attn's output columns are q | k | v, each `width` wide: q goes row-major to q_ptr, k and v
    into the caches [B_cache, H, S, D] at row (m // seq_len), slot slots[m], head and dim from the
    channel. A slot outside the cache is dropped rather than written out of bounds."""
    part = cols // width
    channel = cols % width
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + channel[None, :], y, mask=inside & (part == 0)[None, :])
    slot = tl.load(slots_ptr + rows, mask=row_in, other=-1).to(tl.int64)
    slot_in = (slot >= 0) & (slot < n_slots)
    batch = (rows // seq_len).to(tl.int64)
    cache_at = (
        batch[:, None] * stride_cb
        + (channel // head_dim).to(tl.int64)[None, :] * stride_ch
        + slot[:, None] * stride_cs
        + (channel % head_dim)[None, :]
    )
    kv_inside = inside & slot_in[:, None]
    tl.store(k_cache_ptr + cache_at, y, mask=kv_inside & (part == 1)[None, :])
    tl.store(v_cache_ptr + cache_at, y, mask=kv_inside & (part == 2)[None, :])


@triton.jit
def accumulate(
    acc, x_rows, row_in, k_first, k_end, w_ptr, stride_wk, stride_wn, cols, col_in, ln_weight_ptr, ln_bias_ptr,
    mean, rstd, NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, X_CACHE: tl.constexpr,
):
    """acc + prologue(x[:, k_first:k_end]) @ W[k_first:k_end, cols]; x_rows points at each row's start.
    X_CACHE is x's load cache modifier: ".cg" (from L2) where other programs of the launch wrote x."""
    for k0 in range(k_first, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < k_end
        a = tl.load(x_rows + ks[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0, cache_modifier=X_CACHE)
        if NORMALIZE:
            gamma = tl.load(ln_weight_ptr + ks, mask=k_in, other=0.0).to(tl.float32)
            beta = tl.load(ln_bias_ptr + ks, mask=k_in, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        w = tl.load(
            w_ptr + ks.to(tl.int64)[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn,
            mask=k_in[:, None] & col_in[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def linear_epilogue(
    acc, rows, cols, row_in, col_in, out_ptr, stride_om, bias_ptr, residual_ptr, stride_rm, out_moments_ptr,
    moment_block, moment_blocks, k_cache_ptr, v_cache_ptr, slots_ptr, stride_cb, stride_ch, stride_cs, n_slots,
    seq_len, head_dim, N,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QKV: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_N] float32 is the finished product for rows x cols. With HAS_RESIDUAL the
    output's moments go to block `moment_block` of `moment_blocks` (one per column tile)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION)
    inside = row_in[:, None] & col_in[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + rows.to(tl.int64)[:, None] * stride_rm + cols[None, :], mask=inside, other=0.0).to(
            tl.float32
        )
    y = acc.to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        store_block_moments(out_moments_ptr, moment_block, moment_blocks, rows, row_in, y.to(tl.float32), inside)
    if QKV:
        store_qkv(
            y, rows, cols, row_in, inside, out_ptr, stride_om, k_cache_ptr, v_cache_ptr, slots_ptr,
            stride_cb, stride_ch, stride_cs, n_slots, seq_len, N // 3, head_dim,
        )
    else:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], y, mask=inside)


@triton.jit
def split_tile(
    tile, x_ptr, stride_xm, w_ptr, stride_wk, stride_wn, out_ptr, stride_om, M, N, K, k_per_split, n_splits,
    partial_ptr, counters_ptr, bias_ptr, ln_weight_ptr, ln_bias_ptr, eps, moments_ptr, moment_blocks,
    residual_ptr, stride_rm, out_moments_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_cb, stride_ch, stride_cs,
    n_slots, seq_len, head_dim,
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    QKV: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_MOMENTS: tl.constexpr, X_CACHE: tl.constexpr,
):
    """Program `tile` of a split-K product of M <= BLOCK_M rows: column tile tile // n_splits, K range
    tile % n_splits. Each program stores its float32 partial [n_splits, M, N]; the last of a column
    tile's programs to arrive (an int32 counter per column tile, reset by that program) adds the
    partials in split order and runs the epilogue. The order is fixed, so a row's bits depend neither
    on arrival order nor on the other rows. Returns 1 from the program that finished its tile, else 0."""
    col_tile = tile // n_splits
    split = tile % n_splits
    rows = tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    if NORMALIZE:
        mean, rstd = merged_row_statistics(moments_ptr, moment_blocks, rows, row_in, K, eps, BLOCK_MOMENTS)
    else:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = mean
    k_first = split * k_per_split
    acc = accumulate(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr + rows.to(tl.int64)[:, None] * stride_xm, row_in,
        k_first, tl.minimum(k_first + k_per_split, K), w_ptr, stride_wk, stride_wn, cols, col_in, ln_weight_ptr,
        ln_bias_ptr, mean, rstd, NORMALIZE, DOT_PRECISION, BLOCK_K, X_CACHE,
    )
    finished = 1
    if n_splits > 1:
        inside = row_in[:, None] & col_in[None, :]
        partial_at = partial_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(partial_at + split.to(tl.int64) * M * N, acc, mask=inside)
        # Every thread's partial is stored before the counter says so (the atomic releases them).
        tl.debug_barrier()
        finished = (tl.atomic_add(counters_ptr + col_tile, 1, sem="acq_rel") == n_splits - 1).to(tl.int32)
        if finished != 0:
            tl.atomic_xchg(counters_ptr + col_tile, 0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for part in range(0, n_splits):
                # .cg reads L2, where the other programs' partials are, not a stale L1 line.
                acc += tl.load(partial_at + part * M * N, mask=inside, other=0.0, cache_modifier=".cg")
    if finished != 0:
        linear_epilogue(
            acc, rows, cols, row_in, col_in, out_ptr, stride_om, bias_ptr, residual_ptr, stride_rm, out_moments_ptr,
            col_tile, tl.cdiv(N, BLOCK_N), k_cache_ptr, v_cache_ptr, slots_ptr, stride_cb, stride_ch, stride_cs,
            n_slots, seq_len, head_dim, N, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, QKV,
        )
    return finished
