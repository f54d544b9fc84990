import pytest
import torch

from tritongpt2.kernels import cpu_matmul
from tritongpt2.kernels.cpu_matmul import MAX_BLOCKED_ROWS, MIN_BLOCK_COLUMNS, addmm_rows


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
