"""Token + position embedding: out[m] = wte[ids[m]] + wpe[pos[m]] (+ wte[token_type_ids[m]]).

With inputs_embeds given, its row m takes the place of wte[ids[m]] (ids are then not read)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .tiling import row_block, row_warps
from .validation import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_same_dtype, check_shape, check_tensor


@triton.jit
def embedding_kernel(
    ids_ptr, embeds_ptr, pos_ptr, types_ptr, wte_ptr, wpe_ptr, out_ptr, width,
    HAS_EMBEDS: tl.constexpr, HAS_TYPES: tl.constexpr, BLOCK: tl.constexpr,
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
    tl.store(out_ptr + row.to(tl.int64) * width + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)


def embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embeddings of ids [...] (or inputs_embeds [..., C]) at positions [...]: [..., C] in wte's
    dtype. Ids and positions are not range-checked here (that would read them on the host); the
    engine checks them."""
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
    block = row_block(width)
    launch(
        embedding_kernel,
        (position_ids.numel(),),
        input_ids, inputs_embeds, position_ids, token_type_ids, wte, wpe, out, width,
        num_warps=row_warps(block), num_stages=1,
        HAS_EMBEDS=inputs_embeds is not None, HAS_TYPES=token_type_ids is not None, BLOCK=block,
    )
    return out
