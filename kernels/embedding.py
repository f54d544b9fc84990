"""Token + position embedding: out[m] = wte[ids[m]] + wpe[pos[m]] (+ wte[token_type_ids[m]]).

With inputs_embeds given, its row m takes the place of wte[ids[m]] (ids are then not read). The
output is the residual stream entering the first layer, so its row moments (one block: the whole row)
are stored with it for the first LayerNorm."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .moments import store_block_moments
from .operands import MOMENT_FIELDS, Residual
from .tiling import row_block, row_warps
from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_same_dtype, check_shape, check_tensor


@triton.jit
def embedding_kernel(
    pos_ptr, wte_ptr, wpe_ptr, out_ptr, moments_ptr, width, ids_ptr=None, embeds_ptr=None, types_ptr=None,
    HAS_EMBEDS: tl.constexpr = False, HAS_TYPES: tl.constexpr = False, BLOCK: tl.constexpr = 16,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    # Table offsets in int64: vocab * width overflows int32 for gpt2-xl sized tables and beyond.
    position = tl.load(pos_ptr + row).to(tl.int64)
    if HAS_EMBEDS:
        acc = tl.load(embeds_ptr + row.to(tl.int64) * width + cols, mask=inside, other=0.0).to(tl.float32)
    else:
        token = tl.load(ids_ptr + row).to(tl.int64)
        acc = tl.load(wte_ptr + token * width + cols, mask=inside, other=0.0).to(tl.float32)
    acc += tl.load(wpe_ptr + position * width + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_TYPES:
        token_type = tl.load(types_ptr + row).to(tl.int64)
        acc += tl.load(wte_ptr + token_type * width + cols, mask=inside, other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row.to(tl.int64) * width + cols, y, mask=inside)
    store_block_moments(moments_ptr, 0, 1, row + tl.zeros((1,), tl.int32), tl.full((1,), True, tl.int1),
                        y.to(tl.float32)[None, :], inside[None, :])


def embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> Residual:
    """Embeddings of ids [...] (or inputs_embeds [..., C]) at positions [...]: [..., C] in wte's
    dtype, with their row moments. Ids and positions are not range-checked here (that would read
    them on the host); the engine checks them."""
    check_tensor("position_ids", position_ids, dtypes=INDEX_DTYPES)
    check_tensor("wte", wte, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("wpe", wpe, dtypes=FLOAT_DTYPES, ndim=2)
    width = wte.shape[1]
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if inputs_embeds is not None:
        check_tensor("inputs_embeds", inputs_embeds, dtypes=FLOAT_DTYPES)
        check_shape("inputs_embeds", inputs_embeds, (*position_ids.shape, width))
    else:
        check_tensor("input_ids", input_ids, dtypes=INDEX_DTYPES)
        check_shape("input_ids", input_ids, tuple(position_ids.shape))
    if token_type_ids is not None:
        check_tensor("token_type_ids", token_type_ids, dtypes=INDEX_DTYPES)
        check_shape("token_type_ids", token_type_ids, tuple(position_ids.shape))
    if wpe.shape[1] != width:
        raise ValueError(f"wpe has width {wpe.shape[1]} but wte has {width}")
    check_same_dtype(wte=wte, wpe=wpe, inputs_embeds=inputs_embeds)
    check_same_device(
        input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, token_type_ids=token_type_ids,
        wte=wte, wpe=wpe,
    )
    if position_ids.numel() == 0:
        raise ValueError(f"position_ids is empty (shape {tuple(position_ids.shape)})")
    out = torch.empty(*position_ids.shape, width, dtype=wte.dtype, device=wte.device)
    moments = torch.empty(*position_ids.shape, 1, MOMENT_FIELDS, dtype=torch.float32, device=wte.device)
    block = row_block(width)
    launch(
        embedding_kernel,
        (position_ids.numel(),),
        pos_ptr=position_ids, wte_ptr=wte, wpe_ptr=wpe, out_ptr=out, moments_ptr=moments, width=width,
        ids_ptr=input_ids, embeds_ptr=inputs_embeds, types_ptr=token_type_ids,
        HAS_EMBEDS=inputs_embeds is not None, HAS_TYPES=token_type_ids is not None, BLOCK=block,
        num_warps=row_warps(block), num_stages=1,
    )
    return Residual(out, moments)
