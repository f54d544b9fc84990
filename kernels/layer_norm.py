"""LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * weight + bias."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .tiling import row_block, row_warps
from .validation import FLOAT_DTYPES, check_finite, check_same_device, check_same_dtype, check_shape, check_tensor


@triton.jit
def layer_norm_kernel(x_ptr, stride_x, w_ptr, b_ptr, y_ptr, stride_y, width, eps, BLOCK: tl.constexpr):
    # One program per row; the whole row sits in registers, so mean and variance are exact two-pass.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / width
    centered = tl.where(inside, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of x [..., C] with weight, bias [C]; returns [..., C] in x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor of rows, got shape {tuple(x.shape)}")
    width = x.shape[-1]
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=1)
    check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    check_shape("weight", weight, (width,))
    check_shape("bias", bias, (width,))
    check_same_dtype(x=x, weight=weight, bias=bias)
    check_same_device(x=x, weight=weight, bias=bias)
    check_finite("eps", eps)
    rows = x.reshape(-1, width)
    y = torch.empty_like(rows)
    block = row_block(width)
    launch(
        layer_norm_kernel,
        (rows.shape[0],),
        x_ptr=rows, stride_x=rows.stride(0), w_ptr=weight, b_ptr=bias, y_ptr=y, stride_y=y.stride(0), width=width, eps=eps,
        BLOCK=block, num_warps=row_warps(block), num_stages=1,
    )
    return y.view(x.shape)
