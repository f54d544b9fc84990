"""tritongpt2: GPT-2 inference on hand-written Triton kernels."""

from tritongpt2.kernels.backend import BACKENDS, resolve_backend

__all__ = ["BACKENDS", "resolve_backend"]
__version__ = "0.1.0"
