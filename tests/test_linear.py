"""The fused linear layer of every backend (LN + c_attn with the cache store, LN + c_fc + activation,
c_proj + residual, the LM head) against the reference, and the row moments the kernels pass along."""

import pytest
import torch

from numerics import DEVICE, DTYPES, OPS, as_float64, assert_close, poisoned, poisoned_allocations, randn
from tritongpt2.kernels import reference
from tritongpt2.kernels.activations import ACTIVATIONS
from tritongpt2.kernels.operands import CacheAccess, Residual
from tritongpt2.kernels.torch_ops import activation_function

# Blocks of moments for the inputs the tests build: 32 columns, so rows of 48, 80 or 1600 are
# merged from several blocks, the last one partial.
MOMENT_BLOCK = 32


def stream(x: torch.Tensor) -> Residual:
    """x as the residual stream the kernels pass along: with its row moments."""
    return Residual(x, reference.row_moments(x, MOMENT_BLOCK).to(x.device))


def assert_moments_describe(moments: torch.Tensor, values: torch.Tensor) -> None:
    """The row moments a kernel stored merge to its output rows' count, mean and variance."""
    count, mean, m2 = moments.double().unbind(-1)
    width = values.shape[-1]
    assert torch.equal(count.sum(-1), torch.full_like(count[..., 0], width))
    merged_mean = (count * mean).sum(-1) / width
    merged_var = (m2.sum(-1) + (count * (mean - merged_mean[..., None]) ** 2).sum(-1)) / width
    exact = values.double()
    torch.testing.assert_close(merged_mean, exact.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged_var, exact.var(-1, unbiased=False), rtol=1e-5, atol=1e-6)

# (rows, K, N): T=1, odd sizes, K and N not multiples of any block, gpt2-xl width.
SHAPES = [(1, 64, 48), (7, 80, 200), (33, 96, 130), (70, 48, 40), (2, 1600, 100)]


def layer_norm_params(width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return randn(width, dtype=dtype, scale=0.5) + 1.0, randn(width, dtype=dtype, scale=0.5)


def residual_stream(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    # A large shared offset plus outlier channels, as in GPT-2's residual stream: the LayerNorm
    # statistics must not lose the spread to the mean.
    x = randn(rows, width, dtype=torch.float32) * 2.0 + 30.0
    x[:, ::17] *= 8.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_ln_linear_matches_reference(ops, rows, k, n, dtype):
    x = residual_stream(rows, k, dtype)
    ln_w, ln_b = layer_norm_params(k, dtype)
    w, b = randn(k, n, dtype=dtype, scale=k**-0.5), randn(n, dtype=dtype)
    with poisoned_allocations():
        out = ops.ln_linear(stream(x), ln_w, ln_b, 1e-5, w, b, "gelu_new")
    oracle = reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, *as_float64(w, b), "gelu_new")
    assert_close(out, oracle, reference.ln_linear(x, ln_w, ln_b, 1e-5, w, b, "gelu_new"))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_in_the_epilogue(ops, name):
    x = randn(9, 48, dtype=torch.float32, scale=3.0)
    ln_w, ln_b = layer_norm_params(48, torch.float32)
    w, b = randn(48, 40, dtype=torch.float32, scale=0.5), randn(40, dtype=torch.float32)
    out = ops.ln_linear(stream(x), ln_w, ln_b, 1e-5, w, b, name)
    assert_close(out, reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, *as_float64(w, b), name))


@pytest.mark.parametrize("implementation", [reference.apply_activation, lambda x, name: activation_function(name)(x)],
                         ids=["reference", "torch-backend"])
def test_activations_are_transformers_act2fn(implementation):
    act2fn = pytest.importorskip("transformers.activations").ACT2FN
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    for name in ACTIVATIONS:
        expected = act2fn[name](x)
        torch.testing.assert_close(implementation(x, name), expected, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_head_reads_the_transposed_embedding(ops, dtype):
    vocab, width = 301, 80
    wte = randn(vocab, width, dtype=dtype, scale=0.2)
    x = residual_stream(5, width, dtype)
    ln_w, ln_b = layer_norm_params(width, dtype)
    with poisoned_allocations():
        logits = ops.ln_linear(stream(x), ln_w, ln_b, 1e-5, wte.T, None)
    oracle = reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, wte.double().T, None)
    assert_close(logits, oracle, reference.ln_linear(x, ln_w, ln_b, 1e-5, wte.T, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_linear_residual_matches_reference(ops, rows, k, n, dtype):
    x, residual = randn(rows, k, dtype=dtype), randn(rows, n, dtype=dtype) + 20.0
    w, b = randn(k, n, dtype=dtype, scale=k**-0.5), randn(n, dtype=dtype)
    with poisoned_allocations():
        out = ops.linear_residual(x, w, b, stream(residual))
    oracle = reference.linear_residual(*as_float64(x, w, b, residual))
    assert_close(out.values, oracle, reference.linear_residual(x, w, b, residual))
    if out.moments is not None:
        assert_moments_describe(out.moments, out.values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_layer_norm_consumer_takes_the_moments_its_producer_stored(dtype):
    # c_proj writes the stream and its moments; LN + c_fc normalizes from them. Rows of 3 x 16 and
    # of 130 tokens, so the producer's moments come from tiles of both sizes.
    for rows in (3, 130):
        x, residual = randn(rows, 64, dtype=dtype), residual_stream(rows, 200, dtype)
        w, b = randn(64, 200, dtype=dtype, scale=0.125), randn(200, dtype=dtype)
        ln_w, ln_b = layer_norm_params(200, dtype)
        fc_w, fc_b = randn(200, 72, dtype=dtype, scale=200**-0.5), randn(72, dtype=dtype)
        produced = OPS.linear_residual(x, w, b, stream(residual))
        assert_moments_describe(produced.moments, produced.values)
        out = OPS.ln_linear(produced, ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new")
        args = (produced.values, ln_w, ln_b, 1e-5, fc_w, fc_b, "gelu_new")
        assert_close(out, reference.ln_linear(*as_float64(*args[:3]), 1e-5, *as_float64(fc_w, fc_b), "gelu_new"),
                     reference.ln_linear(*args))


# (batch, seq, heads, head_dim, cache rows, cache slots)
QKV_SHAPES = [(1, 1, 2, 64, 1, 8), (3, 5, 5, 16, 4, 12), (2, 7, 1, 80, 2, 9), (1, 3, 25, 64, 2, 4)]


def qkv_case(batch, seq, heads, head_dim, cache_rows, slots, dtype):
    width = heads * head_dim
    x = residual_stream(batch * seq, width, dtype).view(batch, seq, width)
    ln_w, ln_b = layer_norm_params(width, dtype)
    w, b = randn(width, 3 * width, dtype=dtype, scale=width**-0.5), randn(3 * width, dtype=dtype)
    # Each row writes a run of slots from its own start; the last row runs past the cache's end,
    # and those slots must be dropped, not written out of bounds.
    starts = torch.arange(batch) * 2
    cache_slots = (starts[:, None] + torch.arange(seq)).to(DEVICE)
    cache_slots[-1] += slots - seq + 1
    return x, ln_w, ln_b, w, b, cache_slots, (cache_rows, heads, slots, head_dim)


def access(ops, cache_slots, cache_shape):
    key_mask = torch.ones(cache_shape[0], cache_shape[2], dtype=torch.int32, device=DEVICE)
    return ops.cache_access(cache_slots, cache_slots[:, 0].contiguous(), key_mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES)
def test_ln_qkv_projection_writes_q_and_the_cache(ops, shape, dtype):
    x, ln_w, ln_b, w, b, cache_slots, cache_shape = qkv_case(*shape, dtype)
    k_cache, v_cache = poisoned(*cache_shape, dtype=dtype), poisoned(*cache_shape, dtype=dtype)
    with poisoned_allocations():
        q = ops.ln_qkv_projection(stream(x), ln_w, ln_b, 1e-5, w, b, k_cache, v_cache, access(ops, cache_slots, cache_shape))

    k_oracle, v_oracle = (torch.full(cache_shape, float("nan"), dtype=torch.float64, device=DEVICE) for _ in "kv")
    q_oracle = reference.ln_qkv_projection(
        *as_float64(x, ln_w, ln_b), 1e-5, *as_float64(w, b), k_oracle, v_oracle, cache_slots
    )
    k_same, v_same = poisoned(*cache_shape, dtype=dtype), poisoned(*cache_shape, dtype=dtype)
    q_same = reference.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, k_same, v_same, cache_slots)
    assert_close(q, q_oracle, q_same)
    written = ~torch.isnan(k_oracle)
    assert torch.equal(~torch.isnan(k_cache), written), "K written at other slots than the reference's"
    assert torch.equal(~torch.isnan(v_cache), written), "V written at other slots than the reference's"
    assert_close(k_cache[written], k_oracle[written], k_same[written])
    assert_close(v_cache[written], v_oracle[written], v_same[written])


def test_validation_names_the_offending_value():
    x, ln_w, ln_b = randn(4, 32, dtype=torch.float32), *layer_norm_params(32, torch.float32)
    w, b = randn(32, 16, dtype=torch.float32), randn(16, dtype=torch.float32)
    with pytest.raises(ValueError, match="torch.float64"):
        OPS.ln_linear(stream(x.double()), ln_w, ln_b, 1e-5, w, b)
    with pytest.raises(ValueError, match=r"weight has shape \(16, 32\)"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, w.T.contiguous(), b)
    with pytest.raises(ValueError, match="bias has shape"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, w, b[:8])
    with pytest.raises(ValueError, match="weight has dtype torch.float16"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, w.half(), b)
    with pytest.raises(ValueError, match="'gelu_magic'"):
        OPS.ln_linear(stream(x), ln_w, ln_b, 1e-5, w, b, "gelu_magic")
    with pytest.raises(ValueError, match="eps"):
        OPS.ln_linear(stream(x), ln_w, ln_b, float("nan"), w, b)
    with pytest.raises(ValueError, match="contiguous"):
        OPS.ln_linear(stream(randn(32, 4, dtype=torch.float32).T), ln_w, ln_b, 1e-5, w, b)
    with pytest.raises(ValueError, match="x has no row moments"):
        OPS.ln_linear(Residual(x), ln_w, ln_b, 1e-5, w, b)
    with pytest.raises(ValueError, match="x must be a Residual"):
        OPS.ln_linear(x, ln_w, ln_b, 1e-5, w, b)
    with pytest.raises(ValueError, match=r"x.moments has shape \(3, 1, 3\)"):
        OPS.ln_linear(Residual(x, stream(x).moments[:3]), ln_w, ln_b, 1e-5, w, b)
    with pytest.raises(ValueError, match="residual.values has shape|residual has shape"):
        OPS.linear_residual(x, w, b, stream(randn(4, 8, dtype=torch.float32)))
    with pytest.raises(ValueError, match=r"empty|shape \(0, 32\)"):
        OPS.linear_residual(x[:0], w, b, stream(randn(0, 16, dtype=torch.float32)))
    with pytest.raises(ValueError, match="meta"):
        OPS.linear_residual(x, w.to("meta"), b, stream(randn(4, 16, dtype=torch.float32)))


def test_qkv_validation_names_the_offending_value():
    x, ln_w, ln_b, w, b, cache_slots, cache_shape = qkv_case(2, 3, 2, 16, 2, 8, torch.float32)
    k_cache, v_cache = poisoned(*cache_shape, dtype=torch.float32), poisoned(*cache_shape, dtype=torch.float32)
    starts, key_mask = cache_slots[:, 0].contiguous(), torch.ones(2, 8, dtype=torch.int32, device=DEVICE)

    def project(weight=w, bias=b, k=k_cache, v=v_cache, slots=cache_slots):
        return OPS.ln_qkv_projection(stream(x), ln_w, ln_b, 1e-5, weight, bias, k, v, CacheAccess(slots, starts, key_mask))

    with pytest.raises(ValueError, match="batch 2 is larger than the cache's 1 rows"):
        project(k=k_cache[:1], v=v_cache[:1])
    with pytest.raises(ValueError, match="3 heads of 16"):
        project(k=poisoned(2, 3, 8, 16, dtype=torch.float32), v=poisoned(2, 3, 8, 16, dtype=torch.float32))
    with pytest.raises(ValueError, match="cache_slots has dtype torch.float32"):
        project(slots=cache_slots.float())
    with pytest.raises(ValueError, match=r"cache_slots has shape \(2, 2\)"):
        project(slots=cache_slots[:, :2].contiguous())
    with pytest.raises(ValueError, match="v_cache has dtype torch.float16"):
        project(v=v_cache.half())
    with pytest.raises(ValueError, match="c_attn needs"):
        project(weight=w[:, :64], bias=b[:64])
    assert torch.isnan(k_cache).all() and torch.isnan(v_cache).all(), "a rejected call wrote into the cache"
