"""Argument checks shared by the launchers: each raises ValueError naming the offending value."""

from __future__ import annotations

import math

import torch

from .operands import MOMENT_FIELDS, CacheAccess, Residual
from .quantized_weight import FORMATS, INT4_GROUP_SIZES, NESTED_BLOCK, NF4_BLOCK, QuantizedWeight

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    dtypes: tuple[torch.dtype, ...],
    ndim: int | None = None,
    contiguous: bool = True,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {', '.join(map(str, dtypes))}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.device


def check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_positive(name: str, value: float) -> None:
    check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def check_residual(name: str, x: Residual, *, needs_moments: bool = False) -> torch.Tensor | None:
    """x is a Residual whose moments, when present (required with needs_moments), are
    [..., blocks, 3] float32 over the same leading dimensions as its values. Returns the moments."""
    if not isinstance(x, Residual):
        raise ValueError(f"{name} must be a Residual (values and row moments), got {type(x).__name__}")
    check_tensor(f"{name}.values", x.values, dtypes=FLOAT_DTYPES)
    if x.moments is None:
        if needs_moments:
            raise ValueError(
                f"{name} has no row moments; the LayerNorm kernels take the Residual that embedding or "
                "linear_residual returned"
            )
        return None
    check_tensor(f"{name}.moments", x.moments, dtypes=(torch.float32,))
    lead = tuple(x.values.shape[:-1])
    if x.moments.dim() != len(lead) + 2 or tuple(x.moments.shape[:-2]) != lead or x.moments.shape[-1] != MOMENT_FIELDS:
        raise ValueError(f"{name}.moments has shape {tuple(x.moments.shape)}; expected {lead + ('blocks', MOMENT_FIELDS)}")
    return x.moments


def check_attention_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    access: CacheAccess,
    scale: float,
    *,
    q_ndim: int,
) -> tuple[int, int, int, int]:
    """Checks shared by both attention launchers: q [B, (T,) C], caches [B_cache, H, S, D] with
    C = H * D, the access's query_start [B] and key_mask [B_cache, S] int32. Returns (B, H, S, D)."""
    if not isinstance(access, CacheAccess):
        raise ValueError(f"access must be a CacheAccess, got {type(access).__name__}")
    query_start, key_mask = access.query_start, access.key_mask
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=q_ndim)
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4)
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES, ndim=4)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    cache_batch, n_head, slots, head_dim = k_cache.shape
    batch, width = q.shape[0], q.shape[-1]
    if n_head * head_dim != width:
        raise ValueError(f"q has width {width}, but the cache holds {n_head} heads of {head_dim}")
    if batch > cache_batch:
        raise ValueError(f"batch {batch} is larger than the cache's {cache_batch} rows")
    if q.numel() == 0:
        raise ValueError(f"q is empty (shape {tuple(q.shape)})")
    check_tensor("query_start", query_start, dtypes=INDEX_DTYPES, ndim=1)
    check_shape("query_start", query_start, (batch,))
    check_tensor("key_mask", key_mask, dtypes=(torch.int32,), ndim=2)
    check_shape("key_mask", key_mask, (cache_batch, slots))
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, query_start=query_start, key_mask=key_mask)
    check_finite("scale", scale)
    queries = 1 if q_ndim == 2 else q.shape[1]
    if access.queries != queries:
        raise ValueError(f"access is for {access.queries} queries per row, q has {queries}")
    return batch, n_head, slots, head_dim


def check_quantized_weight(name: str, w: QuantizedWeight) -> None:
    """A QuantizedWeight whose tensors have the shapes, dtypes and device its format stores
    (quantized_weight.py); any strides, as the kernels take them."""
    if w.format not in FORMATS:
        raise ValueError(f"{name} has format {w.format!r}; expected one of {', '.join(FORMATS)}")
    data_dtype = torch.int8 if w.format == "int8" else torch.uint8
    check_tensor(f"{name}.data", w.data, dtypes=(data_dtype,), ndim=2, contiguous=False)
    k, n = w.shape
    allowed = {"int8": (k,), "int4": INT4_GROUP_SIZES, "nf4": (NF4_BLOCK,)}[w.format]
    if w.group_size not in allowed or k % w.group_size:
        raise ValueError(f"{name} is {w.format} of shape {(k, n)} with group_size={w.group_size}; expected one of {allowed}")
    groups = k // w.group_size
    scale_dtype = torch.uint8 if w.double_quant else torch.float32
    check_tensor(f"{name}.scale", w.scale, dtypes=(scale_dtype,), ndim=2, contiguous=False)
    check_shape(f"{name}.scale", w.scale, (groups, n))
    expected = {"zero": w.format == "int4", "nested_absmax": w.double_quant, "nested_offset": w.double_quant,
                "code": w.double_quant}
    if w.double_quant and w.format != "nf4":
        raise ValueError(f"{name} is {w.format} with double quantization, which only nf4 has")
    for field, needed in expected.items():
        if (getattr(w, field) is None) == needed:
            raise ValueError(f"{name} is {w.format}{' with double quantization' if w.double_quant else ''}: "
                             f"its {field} must be {'given' if needed else 'None'}")
    if w.zero is not None:
        check_tensor(f"{name}.zero", w.zero, dtypes=(torch.uint8,), ndim=2, contiguous=False)
        check_shape(f"{name}.zero", w.zero, (groups, n))
        if w.zero.stride() != w.scale.stride():
            raise ValueError(f"{name}.zero has strides {w.zero.stride()}; the kernels index it as scale, {w.scale.stride()}")
    if w.double_quant:
        for field, size in (("nested_absmax", -(-groups * n // NESTED_BLOCK)), ("nested_offset", 1), ("code", 256)):
            check_tensor(f"{name}.{field}", getattr(w, field), dtypes=(torch.float32,), ndim=1)
            check_shape(f"{name}.{field}", getattr(w, field), (size,))
    check_same_device(**{f"{name}.{field}": t for field, t in w.tensors().items()})
