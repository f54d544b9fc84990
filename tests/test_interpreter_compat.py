"""The interpreter fix for triton < 3.7 with numpy >= 2.4 (kernels/interpreter_compat.py)."""

import numpy as np
import pytest
import triton

from tritongpt2.kernels import interpreter_compat


@pytest.mark.parametrize("version, needed", [("3.2.0", True), ("3.6.0", True), ("3.6.0+git1234", True), ("3.7.0", False), ("3.9.0", False), ("4.0.0", False)])
def test_only_triton_before_3_7_needs_the_fix(version, needed):
    assert interpreter_compat.needs_fix(version) is needed


def test_a_compiled_kernel_is_left_alone():
    assert interpreter_compat.install(object()) is False


def test_scalars_index_as_triton_3_7_does():
    class Handle:
        data = np.array([7], dtype=np.int32)  # how the interpreter holds a scalar

    class Scalar:
        handle = Handle()

    assert interpreter_compat._index(Scalar()) == 7
    assert range(0, 70, 1)[interpreter_compat._index(Scalar())] == 7


def test_interpreted_kernels_get_the_fix_where_needed():
    from triton.runtime import interpreter

    from tritongpt2.kernels import launchers

    if not isinstance(launchers.KERNELS[0], interpreter.InterpretedFunction):
        pytest.skip("kernels are compiled for the GPU in this process")
    patched = interpreter_compat.install(launchers.KERNELS[0])
    assert patched is interpreter_compat.needs_fix(triton.__version__)
    assert getattr(interpreter._patch_lang_tensor, "_tritongpt2_index_fix", False) is patched
