"""The quantizer (engine/quantize.py) and the reference's dequantization against the formats' definitions,
and nf4 against bitsandbytes itself."""

from __future__ import annotations

import pytest
import torch

from tritongpt2.engine.quantize import VARIANTS, Quantization, quantize_matrix
from tritongpt2.kernels.quantized_weight import NF4_CODE, dynamic_code, stored_bytes
from tritongpt2.kernels.reference import dequantize, nf4_absmax

FORMATS = list(VARIANTS.values())


def _weight(k: int = 256, n: int = 72, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed)) * 0.2


@pytest.mark.parametrize("quantization", FORMATS, ids=str)
def test_dequantized_error_is_bounded_by_the_format_step(quantization: Quantization) -> None:
    w = _weight()
    q = quantize_matrix(w, quantization)
    assert q.shape == tuple(w.shape)
    error = (dequantize(q) - w).abs()
    k, n = w.shape
    group = k if quantization.format == "int8" else quantization.group_size
    blocks = w.T.reshape(n, k // group, group)
    if quantization.format == "int8":
        step = blocks.abs().amax(-1) / 127
    elif quantization.format == "int4":
        step = (blocks.amax(-1) - blocks.amin(-1)) / 15
    else:
        code = torch.tensor(NF4_CODE)
        step = blocks.abs().amax(-1) * (code[1:] - code[:-1]).max()
    bound = step.T.repeat_interleave(group, 0) / 2
    if quantization.double_quant:  # the absmax itself is rounded to the 8-bit map: at most that much more
        rounded = (nf4_absmax(q) - blocks.abs().amax(-1).T).abs()
        bound = bound * (1 + rounded.max() / blocks.abs().amax()) + rounded.repeat_interleave(group, 0)
    assert bool((error <= bound * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("quantization", FORMATS, ids=str)
def test_stored_bytes_match_the_tensors(quantization: Quantization) -> None:
    q = quantize_matrix(_weight(384, 40), quantization)
    assert q.nbytes == stored_bytes(quantization.format, 384, 40, quantization.group_size, quantization.double_quant)
    assert all(t.is_contiguous() for t in q.tensors().values())


@pytest.mark.parametrize("quantization", [Quantization("int8"), Quantization("nf4")], ids=str)
def test_requantizing_a_dequantized_weight_gives_the_same_codes(quantization: Quantization) -> None:
    q = quantize_matrix(_weight(), quantization)
    again = quantize_matrix(dequantize(q), quantization)
    assert torch.equal(again.data, q.data) and torch.equal(again.scale, q.scale)


def test_int4_represents_constant_and_zero_groups_exactly() -> None:
    w = torch.zeros(128, 6)
    w[:64, 1], w[64:, 2], w[:, 3] = 0.25, -3.0, 1e-3
    out = dequantize(quantize_matrix(w, Quantization("int4", 64)))
    assert torch.equal(out, w)
    for quantization in (Quantization("int8"), Quantization("nf4"), Quantization("nf4", double_quant=True)):
        assert torch.isfinite(dequantize(quantize_matrix(w, quantization))).all()


def test_4bit_packing_puts_even_rows_in_the_high_nibble() -> None:
    w = torch.zeros(64, 1)
    w[0, 0], w[1, 0] = 1.0, -1.0
    q = quantize_matrix(w, Quantization("nf4"))
    assert int(q.data[0, 0]) == (15 << 4) | 0  # code 15 is +1.0, code 0 is -1.0
    assert torch.equal(dequantize(q), w)


@pytest.mark.parametrize("args, message", [
    (("int3",), "int3"), (("int4", 48), "48"), (("nf4", 32), "32"), (("int8", 64), "int8"),
    (("int4", 64, True), "double_quant"), (("int4", True), "group_size"),
])
def test_bad_quantization_is_a_value_error_naming_it(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Quantization(*args)


def test_a_group_that_does_not_divide_k_is_refused() -> None:
    with pytest.raises(ValueError, match="group_size=128 does not divide K=192"):
        quantize_matrix(_weight(192, 8), Quantization("int4", 128))


bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is in the test extra")


def test_dynamic_code_is_bitsandbytes_map() -> None:
    assert torch.equal(dynamic_code(), bnb.create_dynamic_map(signed=True))
    assert torch.equal(torch.tensor(NF4_CODE), bnb.get_4bit_type("nf4", device="cpu"))


def test_nf4_bytes_and_absmax_are_bitsandbytes_own() -> None:
    w = _weight(768, 300)
    ours = quantize_matrix(w, Quantization("nf4"))
    # bitsandbytes quantizes nn.Linear's [out, in] weight; Conv1D's [in, out] is its transpose.
    packed, state = bnb.quantize_4bit(w.T.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed.flatten(), ours.tensors()["data"].flatten())
    assert torch.equal(state.absmax, ours.tensors()["scale"].flatten())
    assert torch.equal(bnb.dequantize_4bit(packed, state).T, dequantize(ours))


def test_nf4_double_quantization_agrees_with_bitsandbytes() -> None:
    w = _weight(768, 300)
    ours = quantize_matrix(w, Quantization("nf4", double_quant=True))
    packed, state = bnb.quantize_4bit(w.T.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.flatten(), ours.tensors()["data"].flatten())
    assert torch.allclose(state.offset, ours.nested_offset[0], rtol=1e-6)
    assert torch.equal(state.state2.absmax, ours.nested_absmax)
    codes = ours.tensors()["scale"].flatten()
    # bitsandbytes' CPU search rounds a value within ~1e-5 of a midpoint of the 8-bit map to either
    # side: a handful of blocks' codes are one step apart, never more.
    steps = (codes.long() - state.absmax.long()).abs()
    assert int(steps.max()) <= 1 and int((steps > 0).sum()) <= codes.numel() // 500
    theirs = bnb.dequantize_4bit(packed, state).T
    assert float((theirs - dequantize(ours)).norm() / theirs.norm()) < 1e-3
