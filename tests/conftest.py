import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory on sys.path. Run from the checkout, its kernels/ folder
# (installed as tritongpt2.kernels) would shadow Hugging Face's `kernels` package, which transformers
# (5.25 on) requires and imports: the tests, and the processes they start, see the package only as
# installed.
CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != CHECKOUT]
os.environ["PYTHONSAFEPATH"] = "1"  # a `python -m` or `-c` child leaves its working directory off sys.path

import torch  # noqa: E402

# Without a GPU the kernels run under Triton's interpreter, which must be on before any kernel module
# is imported (triton decides at @triton.jit time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import device_audit  # noqa: E402  (after TRITON_INTERPRET: it imports the package when enabled)

# TRITONGPT2_TEST_DEVICE_AUDIT=1: the kernel backend's tensors count as living on a device of their
# own, as on a GPU machine (device_audit.py). Installed before the test modules import the package's
# functions, so that they import the checked ones.
if device_audit.ENABLED:
    if torch.cuda.is_available():
        raise RuntimeError(f"{device_audit.ENV}=1 stands in for a GPU on a CPU-only machine; on this one run the suite as it is")
    device_audit.install()


def pytest_report_header(config):
    if device_audit.ENABLED:
        return f"device audit on ({device_audit.ENV}=1): the {device_audit.FOREIGN} backend counts as a device of its own"


def pytest_generate_tests(metafunc):
    # `ops`: the test runs once per backend whose ops run on the tests' device (numerics.BACKEND_OPS).
    if "ops" in metafunc.fixturenames:
        from numerics import BACKEND_OPS

        metafunc.parametrize("ops", list(BACKEND_OPS.values()), ids=list(BACKEND_OPS))


def pytest_collection_modifyitems(items):
    # Tests marked slow take minutes under the interpreter: run first, so that README's two workers
    # (pytest-xdist, one test handed out at a time) share them and finish together.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
