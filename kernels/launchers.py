"""The Triton backend's ops: one launcher per fused operation, named and called as in torch_ops.py."""

from __future__ import annotations

import torch

from .decode_attention import decode_attention, decode_attention_kernel
from .decode_mlp import decode_mlp_kernel, mlp
from .embedding import decode_embedding, embedding, embedding_kernel
from .flash_attention import flash_attention, flash_attention_kernel
from .layer_norm import layer_norm, layer_norm_kernel
from .linear import linear_kernel, linear_residual, ln_linear, ln_qkv_projection
from .operands import CacheAccess
from .split_linear import split_linear_kernel


def cache_access(
    slots: torch.Tensor, query_start: torch.Tensor, key_mask: torch.Tensor, semaphores: torch.Tensor | None = None
) -> CacheAccess:
    """The kernels read the slots, the start slots and the key mask themselves: nothing to precompute."""
    return CacheAccess(slots, query_start, key_mask, semaphores=semaphores)


OPS = (
    embedding, decode_embedding, layer_norm, ln_linear, linear_residual, mlp, ln_qkv_projection, cache_access,
    flash_attention, decode_attention,
)
KERNELS = (
    layer_norm_kernel,
    embedding_kernel,
    linear_kernel,
    flash_attention_kernel,
    split_linear_kernel,
    decode_attention_kernel,
    decode_mlp_kernel,
)
