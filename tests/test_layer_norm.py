import pytest
import torch

from numerics import DTYPES, OPS, as_float64, assert_close, poisoned_allocations, randn
from tritongpt2.kernels import reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 80), (17, 100), (2, 1600)])
def test_layer_norm_matches_reference(ops, shape, dtype):
    width = shape[-1]
    x = (randn(*shape, dtype=torch.float32) * 3.0 + 20.0).to(dtype)
    w, b = randn(width, dtype=dtype) + 1.0, randn(width, dtype=dtype)
    with poisoned_allocations():
        out = ops.layer_norm(x, w, b, 1e-5)
    assert_close(out, reference.layer_norm(*as_float64(x, w, b), 1e-5), reference.layer_norm(x, w, b, 1e-5))


def test_layer_norm_validation_names_the_offending_value():
    x, w, b = randn(4, 32, dtype=torch.float32), randn(32, dtype=torch.float32), randn(32, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(31,\)"):
        OPS.layer_norm(x, w[:31], b, 1e-5)
    with pytest.raises(ValueError, match="bias has dtype torch.float16"):
        OPS.layer_norm(x, w, b.half(), 1e-5)
    with pytest.raises(ValueError, match="eps must be a finite number, got inf"):
        OPS.layer_norm(x, w, b, float("inf"))
    with pytest.raises(ValueError, match="row width 20000"):
        OPS.layer_norm(randn(1, 20000, dtype=torch.float32), *(randn(20000, dtype=torch.float32),) * 2, 1e-5)
    with pytest.raises(ValueError, match="x must be contiguous"):
        OPS.layer_norm(randn(32, 4, dtype=torch.float32).T, w, b, 1e-5)
