import os

import torch

# Without a GPU the kernels run under Triton's interpreter, which must be on before any kernel module
# is imported (triton decides at @triton.jit time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_generate_tests(metafunc):
    # `ops`: the test runs once per backend whose ops run on the tests' device (numerics.BACKEND_OPS).
    if "ops" in metafunc.fixturenames:
        from numerics import BACKEND_OPS

        metafunc.parametrize("ops", list(BACKEND_OPS.values()), ids=list(BACKEND_OPS))
