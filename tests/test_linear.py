import pytest
import torch

from numerics import DEVICE, DTYPES, OPS, as_float64, assert_close, poisoned, poisoned_allocations, randn
from tritongpt2.kernels import reference
from tritongpt2.kernels.activations import ACTIVATIONS

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
def test_ln_linear_matches_reference(rows, k, n, dtype):
    x = residual_stream(rows, k, dtype)
    ln_w, ln_b = layer_norm_params(k, dtype)
    w, b = randn(k, n, dtype=dtype, scale=k**-0.5), randn(n, dtype=dtype)
    with poisoned_allocations():
        out = OPS.ln_linear(x, ln_w, ln_b, 1e-5, w, b, "gelu_new")
    oracle = reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, *as_float64(w, b), "gelu_new")
    assert_close(out, oracle, reference.ln_linear(x, ln_w, ln_b, 1e-5, w, b, "gelu_new"))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_in_the_epilogue(name):
    x = randn(9, 48, dtype=torch.float32, scale=3.0)
    ln_w, ln_b = layer_norm_params(48, torch.float32)
    w, b = randn(48, 40, dtype=torch.float32, scale=0.5), randn(40, dtype=torch.float32)
    out = OPS.ln_linear(x, ln_w, ln_b, 1e-5, w, b, name)
    assert_close(out, reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, *as_float64(w, b), name))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_reference_is_transformers_act2fn(dtype):
    act2fn = pytest.importorskip("transformers.activations").ACT2FN
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    for name in ACTIVATIONS:
        expected = act2fn[name](x)
        torch.testing.assert_close(reference.apply_activation(x, name), expected, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_head_reads_the_transposed_embedding(dtype):
    vocab, width = 301, 80
    wte = randn(vocab, width, dtype=dtype, scale=0.2)
    x = residual_stream(5, width, dtype)
    ln_w, ln_b = layer_norm_params(width, dtype)
    with poisoned_allocations():
        logits = OPS.ln_linear(x, ln_w, ln_b, 1e-5, wte.T, None)
    oracle = reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, wte.double().T, None)
    assert_close(logits, oracle, reference.ln_linear(x, ln_w, ln_b, 1e-5, wte.T, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_linear_residual_matches_reference(rows, k, n, dtype):
    x, residual = randn(rows, k, dtype=dtype), randn(rows, n, dtype=dtype)
    w, b = randn(k, n, dtype=dtype, scale=k**-0.5), randn(n, dtype=dtype)
    with poisoned_allocations():
        out = OPS.linear_residual(x, w, b, residual)
    oracle = reference.linear_residual(*as_float64(x, w, b, residual))
    assert_close(out, oracle, reference.linear_residual(x, w, b, residual))


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES)
def test_ln_qkv_projection_writes_q_and_the_cache(shape, dtype):
    x, ln_w, ln_b, w, b, cache_slots, cache_shape = qkv_case(*shape, dtype)
    k_cache, v_cache = poisoned(*cache_shape, dtype=dtype), poisoned(*cache_shape, dtype=dtype)
    with poisoned_allocations():
        q = OPS.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, k_cache, v_cache, cache_slots)

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
        OPS.ln_linear(x.double(), ln_w, ln_b, 1e-5, w, b)
    with pytest.raises(ValueError, match=r"weight has shape \(16, 32\)"):
        OPS.ln_linear(x, ln_w, ln_b, 1e-5, w.T.contiguous(), b)
    with pytest.raises(ValueError, match="bias has shape"):
        OPS.ln_linear(x, ln_w, ln_b, 1e-5, w, b[:8])
    with pytest.raises(ValueError, match="weight has dtype torch.float16"):
        OPS.ln_linear(x, ln_w, ln_b, 1e-5, w.half(), b)
    with pytest.raises(ValueError, match="'gelu_magic'"):
        OPS.ln_linear(x, ln_w, ln_b, 1e-5, w, b, "gelu_magic")
    with pytest.raises(ValueError, match="eps"):
        OPS.ln_linear(x, ln_w, ln_b, float("nan"), w, b)
    with pytest.raises(ValueError, match="contiguous"):
        OPS.ln_linear(randn(32, 4, dtype=torch.float32).T, ln_w, ln_b, 1e-5, w, b)
    with pytest.raises(ValueError, match="residual has shape"):
        OPS.linear_residual(x, w, b, randn(4, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"empty|shape \(0, 32\)"):
        OPS.linear_residual(x[:0], w, b, randn(0, 16, dtype=torch.float32))
    with pytest.raises(ValueError, match="meta"):
        OPS.linear_residual(x, w.to("meta"), b, randn(4, 16, dtype=torch.float32))


def test_qkv_validation_names_the_offending_value():
    x, ln_w, ln_b, w, b, cache_slots, cache_shape = qkv_case(2, 3, 2, 16, 2, 8, torch.float32)
    k_cache, v_cache = poisoned(*cache_shape, dtype=torch.float32), poisoned(*cache_shape, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch 2 is larger than the cache's 1 rows"):
        OPS.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, k_cache[:1], v_cache[:1], cache_slots)
    with pytest.raises(ValueError, match="3 heads of 16"):
        OPS.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, *(poisoned(2, 3, 8, 16, dtype=torch.float32),) * 2, cache_slots)
    with pytest.raises(ValueError, match="cache_slots has dtype torch.float32"):
        OPS.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, k_cache, v_cache, cache_slots.float())
    with pytest.raises(ValueError, match=r"cache_slots has shape \(2, 2\)"):
        OPS.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, k_cache, v_cache, cache_slots[:, :2].contiguous())
    with pytest.raises(ValueError, match="v_cache has dtype torch.float16"):
        OPS.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, k_cache, v_cache.half(), cache_slots)
    with pytest.raises(ValueError, match="c_attn needs"):
        OPS.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w[:, :64], b[:64], k_cache, v_cache, cache_slots)
    assert torch.isnan(k_cache).all() and torch.isnan(v_cache).all(), "a rejected call wrote into the cache"
