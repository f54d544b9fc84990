import copy
import pickle

import pytest
import torch

from numerics import assert_close
from tritongpt2.kernels import cpu_matmul, reference
from tritongpt2.kernels import torch_ops as ops
from tritongpt2.kernels.cpu_matmul import MAX_BLOCKED_ROWS, MIN_BLOCK_COLUMNS, addmm_rows
from tritongpt2.kernels.operands import Residual
from tritongpt2.kernels.packed_weight import PackedWeight, pack_weight


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(params=["onednn", "blas"])
def route(request, monkeypatch):
    """Both routes of a float32 batch: oneDNN's linear where torch has it, and BLAS where it has not."""
    if request.param == "onednn" and cpu_matmul.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear")
    if request.param == "blas":
        monkeypatch.setattr(cpu_matmul, "ONEDNN_LINEAR", None)
    return request.param


@pytest.mark.parametrize("thread_count", [2, 3])
@pytest.mark.parametrize("rows", [1, 5, MAX_BLOCKED_ROWS, MAX_BLOCKED_ROWS + 1])
@pytest.mark.parametrize("width", [2 * MIN_BLOCK_COLUMNS, 3 * MIN_BLOCK_COLUMNS + 7, MIN_BLOCK_COLUMNS + 1])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_addmm_rows_matches_addmm(threads, route, thread_count, rows, width, transposed, with_bias, dtype):
    # Widths that split evenly, that leave a tail of columns, and that are too narrow to split;
    # float32 is what the torch backend runs (BLAS may take another path for it than for float64).
    threads(thread_count)
    generator = torch.Generator().manual_seed(rows * 31 + width)
    depth = 48
    x = torch.randn(rows, depth, generator=generator, dtype=torch.float64)
    weight = torch.randn(width, depth, generator=generator, dtype=torch.float64).T if transposed else \
        torch.randn(depth, width, generator=generator, dtype=torch.float64)
    bias = torch.randn(width, generator=generator, dtype=torch.float64) if with_bias else None
    expected = x @ weight if bias is None else torch.addmm(bias, x, weight)
    got = addmm_rows(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    assert got.shape == (rows, width) and got.is_contiguous() and got.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_float32_batches_run_onednn(monkeypatch):
    calls = []
    if cpu_matmul.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear")
    real = cpu_matmul.ONEDNN_LINEAR
    monkeypatch.setattr(cpu_matmul, "ONEDNN_LINEAR", lambda *args: calls.append(args[0].shape) or real(*args))
    weight = torch.randn(16, 4 * MIN_BLOCK_COLUMNS)
    addmm_rows(torch.randn(1, 16), weight)
    addmm_rows(torch.randn(3, 16, dtype=torch.float64), weight.double())
    assert calls == []
    addmm_rows(torch.randn(2, 16), weight)
    assert calls == [(2, 16)]


def test_addmm_rows_single_thread_is_addmm(threads):
    threads(1)
    x, weight, bias = torch.randn(1, 16), torch.randn(16, 4 * MIN_BLOCK_COLUMNS), torch.randn(4 * MIN_BLOCK_COLUMNS)
    assert torch.equal(addmm_rows(x, weight, bias), torch.addmm(bias, x, weight))


@pytest.fixture
def native_bfloat16():
    if cpu_matmul.ONEDNN_LINEAR is None or not cpu_matmul.BFLOAT16_GEMM:
        pytest.skip("this CPU has no native bfloat16 gemm (or torch no oneDNN linear)")


@pytest.mark.parametrize("rows", [1, 2, 16, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_products_run_onednn_in_bfloat16(monkeypatch, native_bfloat16, rows, with_bias):
    # Float32 sums rounded once to bfloat16 (with the bias): within one bfloat16 step of the exact
    # product rounded, where the weight used to be widened to float32 at every call.
    calls = []
    onednn = cpu_matmul.ONEDNN_LINEAR
    monkeypatch.setattr(cpu_matmul, "ONEDNN_LINEAR", lambda *args: calls.append(args[0].dtype) or onednn(*args))
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator).bfloat16()
    weight = torch.randn(300, 96, generator=generator).bfloat16().T  # [in, out] seen through [out, in] rows
    bias = torch.randn(300, generator=generator).bfloat16() if with_bias else None
    assert cpu_matmul.bfloat16_linear_runs(x, weight, bias)
    got = cpu_matmul.bfloat16_linear(x, weight, bias)
    exact = x.double() @ weight.double() + (0 if bias is None else bias.double())
    assert calls == [torch.bfloat16] and got.dtype == torch.bfloat16
    step = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # bfloat16's spacing there
    assert ((got.double() - exact).abs() <= step * 1.01 + 1e-4 * exact.abs().max()).all()


@pytest.mark.parametrize("native", [True, False])
def test_the_torch_backends_bfloat16_layers_match_the_reference(monkeypatch, native):
    # With a native bfloat16 gemm the products come out in bfloat16 (rounded once with the bias,
    # before GELU and the residual); without one the weight is widened to float32. Either is held
    # to bfloat16's tolerance against the float64 oracle, as the kernels are.
    if native and (cpu_matmul.ONEDNN_LINEAR is None or not cpu_matmul.BFLOAT16_GEMM):
        pytest.skip("this CPU has no native bfloat16 gemm (or torch no oneDNN linear)")
    monkeypatch.setattr(cpu_matmul, "BFLOAT16_GEMM", native)
    dtypes = []
    onednn = cpu_matmul.ONEDNN_LINEAR
    if onednn is not None:
        monkeypatch.setattr(cpu_matmul, "ONEDNN_LINEAR", lambda *args: dtypes.append(args[0].dtype) or onednn(*args))
    generator = torch.Generator().manual_seed(7)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    width, inner, rows = 96, 384, 5
    x = (randn(rows, width) * 2 + 3).bfloat16()
    ln_w, ln_b = (randn(width, scale=0.3) + 1).bfloat16(), randn(width, scale=0.3).bfloat16()
    fc, proj = randn(width, inner, scale=width**-0.5).bfloat16(), randn(inner, width, scale=inner**-0.5).bfloat16()
    fc_b, proj_b = randn(inner, scale=0.1).bfloat16(), randn(width, scale=0.1).bfloat16()
    out = ops.mlp(Residual(x), ln_w, ln_b, 1e-5, fc, fc_b, "gelu_new", proj, proj_b)
    wide = [t.double() for t in (x, ln_w, ln_b)]
    oracle = reference.mlp(*wide, 1e-5, fc.double(), fc_b.double(), "gelu_new", proj.double(), proj_b.double())
    assert out.values.dtype == torch.bfloat16
    assert (torch.bfloat16 in dtypes) == native
    assert_close(out.values, oracle, reference.mlp(x, ln_w, ln_b, 1e-5, fc, fc_b, "gelu_new", proj, proj_b))


@pytest.fixture
def packs():
    if cpu_matmul.REORDER is None or cpu_matmul.ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN to pack weights with")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("depth,width", [(96, 300), (384, 40)])
def test_packed_weights_give_the_plain_weights_bits(packs, dtype, depth, width):
    # The same oneDNN linear over the weight packed once and over its plain [out, in] rows: the same
    # bits at every row count of 2 or more (float32 at one row: oneDNN's single-row kernel, whose
    # order of sums depends on the packing, within float32's rounding); bfloat16 at one row too.
    generator = torch.Generator().manual_seed(depth + width)
    rows = torch.randn(64, depth, generator=generator).to(dtype)
    plain = torch.randn(width, depth, generator=generator).to(dtype).T  # [in, out] seen through [out, in] rows
    bias = torch.randn(width, generator=generator).to(dtype)
    packed = pack_weight(plain)
    assert packed.shape == plain.shape and packed.dtype == dtype and packed.nbytes == plain.nbytes
    assert torch.equal(packed.dense(), plain)
    for count in (1, 2, 5, 16, 64):
        got = cpu_matmul.packed_linear(rows[:count], packed, bias)
        expected = cpu_matmul.ONEDNN_LINEAR(rows[:count], plain.T, bias, "none", [], "")
        assert got.dtype == dtype and got.shape == (count, width)
        if count == 1 and dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
        else:
            assert torch.equal(got, expected), count


def test_a_packed_weight_takes_float64_rows_widened(packs):
    generator = torch.Generator().manual_seed(3)
    plain = torch.randn(40, 24, generator=generator).T
    rows, bias = torch.randn(3, 24, generator=generator, dtype=torch.float64), torch.randn(40, generator=generator)
    got = cpu_matmul.packed_linear(rows, pack_weight(plain), bias)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.addmm(bias.double(), rows, plain.double()), rtol=1e-12, atol=1e-12)


def test_which_weights_are_packed(monkeypatch, packs):
    # float32 with AVX-512, bfloat16 with a native gemm, on the CPU; float16 never (no native gemm
    # is assumed: its products widen the weight).
    assert cpu_matmul.PACKS_FLOAT32 == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    for avx512 in (True, False):
        for native in (True, False):
            monkeypatch.setattr(cpu_matmul, "PACKS_FLOAT32", avx512)
            monkeypatch.setattr(cpu_matmul, "BFLOAT16_GEMM", native)
            assert cpu_matmul.can_pack(torch.float32) == cpu_matmul.can_pack(torch.float32, "cpu") == avx512
            assert cpu_matmul.can_pack(torch.bfloat16) == native
            assert not cpu_matmul.can_pack(torch.float16) and not cpu_matmul.can_pack(torch.float32, "cuda")
    monkeypatch.setattr(cpu_matmul, "REORDER", None)
    assert not cpu_matmul.can_pack(torch.float32) and not cpu_matmul.can_pack(torch.bfloat16)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_packed_weight_is_packed_again_only_where_the_machine_packs(monkeypatch, packs, how):
    # It travels as the plain weight (oneDNN's tensor cannot): a machine that does not pack its dtype
    # (or has no oneDNN at all) gets the plain W, which every product takes too.
    plain = torch.randn(40, 24, generator=torch.Generator().manual_seed(4)).T
    packed = pack_weight(plain)

    def copied():
        return copy.deepcopy(packed) if how == "deepcopy" else pickle.loads(pickle.dumps(packed))

    monkeypatch.setattr(cpu_matmul, "PACKS_FLOAT32", True)
    again = copied()
    assert isinstance(again, PackedWeight) and again is not packed and torch.equal(again.dense(), plain)
    monkeypatch.setattr(cpu_matmul, "PACKS_FLOAT32", False)
    landed = copied()
    assert not isinstance(landed, PackedWeight) and torch.equal(landed, plain) and landed.shape == packed.shape
    monkeypatch.setattr(cpu_matmul, "PACKS_FLOAT32", True)
    monkeypatch.setattr(cpu_matmul, "REORDER", None)
    assert not isinstance(copied(), PackedWeight)
