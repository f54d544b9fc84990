"""The torch backend's ops on quantized weights (kernels/cpu_quantized.py) against the reference's
quantize-then-dequantize, every format in float32, float16 and bfloat16 at 1, 5 and 40 rows, and
the routes each (format, dtype) takes."""

from __future__ import annotations

import threading

import pytest
import torch

from numerics import as_float64, assert_close, poisoned_allocations
from test_attention import DECODE, PREFILL, cache_case, check, index
from test_embedding import cache_state
from tritongpt2.engine.quantize import Quantization, quantize_matrix
from tritongpt2.kernels import cpu_quantized, reference
from tritongpt2.kernels import torch_ops as ops
from tritongpt2.kernels.cpu_quantized import quantized_matmul
from tritongpt2.kernels.operands import CacheAccess, Residual

FORMATS = [Quantization("int8"), Quantization("int4", 32), Quantization("int4", 64), Quantization("int4", 128),
           Quantization("nf4"), Quantization("nf4", double_quant=True)]
FORMAT_IDS = ["int8", "int4-g32", "int4-g64", "int4-g128", "nf4", "nf4-dq"]
# bfloat16 too: the torch backend runs it on the CPU (only the interpreter's bfloat16 dot is wrong).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 5, 40]
# (K, N): K a multiple of every group; N neither a multiple of 16 (the int4 kernel pads it) nor of a block.
SHAPES = [(128, 40), (256, 72), (128, 300)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of columns a few times smaller than the weights, so that every route runs several
    blocks, a partial last one included, and the int4 pack several chunks. The block buffers are
    the test's own, made inside poisoned_allocations: NaN wherever a block is not written."""
    monkeypatch.setattr(cpu_quantized, "CHUNK_BYTES", 128 * 24 * 4)
    monkeypatch.setattr(cpu_quantized, "PACK_ROWS", 64)
    monkeypatch.setattr(cpu_quantized, "_SCRATCH", threading.local())


def weight(k: int, n: int, quantization: Quantization, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return quantize_matrix(torch.randn(k, n, generator=g) * k**-0.5, quantization)


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def layer_norm_params(width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return randn(width, dtype=dtype, scale=0.5, seed=2) + 1.0, randn(width, dtype=dtype, scale=0.5, seed=3)


def residual_stream(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    x = randn(rows, width, dtype=torch.float32, seed=4) * 2.0 + 30.0
    x[:, ::17] *= 8.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("quantization", FORMATS, ids=FORMAT_IDS)
def test_ln_linear_matches_the_dequantized_reference(quantization, k, n, rows, dtype):
    w = weight(k, n, quantization)
    x = residual_stream(rows, k, dtype)
    ln_w, ln_b = layer_norm_params(k, dtype)
    b = randn(n, dtype=dtype, seed=5)
    with poisoned_allocations():
        out = ops.ln_linear(Residual(x), ln_w, ln_b, 1e-5, w, b, "gelu_new")
    oracle = reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, w, b.double(), "gelu_new")
    assert out.dtype == dtype
    assert_close(out, oracle, reference.ln_linear(x, ln_w, ln_b, 1e-5, w, b, "gelu_new"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantization", FORMATS, ids=FORMAT_IDS)
def test_the_lm_head_has_no_bias_and_keeps_the_rows_shape(quantization, dtype):
    # The tied head: W = wte.T [C, vocab], vocabulary not a multiple of 16, hidden states [B, T, C].
    w = weight(128, 301, quantization)
    x = residual_stream(6, 128, dtype).view(2, 3, 128)
    ln_w, ln_b = layer_norm_params(128, dtype)
    with poisoned_allocations():
        logits = ops.ln_linear(Residual(x), ln_w, ln_b, 1e-5, w, None)
    assert logits.shape == (2, 3, 301)
    oracle = reference.ln_linear(*as_float64(x, ln_w, ln_b), 1e-5, w, None)
    assert_close(logits, oracle, reference.ln_linear(x, ln_w, ln_b, 1e-5, w, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("quantization", FORMATS, ids=FORMAT_IDS)
def test_linear_residual_matches_the_dequantized_reference(quantization, k, n, rows, dtype):
    w = weight(k, n, quantization)
    x, residual = randn(rows, k, dtype=dtype, seed=6), randn(rows, n, dtype=dtype, seed=7)
    b = randn(n, dtype=dtype, seed=8)
    with poisoned_allocations():
        out = ops.linear_residual(x, w, b, Residual(residual))
    oracle = reference.linear_residual(x.double(), w, b.double(), residual.double())
    assert_close(out.values, oracle, reference.linear_residual(x, w, b, residual))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("quantization", FORMATS, ids=FORMAT_IDS)
def test_mlp_matches_the_dequantized_reference(quantization, rows, dtype):
    width, inner = 128, 256
    fc, proj = weight(width, inner, quantization, seed=10), weight(inner, width, quantization, seed=11)
    x = residual_stream(rows, width, dtype)
    ln_w, ln_b = layer_norm_params(width, dtype)
    fc_b, proj_b = randn(inner, dtype=dtype, seed=12), randn(width, dtype=dtype, seed=13)
    with poisoned_allocations():
        out = ops.mlp(Residual(x), ln_w, ln_b, 1e-5, fc, fc_b, "gelu_new", proj, proj_b)
    oracle = reference.mlp(*as_float64(x, ln_w, ln_b), 1e-5, fc, fc_b.double(), "gelu_new", proj, proj_b.double())
    assert_close(out.values, oracle, reference.mlp(x, ln_w, ln_b, 1e-5, fc, fc_b, "gelu_new", proj, proj_b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 5), (2, 20)])
@pytest.mark.parametrize("quantization", FORMATS, ids=FORMAT_IDS)
def test_ln_qkv_projection_writes_q_and_the_cache(quantization, batch, seq, dtype):
    heads, head_dim, slots = 2, 64, 24
    width = heads * head_dim
    w = weight(width, 3 * width, quantization)
    x = residual_stream(batch * seq, width, dtype).view(batch, seq, width)
    ln_w, ln_b = layer_norm_params(width, dtype)
    b = randn(3 * width, dtype=dtype, seed=14)
    cache_slots = torch.arange(batch)[:, None] * 2 + torch.arange(seq)
    key_mask = torch.ones(batch, slots, dtype=torch.int32)
    access: CacheAccess = ops.cache_access(cache_slots, cache_slots[:, 0].contiguous(), key_mask)
    shape = (batch, heads, slots, head_dim)
    k_cache, v_cache = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    with poisoned_allocations():
        q = ops.ln_qkv_projection(Residual(x), ln_w, ln_b, 1e-5, w, b, k_cache, v_cache, access)
    k_oracle, v_oracle = (torch.full(shape, float("nan"), dtype=torch.float64) for _ in "kv")
    q_oracle = reference.ln_qkv_projection(*as_float64(x, ln_w, ln_b), 1e-5, w, b.double(), k_oracle, v_oracle, cache_slots)
    k_same, v_same = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    q_same = reference.ln_qkv_projection(x, ln_w, ln_b, 1e-5, w, b, k_same, v_same, cache_slots)
    assert_close(q, q_oracle, q_same)
    written = ~torch.isnan(k_oracle)
    assert torch.equal(~torch.isnan(k_cache), written)
    assert_close(k_cache[written], k_oracle[written], k_same[written])
    assert_close(v_cache[written], v_oracle[written], v_same[written])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (2, 20)])
@pytest.mark.parametrize("quantization", FORMATS, ids=FORMAT_IDS)
def test_embedding_gathers_and_dequantizes_the_tied_heads_columns(quantization, shape, dtype):
    vocab, width, positions = 301, 128, 40
    wte = weight(width, vocab, quantization)  # the LM head's weight [C, vocab]
    wpe = randn(positions, width, dtype=dtype, seed=15)
    g = torch.Generator().manual_seed(16)
    input_ids, token_types = torch.randint(0, vocab, shape, generator=g), torch.randint(0, vocab, shape, generator=g)
    position_ids = torch.randint(0, positions, shape, generator=g)
    with poisoned_allocations():
        out = ops.embedding(input_ids, position_ids, wte, wpe, token_types)
    oracle = reference.embedding(input_ids, position_ids, wte, wpe.double(), token_types)
    assert out.values.dtype == dtype
    assert_close(out.values, oracle, reference.embedding(input_ids, position_ids, wte, wpe, token_types))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantization", FORMATS, ids=FORMAT_IDS)
def test_decode_embedding_dequantizes_and_keeps_the_cache_books(quantization, dtype):
    vocab, width, n_slots, batch = 97, 128, 24, 3
    wte = weight(width, vocab, quantization)
    wpe = randn(n_slots + 3, width, dtype=dtype, seed=17)
    input_ids = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(18))
    state = cache_state(5, n_slots, batch, seed=19)
    expected, in_dtype = ({name: t.clone() for name, t in state.items()} for _ in range(2))
    with poisoned_allocations():
        out, slots = ops.decode_embedding(input_ids, None, wte, wpe, **state)
    oracle, oracle_slots = reference.decode_embedding(input_ids, None, wte, wpe.double(), **expected)
    same_dtype, _ = reference.decode_embedding(input_ids, None, wte, wpe, **in_dtype)
    assert_close(out.values, oracle, same_dtype)
    assert torch.equal(slots, oracle_slots)
    for name in ("lengths", "next_position", "key_mask"):
        assert torch.equal(state[name], expected[name]), name


@pytest.mark.parametrize("batch,seq,heads,head_dim,cache_rows,slots,starts", PREFILL)
def test_bfloat16_flash_attention_matches_reference(batch, seq, heads, head_dim, cache_rows, slots, starts):
    # The quantized models' bfloat16 activations meet torch's SDPA, which test_attention runs in
    # float32 and float16 only on the CPU.
    k_cache, v_cache, key_mask = cache_case(batch, heads, head_dim, cache_rows, slots, torch.bfloat16)
    key_mask[0, :1] = 0
    q = randn(batch, seq, heads * head_dim, dtype=torch.bfloat16, seed=21)
    check(ops, "flash_attention", q, k_cache, v_cache, index(starts), key_mask, head_dim**-0.5)


@pytest.mark.parametrize("batch,heads,head_dim,cache_rows,slots,query_slots", DECODE)
def test_bfloat16_decode_attention_matches_reference(batch, heads, head_dim, cache_rows, slots, query_slots):
    k_cache, v_cache, key_mask = cache_case(batch, heads, head_dim, cache_rows, slots, torch.bfloat16)
    key_mask[0, : query_slots[0] // 2] = 0
    q = randn(batch, heads * head_dim, dtype=torch.bfloat16, seed=22)
    check(ops, "decode_attention", q, k_cache, v_cache, index(query_slots), key_mask, head_dim**-0.5)


def test_full_size_blocks_match_too(monkeypatch):
    # The module's own block sizes: one block and one pack chunk for these weights.
    monkeypatch.undo()
    for quantization in FORMATS:
        w = weight(256, 300, quantization)
        for dtype in DTYPES:
            x = randn(5, 256, dtype=dtype, seed=20)
            oracle = x.double() @ reference.dequantize(w).double()
            assert_close(quantized_matmul(x, w).to(dtype), oracle, (x.float() @ reference.matrix(w, dtype).float()).to(dtype))


class Calls:
    def __init__(self, monkeypatch, *names: str) -> None:
        self.calls: list[str] = []
        for name in names:
            original = getattr(torch, name)
            monkeypatch.setattr(torch, name, self._spy(name, original))

    def _spy(self, name, original):
        def spy(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return spy


@pytest.mark.parametrize("quantization,dtype,route", [
    (Quantization("int8"), torch.bfloat16, "_weight_int8pack_mm"),
    (Quantization("int4", 64), torch.bfloat16, "_weight_int4pack_mm_for_cpu"),
    (Quantization("int8"), torch.float32, "_int_mm"),
    (Quantization("int8"), torch.float16, "_int_mm"),
    (Quantization("int4", 64), torch.float32, "mm"),
    (Quantization("nf4"), torch.bfloat16, "mm"),
], ids=["int8-bf16", "int4-bf16", "int8-f32", "int8-f16", "int4-f32", "nf4-bf16"])
def test_each_format_and_dtype_takes_its_route(monkeypatch, quantization, dtype, route):
    monkeypatch.setattr(cpu_quantized, "INT8_GEMM", True)
    calls = Calls(monkeypatch, "_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm", "mm")
    w = weight(128, 300, quantization)
    quantized_matmul(randn(1, 128, dtype=dtype), w)
    assert set(calls.calls) == {route}
    # Nothing the size of the dequantized weight is kept: the int4 pack is 0.5 byte a weight.
    kept = sum(t.numel() * t.element_size() for t in cpu_quantized._PREPARED.get(w, {}).values())
    assert kept <= 128 * 304 // 2 + 2 * 2 * 304 * 2


@pytest.mark.parametrize("int8_gemm,bfloat16_gemm", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["vnni-bf16", "vnni", "bf16", "neither"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_rows_take_the_route_measured_fastest_for_their_count(monkeypatch, int8_gemm, bfloat16_gemm, dtype):
    # cpu_quantized.py's thresholds: int8pack for a few bfloat16 rows, the integer route where the CPU
    # multiplies int8 natively, up to the row count where a dequantized gemm is faster; each agrees
    # with the reference.
    monkeypatch.setattr(cpu_quantized, "INT8_GEMM", int8_gemm)
    monkeypatch.setattr(cpu_quantized, "BFLOAT16_GEMM", bfloat16_gemm)
    calls = Calls(monkeypatch, "_weight_int8pack_mm", "_int_mm", "mm")
    w = weight(128, 300, Quantization("int8"))
    bfloat16 = dtype == torch.bfloat16
    int8pack_rows = (cpu_quantized.INT8PACK_ROWS if int8_gemm else cpu_quantized.INT8PACK_ROWS_ALONE) if bfloat16 else 0
    integer_rows = cpu_quantized.INTEGER_ROWS_BFLOAT16 if bfloat16 and bfloat16_gemm else cpu_quantized.INTEGER_ROWS
    for rows in sorted({1, int8pack_rows, int8pack_rows + 1, integer_rows - 1, integer_rows} - {0}):
        calls.calls.clear()
        x = randn(rows, 128, dtype=dtype, seed=rows)
        got = quantized_matmul(x, w)
        expected = ("_weight_int8pack_mm" if rows <= int8pack_rows
                    else "_int_mm" if int8_gemm and rows < integer_rows else "mm")
        assert set(calls.calls) == {expected}, rows
        assert_close(got.to(dtype), x.double() @ reference.dequantize(w).double(),
                     (x.float() @ reference.matrix(w, dtype).float()).to(dtype))


@pytest.mark.parametrize("rows", [1, 3])
def test_bfloat16_rows_of_a_width_int8pack_cannot_take_go_elsewhere(monkeypatch, rows):
    # _weight_int8pack_mm crashes the process (a segmentation fault) when K is not a multiple of 16.
    calls = Calls(monkeypatch, "_weight_int8pack_mm")
    w = weight(40, 24, Quantization("int8"))
    x = randn(rows, 40, dtype=torch.bfloat16)
    got = quantized_matmul(x, w)
    assert calls.calls == []
    assert_close(got.to(torch.bfloat16), x.double() @ reference.dequantize(w).double(),
                 (x.float() @ reference.matrix(w, torch.bfloat16).float()).to(torch.bfloat16))


@pytest.fixture
def integer_route(monkeypatch):
    """The integer route on any CPU (torch's int8 gemm runs everywhere; the route is taken only where
    the CPU has it natively), for bfloat16 rows too at any count below its limit."""
    monkeypatch.setattr(cpu_quantized, "INT8_GEMM", True)
    monkeypatch.setattr(cpu_quantized, "INT8PACK_ROWS", 0)
    calls = Calls(monkeypatch, "_int_mm")
    yield
    assert calls.calls, "the integer route was not taken"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, 5, 40, 63])
@pytest.mark.parametrize("k,n", [(13, 7), (128, 300), (40, 1001)])
def test_the_integer_route_matches_the_dequantized_reference(integer_route, k, n, rows, dtype):
    # Odd widths, rows with an outlier 8x the rest, an all-zero row; the small blocks of the
    # autouse fixture split the columns into several blocks and a narrower last one.
    w = weight(k, n, Quantization("int8"))
    x = residual_stream(rows, k, torch.float32)
    x[rows // 2] = 0.0
    x, b = x.to(dtype), randn(n, dtype=dtype, seed=5)
    with poisoned_allocations():
        got = quantized_matmul(x, w, b)
    assert got.dtype == torch.float32
    assert (got[rows // 2] == b.float()).all()
    assert_close(got.to(dtype), x.double() @ reference.dequantize(w).double() + b.double(),
                 (x.float() @ reference.matrix(w, dtype).float() + b.float()).to(dtype))


@pytest.mark.parametrize("digits", [2, 3])
def test_the_integer_routes_digits_carry_a_fixed_point_row_exactly(monkeypatch, integer_route, digits):
    # A row whose largest element is the fixed point's limit is its own fixed point: every value an
    # integer, so the digits must carry it exactly and only float32's rounding of the int32 sums
    # and their total (a few parts in 2^24) is left.
    monkeypatch.setitem(cpu_quantized.ROW_DIGITS, torch.float32, digits)
    limit = int(cpu_quantized._FIXED_POINT[digits][0])
    g = torch.Generator().manual_seed(digits)
    x = torch.randint(-limit, limit + 1, (6, 300), generator=g).float()
    x[:, 7] = limit
    x[1::2, 7] = -limit
    # Around the digits' carries: 127 and 128 roll the low digit over, 32767 and 32768 the middle one.
    boundaries = torch.tensor([v for v in (127, 128, 255, 256, 32639, 32640, 32767, 32768, limit - 1) if v <= limit]).float()
    x[2, 8 : 8 + 2 * len(boundaries)] = torch.cat([boundaries, -boundaries])
    w = weight(300, 50, Quantization("int8"))
    exact = x.double() @ w.data.double() * w.scale.double()
    got = quantized_matmul(x, w)
    terms = (x.double().abs() @ w.data.double().abs()) * w.scale.double()
    assert ((got.double() - exact).abs() <= 4 * 2.0**-24 * terms).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_integer_route_row_has_the_same_bits_in_any_batch(integer_route, dtype):
    # A row's fixed point, digits and int32 sums are its own, and the rest is elementwise: its
    # output does not depend on the rows beside it.
    w = weight(128, 300, Quantization("int8"))
    x = residual_stream(40, 128, dtype)
    alone = torch.cat([quantized_matmul(x[i: i + cpu_quantized.INT8PACK_ROWS + 1], w)[:1] for i in range(0, 40, 7)])
    together = quantized_matmul(x, w)[::7]
    assert torch.equal(alone, together)


def test_the_integer_route_keeps_nan_and_inf_rows_non_finite(integer_route):
    w = weight(128, 300, Quantization("int8"))
    x = randn(4, 128, dtype=torch.float32)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    got = quantized_matmul(x, w)
    assert got[[0, 3]].isfinite().all()
    assert got[1].isnan().all() and not got[2].isfinite().any()


@pytest.mark.parametrize("quantization", FORMATS, ids=FORMAT_IDS)
def test_float64_rows_multiply_the_dequantized_weight_in_float64(quantization):
    # float64 rows take the dequantized route in float64 (nf4's crashed in index_select before). The
    # route scales in float64 and the reference's W is rounded to float32: they differ by at most
    # float32's half ulp of each weight.
    w = weight(128, 300, quantization)
    x = randn(3, 128, dtype=torch.float64)
    got = quantized_matmul(x, w)
    dequantized = reference.dequantize(w).double()
    assert got.dtype == torch.float64
    assert ((got - x @ dequantized).abs() <= 2.0**-24 * (x.abs() @ dequantized.abs()) * 1.01).all()
