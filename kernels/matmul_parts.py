"""The pieces every matmul kernel is made of, shared by the tiled and the split-K linear kernels (only
@triton.jit helpers live here):

    accumulate        the K loop over a range of K: the LayerNorm prologue (from the row's mean and
                      1/std), rounded to x's dtype, then tl.dot into a float32 accumulator with W's
                      tile, a quantized one dequantized in registers (channel_scaled: int8's scale)
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
def nf4_value(q):
    """NF4_CODE[q] (quantized_weight.py) for 4-bit indices q, by a tree of selects over q's bits: the
    code is decoded in registers, never gathered from a table in memory."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    v0 = tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367), tl.where(b0, -0.6961928009986877, -1.0))
    v1 = tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495), tl.where(b0, -0.18477343022823334, -0.28444138169288635))
    v2 = tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634), tl.where(b0, 0.16093020141124725, 0.07958029955625534))
    v3 = tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023), tl.where(b0, 0.5626170039176941, 0.44070982933044434))
    return tl.where((q & 8) != 0, tl.where(b2, v3, v2), tl.where(b2, v1, v0))


@triton.jit
def _prologue(x_rows, row_in, ks, k_in, ln_weight_ptr, ln_bias_ptr, mean, rstd, NORMALIZE: tl.constexpr, X_CACHE: tl.constexpr):
    """x[:, ks], LayerNorm-ed when NORMALIZE, rounded to x's dtype (what the weight meets in tl.dot)."""
    a = tl.load(x_rows + ks[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0, cache_modifier=X_CACHE)
    if NORMALIZE:
        gamma = tl.load(ln_weight_ptr + ks, mask=k_in, other=0.0).to(tl.float32)
        beta = tl.load(ln_bias_ptr + ks, mask=k_in, other=0.0).to(tl.float32)
        a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
    return a.to(x_rows.dtype.element_ty)


@triton.jit
def group_scale(group, cols, col_in, scale_ptr, stride_sk, stride_sn, nested_ptr, offset_ptr, code_ptr, groups,
                WEIGHT_FORMAT: tl.constexpr):
    """The float32 scale (int4) or absmax (nf4) of K group(s) `group` for column(s) `cols`; under double
    quantization decoded from its 8-bit code: code[q] * nested_absmax[(n * G + g) // 256] + offset.
    A tile reads one per column; the embedding, one column (a token's row) per group."""
    scale = tl.load(scale_ptr + group * stride_sk + cols.to(tl.int64) * stride_sn, mask=col_in, other=0)
    if WEIGHT_FORMAT == "nf4dq":
        block = (cols.to(tl.int64) * groups + group) // 256
        nested = tl.load(nested_ptr + block, mask=col_in, other=0.0)
        scale = tl.load(code_ptr + scale.to(tl.int32), mask=col_in, other=0.0) * nested + tl.load(offset_ptr)
    return scale.to(tl.float32)


@triton.jit
def dequantized(q, scale, zero, WEIGHT_FORMAT: tl.constexpr):
    """4-bit values q (int32) as float32 weights, reference.dequantize's arithmetic; scale and zero
    (float32, int4's zero point) broadcast against q."""
    if WEIGHT_FORMAT == "int4":
        w = (q.to(tl.float32) - zero) * scale
    else:
        w = nf4_value(q) * scale
    return w


@triton.jit
def _packed_rows(w_ptr, stride_wk, stride_wn, k_start, k_end, cols, col_in, DEPTH: tl.constexpr):
    """The packed bytes [DEPTH // 2, BLOCK_N] of a 4-bit weight's rows k_start .. k_start + DEPTH (two
    a byte), with the even rows they hold and which of those lie before k_end."""
    pairs = k_start // 2 + tl.arange(0, DEPTH // 2)
    even = 2 * pairs
    pair_in = even < k_end
    packed = tl.load(
        w_ptr + pairs.to(tl.int64)[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn,
        mask=pair_in[:, None] & col_in[None, :],
        other=0,
    ).to(tl.int32)
    return packed, even, pair_in


@triton.jit
def accumulate(
    acc, x_rows, row_in, k_first, k_end, w_ptr, stride_wk, stride_wn, cols, col_in, ln_weight_ptr, ln_bias_ptr,
    mean, rstd, scale_ptr, stride_sk, stride_sn, zero_ptr, nested_ptr, offset_ptr, code_ptr, groups,
    NORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, X_CACHE: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr, DEQUANT_K: tl.constexpr = None,
):
    """acc + prologue(x[:, k_first:k_end]) @ W[k_first:k_end, cols]; x_rows points at each row's start.
    X_CACHE is x's load cache modifier: ".cg" (from L2) where other programs of the launch wrote x.

    WEIGHT_FORMAT: "float" (W in x's dtype), "int8" (q converted to x's dtype, exact: |q| <= 127; the
    per-channel scale is applied later, by channel_scaled), or a 4-bit format ("int4", "nf4", "nf4dq":
    nf4 with double quantization), dequantized in registers. A 4-bit tile is one K group (BLOCK_K ==
    group size, k_first a multiple of it), its scales loaded once and its weights DEQUANT_K rows at a
    time (None: the whole group), so that a wide tile's dequantized weights fit in registers: packed
    bytes [DEQUANT_K // 2, BLOCK_N], the high nibbles (even k) and low nibbles (odd k) each
    dequantized, rounded to x's dtype and multiplied with x's even and odd columns."""
    DEPTH: tl.constexpr = BLOCK_K if DEQUANT_K is None else DEQUANT_K
    for k0 in range(k_first, k_end, BLOCK_K):
        if WEIGHT_FORMAT == "float":
            # Written out as before quantization came: through _prologue, ptxas 12.9 spilled 8 bytes
            # in gpt2-xl's bfloat16 decode MLP on sm_90 (the compile audit).
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
        elif WEIGHT_FORMAT == "int8":
            ks = k0 + tl.arange(0, BLOCK_K)
            k_in = ks < k_end
            a = _prologue(x_rows, row_in, ks, k_in, ln_weight_ptr, ln_bias_ptr, mean, rstd, NORMALIZE, X_CACHE)
            w = tl.load(
                w_ptr + ks.to(tl.int64)[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn,
                mask=k_in[:, None] & col_in[None, :],
                other=0,
            )
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
        else:
            # Part 0's bytes are loaded before the scales, as when a tile was always one part: that
            # order kept ptxas from spilling in float32 prefill tiles on sm_80.
            packed, even, pair_in = _packed_rows(w_ptr, stride_wk, stride_wn, k0, k_end, cols, col_in, DEPTH)
            group = k0 // BLOCK_K
            scale = group_scale(group, cols, col_in, scale_ptr, stride_sk, stride_sn, nested_ptr, offset_ptr, code_ptr,
                                groups, WEIGHT_FORMAT)
            zero = scale  # unused but for int4 (a name both branches of the format define)
            if WEIGHT_FORMAT == "int4":
                zero = tl.load(zero_ptr + group * stride_sk + cols.to(tl.int64) * stride_sn, mask=col_in, other=0).to(tl.float32)
            for part in tl.static_range(BLOCK_K // DEPTH):
                if part > 0:
                    packed, even, pair_in = _packed_rows(
                        w_ptr, stride_wk, stride_wn, k0 + part * DEPTH, k_end, cols, col_in, DEPTH,
                    )
                a = _prologue(x_rows, row_in, even, pair_in, ln_weight_ptr, ln_bias_ptr, mean, rstd, NORMALIZE, X_CACHE)
                w = dequantized(packed >> 4, scale[None, :], zero[None, :], WEIGHT_FORMAT)
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
                a = _prologue(x_rows, row_in, even + 1, pair_in, ln_weight_ptr, ln_bias_ptr, mean, rstd, NORMALIZE, X_CACHE)
                w = dequantized(packed & 15, scale[None, :], zero[None, :], WEIGHT_FORMAT)
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def channel_scaled(acc, cols, col_in, scale_ptr, stride_sn, WEIGHT_FORMAT: tl.constexpr):
    """The finished float32 product times int8's per-channel scale [1, N]; other formats as they are."""
    if WEIGHT_FORMAT == "int8":
        acc = acc * tl.load(scale_ptr + cols.to(tl.int64) * stride_sn, mask=col_in, other=0.0)[None, :]
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
    n_slots, seq_len, head_dim, scale_ptr, stride_sk, stride_sn, zero_ptr, nested_ptr, offset_ptr, code_ptr, groups,
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    QKV: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_MOMENTS: tl.constexpr, X_CACHE: tl.constexpr, WEIGHT_FORMAT: tl.constexpr,
    DEQUANT_K: tl.constexpr = None,
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
        ln_bias_ptr, mean, rstd, scale_ptr, stride_sk, stride_sn, zero_ptr, nested_ptr, offset_ptr, code_ptr, groups,
        NORMALIZE, DOT_PRECISION, BLOCK_K, X_CACHE, WEIGHT_FORMAT, DEQUANT_K,
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
        acc = channel_scaled(acc, cols, col_in, scale_ptr, stride_sn, WEIGHT_FORMAT)
        linear_epilogue(
            acc, rows, cols, row_in, col_in, out_ptr, stride_om, bias_ptr, residual_ptr, stride_rm, out_moments_ptr,
            col_tile, tl.cdiv(N, BLOCK_N), k_cache_ptr, v_cache_ptr, slots_ptr, stride_cb, stride_ch, stride_cs,
            n_slots, seq_len, head_dim, N, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, QKV,
        )
    return finished
