"""A fix for Triton's CPU interpreter on triton < 3.7 with numpy >= 2.4, applied only when it runs.

The interpreter holds every scalar (a kernel's int arguments, ``tl.program_id``, arithmetic on them)
as a 1-element, 1-D numpy array, and triton 3.2-3.6 turn such a scalar into a Python int, as
``range(0, K, BLOCK_K)`` asks through ``tensor.__index__``, with ``int(self.handle.data)``. numpy
deprecated ``int()`` of an array with ndim > 0 in 1.25 and made it a TypeError in 2.4 ("only
0-dimensional arrays can be converted to Python scalars"), so there every interpreted kernel with a
loop over a runtime bound fails. Triton 3.7 fixed it upstream with ``int(self.handle.data.squeeze())``;
this module gives older triton the same ``__index__``. Compiled (GPU) kernels never use this code.
"""

from __future__ import annotations

import functools
from typing import Any

from .toolchain import triton_release

# The first triton whose interpreter squeezes the array itself.
FIXED_IN = (3, 7)


def _index(self: Any) -> int:
    """tensor.__index__ as in triton >= 3.7."""
    return int(self.handle.data.squeeze())


def needs_fix(triton_version: str | None = None) -> bool:
    return triton_release(triton_version) < FIXED_IN


def install(kernel: Any) -> bool:
    """Patch the interpreter if ``kernel`` runs under it and this triton needs the fix; idempotent.
    Returns whether the patch is (now) in place."""
    from triton.runtime import interpreter

    if not isinstance(kernel, interpreter.InterpretedFunction) or not needs_fix():
        return False
    original = interpreter._patch_lang_tensor
    if getattr(original, "_tritongpt2_index_fix", False):
        return True

    # triton 3.2-3.5 call _patch_lang_tensor(tensor) and patch for good; 3.6 calls
    # _patch_lang_tensor(tensor, scope) and the scope undoes every set_attr after the launch.
    @functools.wraps(original)
    def patch_lang_tensor(tensor: Any, *scope: Any) -> None:
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", _index)
        else:
            tensor.__index__ = _index

    patch_lang_tensor._tritongpt2_index_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
