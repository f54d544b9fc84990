import inspect
import subprocess
import sys

import pytest
import torch

from numerics import BACKEND, ON_GPU, OPS
from tritongpt2.kernels import torch_ops
from tritongpt2.kernels.backend import BACKEND_ENV, BACKENDS, choose_backend, resolve_backend


def test_triton_and_torch_ops_share_names_and_signatures():
    for op in OPS.OPS:
        assert inspect.signature(op) == inspect.signature(getattr(torch_ops, op.__name__)), op.__name__
    assert resolve_backend("torch").ops is torch_ops


def test_argument_beats_environment_beats_default(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend().name == "torch"
    assert resolve_backend(BACKEND).name == BACKEND
    monkeypatch.delenv(BACKEND_ENV)
    assert resolve_backend().name == ("triton" if ON_GPU else "torch")


def test_the_default_follows_the_weights_device(monkeypatch):
    # With CUDA present, weights on the CPU still take the CPU backend (and CUDA weights the GPU one).
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend(device="cpu").name == "torch"
    assert choose_backend(device=torch.device("cuda", 0))[0].name == "triton"
    assert choose_backend()[0].name == "triton"
    with pytest.raises(ValueError, match="backend='torch' runs on cpu, but the weights are on cuda"):
        resolve_backend("torch", device="cuda")


def test_backends_say_what_they_can_do():
    assert [b.cuda_graphs for b in BACKENDS.values()] == [True, False, False]
    assert {b.device_type for b in BACKENDS.values()} == {"cuda", "cpu"}
    with pytest.raises(ValueError, match="interpreter computes bfloat16 tl.dot wrongly"):
        BACKENDS["interpret"].check_dtype(torch.bfloat16)
    BACKENDS["torch"].check_dtype(torch.bfloat16)


def test_unknown_backend_names_the_value_and_where_it_came_from(monkeypatch):
    with pytest.raises(ValueError, match="backend='cuda'"):
        resolve_backend("cuda")
    monkeypatch.setenv(BACKEND_ENV, "tpu")
    with pytest.raises(ValueError, match=r"\$TRITONGPT2_BACKEND='tpu'"):
        resolve_backend()


@pytest.mark.skipif(ON_GPU, reason="this process compiles for the GPU")
def test_triton_backend_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_backend("triton")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PATH": ""})


def test_interpret_backend_switches_the_interpreter_on_in_a_fresh_process():
    # The whole public API is imported first: nothing in it may define a jit function early.
    code = (
        "import torch, tritongpt2\n"
        "from tritongpt2.kernels.backend import resolve_backend, kernel_mode\n"
        "from tritongpt2.kernels.operands import Residual\n"
        "from tritongpt2.kernels.reference import row_moments\n"
        "ops = resolve_backend('interpret').ops\n"
        "x = torch.randn(2, 32)\n"
        "w = torch.randn(32, 16)\n"
        "ops.ln_linear(Residual(x, row_moments(x, 16)), torch.ones(32), torch.zeros(32), 1e-5, w, None, 'gelu_new')\n"
        "print(kernel_mode())\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "interpret"


def value_error_in_fresh_process(setup: str, call: str) -> str:
    """Run `setup`, then `call`, in a new interpreter; the message of the ValueError the call raises."""
    result = run_python(f"{setup}\ntry:\n    {call}\nexcept ValueError as e:\n    print(e)\n")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_interpret_after_compiled_kernels_is_a_clear_error():
    # Build the kernels for the GPU (no GPU needed to define them), then ask for the interpreter.
    message = value_error_in_fresh_process(
        "from tritongpt2.kernels.backend import resolve_backend\nimport tritongpt2.kernels.launchers",
        "resolve_backend('interpret')",
    )
    assert "triton was already imported for the GPU" in message


def test_interpret_after_triton_was_imported_for_the_gpu_is_a_clear_error():
    # torch.compile and transformers import triton; its own jit helpers are then built for the GPU.
    message = value_error_in_fresh_process(
        "import triton.language\nfrom tritongpt2.kernels.backend import resolve_backend", "resolve_backend('interpret').ops"
    )
    assert "set TRITON_INTERPRET=1 in the environment before anything imports triton" in message
