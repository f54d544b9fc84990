"""Token + position embedding: out[m] = wte[ids[m]] + wpe[pos[m]] (+ wte[token_type_ids[m]]).

With inputs_embeds given, its row m takes the place of wte[ids[m]] (ids are then not read). The
output is the residual stream entering the first layer, so its row moments (one block: the whole row)
are stored with it for the first LayerNorm.

A decode step (one token per row) also takes the step's cache bookkeeping here, which would otherwise
be a handful of tiny launches: row b's token goes to slot lengths[b] (stored in `slots`, which the
layers read), key_mask[b, slot] = mask[b], the position is derived from the cache unless given, and
lengths[b] and next_position[b] advance. One program per row owns that row's state.

wte may be the tied LM head's QuantizedWeight [C, vocab]: row `token` of wte is its column `token`,
whose bytes are contiguous in storage. Only the gathered rows are read and dequantized, each rounded
to wpe's dtype (the output's) before the sum, as reference.embedding does."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .linear import device_operand, dtype_operand, weight_arguments
from .matmul_parts import dequantized, group_scale
from .moments import store_block_moments
from .operands import MOMENT_FIELDS, Residual
from .quantized_weight import QuantizedWeight, is_quantized
from .tiling import row_block, row_warps
from .validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_quantized_weight,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)


@triton.jit
def _table_row(
    wte_ptr, token, cols, inside, width, stride_wk, stride_wn, scale_ptr, stride_sk, stride_sn, zero_ptr, nested_ptr,
    offset_ptr, code_ptr, groups, OUT_DTYPE: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row `token` of wte in float32, as the output's dtype holds it: a float table's row [vocab, C]
    as it is, a quantized one's column of W [C, vocab] dequantized (GROUP: a 4-bit format's group)."""
    if WEIGHT_FORMAT == "float":
        row = tl.load(wte_ptr + token * width + cols, mask=inside, other=0.0).to(tl.float32)
    elif WEIGHT_FORMAT == "int8":
        q = tl.load(wte_ptr + cols.to(tl.int64) * stride_wk + token * stride_wn, mask=inside, other=0)
        row = (q.to(tl.float32) * tl.load(scale_ptr + token * stride_sn)).to(OUT_DTYPE).to(tl.float32)
    else:
        pairs = tl.arange(0, BLOCK // 2)
        packed = tl.load(wte_ptr + pairs.to(tl.int64) * stride_wk + token * stride_wn, mask=2 * pairs < width,
                         other=0).to(tl.int32)
        # Per group (rows of the [groups, GROUP // 2] view of the pairs): its scale, read once.
        group = tl.arange(0, BLOCK // GROUP)
        group_in = group * GROUP < width
        scale = group_scale(group, token, group_in, scale_ptr, stride_sk, stride_sn, nested_ptr, offset_ptr, code_ptr,
                            groups, WEIGHT_FORMAT)[:, None]
        zero = scale
        if WEIGHT_FORMAT == "int4":
            zero = tl.load(zero_ptr + group * stride_sk + token * stride_sn, mask=group_in, other=0).to(tl.float32)[:, None]
        even = dequantized(tl.reshape(packed >> 4, (BLOCK // GROUP, GROUP // 2)), scale, zero, WEIGHT_FORMAT)
        odd = dequantized(tl.reshape(packed & 15, (BLOCK // GROUP, GROUP // 2)), scale, zero, WEIGHT_FORMAT)
        # Interleaved back: row 2j from byte j's high nibble, 2j + 1 from its low one.
        row = tl.reshape(tl.join(tl.reshape(even, (BLOCK // 2,)), tl.reshape(odd, (BLOCK // 2,))), (BLOCK,))
        row = tl.where(inside, row.to(OUT_DTYPE).to(tl.float32), 0.0)
    return row


@triton.jit
def embedding_kernel(
    wte_ptr, wpe_ptr, out_ptr, moments_ptr, width, pos_ptr=None, ids_ptr=None, embeds_ptr=None, types_ptr=None,
    mask_ptr=None, new_tokens_ptr=None, lengths_ptr=None, next_position_ptr=None, key_mask_ptr=None, slots_ptr=None,
    key_mask_stride=0, n_slots=0,
    stride_wk=0, stride_wn=0, scale_ptr=None, stride_sk=0, stride_sn=0, zero_ptr=None, nested_ptr=None, offset_ptr=None,
    code_ptr=None, groups=1,
    HAS_EMBEDS: tl.constexpr = False, HAS_TYPES: tl.constexpr = False, HAS_POSITIONS: tl.constexpr = True,
    TAKES_SLOT: tl.constexpr = False, SLOT_POSITIONS: tl.constexpr = False, BLOCK: tl.constexpr = 16,
    WEIGHT_FORMAT: tl.constexpr = "float", GROUP: tl.constexpr = 1,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    if TAKES_SLOT:
        slot = tl.load(lengths_ptr + row)
        real = tl.load(mask_ptr + row)
        next_position = tl.load(next_position_ptr + row)
    # Table offsets in int64: vocab * width overflows int32 for gpt2-xl sized tables and beyond.
    if HAS_POSITIONS:
        position = tl.load(pos_ptr + row).to(tl.int64)
    elif SLOT_POSITIONS:
        position = slot.to(tl.int64)
    else:
        position = tl.where(real != 0, next_position, 1).to(tl.int64)
    if HAS_EMBEDS:
        acc = tl.load(embeds_ptr + row.to(tl.int64) * width + cols, mask=inside, other=0.0).to(tl.float32)
    else:
        token = tl.load(ids_ptr + row).to(tl.int64)
        acc = _table_row(
            wte_ptr, token, cols, inside, width, stride_wk, stride_wn, scale_ptr, stride_sk, stride_sn, zero_ptr,
            nested_ptr, offset_ptr, code_ptr, groups, out_ptr.dtype.element_ty, WEIGHT_FORMAT, GROUP, BLOCK,
        )
    acc += tl.load(wpe_ptr + position * width + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_TYPES:
        token_type = tl.load(types_ptr + row).to(tl.int64)
        acc += _table_row(
            wte_ptr, token_type, cols, inside, width, stride_wk, stride_wn, scale_ptr, stride_sk, stride_sn, zero_ptr,
            nested_ptr, offset_ptr, code_ptr, groups, out_ptr.dtype.element_ty, WEIGHT_FORMAT, GROUP, BLOCK,
        )
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row.to(tl.int64) * width + cols, y, mask=inside)
    store_block_moments(moments_ptr, 0, 1, row + tl.zeros((1,), tl.int32), tl.full((1,), True, tl.int1),
                        y.to(tl.float32)[None, :], inside[None, :])
    if TAKES_SLOT:
        tl.store(slots_ptr + row, slot)
        tl.store(key_mask_ptr + row.to(tl.int64) * key_mask_stride + slot, real, mask=(slot >= 0) & (slot < n_slots))
        # Every thread of the program has read the row's length and position before any advances them.
        tl.debug_barrier()
        tl.store(lengths_ptr + row, slot + tl.load(new_tokens_ptr))
        tl.store(next_position_ptr + row, next_position + real)


def _check_embedding_inputs(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    wte: torch.Tensor | QuantizedWeight,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    shape: tuple[int, ...],
) -> None:
    """The token inputs of `shape` [...] against the tables; ValueError naming the offending value."""
    if is_quantized(wte):
        check_quantized_weight("wte", wte)
    else:
        check_tensor("wte", wte, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("wpe", wpe, dtypes=FLOAT_DTYPES, ndim=2)
    width = _width(wte)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if inputs_embeds is not None:
        check_tensor("inputs_embeds", inputs_embeds, dtypes=FLOAT_DTYPES)
        check_shape("inputs_embeds", inputs_embeds, (*shape, width))
    else:
        check_tensor("input_ids", input_ids, dtypes=INDEX_DTYPES)
        check_shape("input_ids", input_ids, shape)
    for name, ids in (("position_ids", position_ids), ("token_type_ids", token_type_ids)):
        if ids is not None:
            check_tensor(name, ids, dtypes=INDEX_DTYPES)
            check_shape(name, ids, shape)
    if wpe.shape[1] != width:
        raise ValueError(f"wpe has width {wpe.shape[1]} but wte has {width}")
    check_same_dtype(wte=dtype_operand(wte), wpe=wpe, inputs_embeds=inputs_embeds)
    check_same_device(
        input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, token_type_ids=token_type_ids,
        wte=device_operand(wte), wpe=wpe,
    )
    if 0 in shape:
        raise ValueError(f"the inputs are empty (shape {shape})")


def _width(wte: torch.Tensor | QuantizedWeight) -> int:
    """C: a float wte is [vocab, C], a quantized one the LM head's weight [C, vocab]."""
    return wte.shape[0] if is_quantized(wte) else wte.shape[1]


def _table_arguments(wte: torch.Tensor | QuantizedWeight) -> dict:
    if not is_quantized(wte):
        return dict(wte_ptr=wte)
    arguments = {("wte_ptr" if key == "w_ptr" else key): value for key, value in weight_arguments(wte).items()}
    return dict(arguments, GROUP=wte.group_size if wte.bits == 4 else 1)


def _launch_embedding(
    wte: torch.Tensor | QuantizedWeight, wpe: torch.Tensor, shape: tuple[int, ...], **arguments: torch.Tensor | int | bool | None
) -> Residual:
    width = _width(wte)
    out = torch.empty(*shape, width, dtype=wpe.dtype, device=wpe.device)
    moments = torch.empty(*shape, 1, MOMENT_FIELDS, dtype=torch.float32, device=wpe.device)
    block = row_block(width)
    launch(
        embedding_kernel, (out.numel() // width,), wpe_ptr=wpe, out_ptr=out, moments_ptr=moments, width=width,
        HAS_EMBEDS=arguments["embeds_ptr"] is not None, HAS_TYPES=arguments["types_ptr"] is not None,
        HAS_POSITIONS=arguments["pos_ptr"] is not None, BLOCK=block, num_warps=row_warps(block), num_stages=1,
        **_table_arguments(wte), **arguments,
    )
    return Residual(out, moments)


def embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    wte: torch.Tensor | QuantizedWeight,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> Residual:
    """Embeddings of ids [...] (or inputs_embeds [..., C]) at positions [...]: [..., C] in wpe's
    dtype, with their row moments. Ids and positions are not range-checked here (that would read
    them on the host); the engine checks them."""
    check_tensor("position_ids", position_ids, dtypes=INDEX_DTYPES)
    if position_ids.numel() == 0:
        raise ValueError(f"position_ids is empty (shape {tuple(position_ids.shape)})")
    shape = tuple(position_ids.shape)
    _check_embedding_inputs(input_ids, position_ids, wte, wpe, token_type_ids, inputs_embeds, shape)
    return _launch_embedding(
        wte, wpe, shape, pos_ptr=position_ids, ids_ptr=input_ids, embeds_ptr=inputs_embeds, types_ptr=token_type_ids
    )


def decode_embedding(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    wte: torch.Tensor | QuantizedWeight,
    wpe: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor,
    new_tokens: torch.Tensor,
    lengths: torch.Tensor,
    next_position: torch.Tensor,
    key_mask: torch.Tensor,
    slot_positions: bool = False,
) -> tuple[Residual, torch.Tensor]:
    """embedding() of one token per row, inputs [B, 1], with the step's cache bookkeeping (see
    reference.decode_embedding): returns the embeddings and slots [B, 1], each row's length before
    the step, where its token goes; lengths, next_position and key_mask are updated in place. The
    slots must lie inside the cache (the engine reserves them); nothing here is read on the host."""
    check_tensor("attention_mask", attention_mask, dtypes=(torch.int32,), ndim=2)
    batch = attention_mask.shape[0]
    if attention_mask.shape[1] != 1:
        raise ValueError(f"decode_embedding takes one token per row; attention_mask has shape {tuple(attention_mask.shape)}")
    check_tensor("new_tokens", new_tokens, dtypes=(torch.int64,), ndim=1)
    check_shape("new_tokens", new_tokens, (1,))
    check_tensor("lengths", lengths, dtypes=(torch.int64,), ndim=1)
    check_tensor("next_position", next_position, dtypes=(torch.int64,), ndim=1)
    check_tensor("key_mask", key_mask, dtypes=(torch.int32,), ndim=2)
    if not batch <= lengths.shape[0] == next_position.shape[0] == key_mask.shape[0]:
        raise ValueError(
            f"a batch of {batch} rows needs lengths, next_position and key_mask of as many rows or more, got "
            f"{lengths.shape[0]}, {next_position.shape[0]} and {key_mask.shape[0]}"
        )
    _check_embedding_inputs(input_ids, position_ids, wte, wpe, token_type_ids, inputs_embeds, (batch, 1))
    check_same_device(
        wte=device_operand(wte), attention_mask=attention_mask, new_tokens=new_tokens, lengths=lengths, next_position=next_position,
        key_mask=key_mask,
    )
    slots = torch.empty(batch, 1, dtype=torch.int64, device=wpe.device)
    x = _launch_embedding(
        wte, wpe, (batch, 1), pos_ptr=position_ids, ids_ptr=input_ids, embeds_ptr=inputs_embeds,
        types_ptr=token_type_ids, mask_ptr=attention_mask, new_tokens_ptr=new_tokens, lengths_ptr=lengths,
        next_position_ptr=next_position, key_mask_ptr=key_mask, slots_ptr=slots, key_mask_stride=key_mask.stride(0),
        n_slots=key_mask.shape[1], TAKES_SLOT=True, SLOT_POSITIONS=slot_positions,
    )
    return x, slots
