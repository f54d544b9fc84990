import pytest
import torch

from numerics import assert_close
from tritongpt2.kernels import cpu_matmul, reference
from tritongpt2.kernels import torch_ops as ops
from tritongpt2.kernels.cpu_matmul import MAX_BLOCKED_ROWS, MIN_BLOCK_COLUMNS, addmm_rows
from tritongpt2.kernels.operands import Residual


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
