"""A float matmul weight held in oneDNN's own blocked layout, for the torch backend's products.

oneDNN's linear reorders a plain weight into its blocked layout inside every call; a weight reordered
once (`torch.ops.mkldnn._reorder_linear_weight`) skips that. Measured on a 2-core EPYC (Zen 4,
AVX-512, AVX512-BF16), each weight streamed from memory as a step streams it, against the plain
[out, in] rows before: bfloat16 1.3-1.9x faster at 1 and 16 rows (plain, its single row streamed
at 10-14 GB/s where float32's reached 18-27); float32 1.1-1.5x at 16 rows and on a par at one row.
A gpt2 decode step: bfloat16 one row 32-34 -> 19-26 ms, float32 16 rows 78-87 -> 62-69 ms; one
float32 row on a par. With oneDNN held to AVX2 a float32 row was 8% slower packed, so float32 is
packed only with AVX-512 (cpu_matmul.can_pack). The products' bits are the plain weight's (tested).

The engine packs the layers' matmul weights it owns (layout PACKED, kernels/backend.py) in place of
the [out, in] copies it made before: no more memory. The LM head is not packed: it is wte, which the
embedding gathers and the heads expose as a parameter, and a packed copy would go stale when that
parameter is changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# oneDNN's reorder of a linear weight: present wherever torch is built with oneDNN.
REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if torch.backends.mkldnn.is_available() else None


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """W [K, N] (input features by outputs, the orientation the ops index) packed by oneDNN."""

    packed: torch.Tensor  # oneDNN's opaque tensor of W's [N, K] rows
    shape: torch.Size  # W's [K, N]

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.packed.element_size()

    def dense(self) -> torch.Tensor:
        """W [K, N] as a plain tensor (a copy, the transpose of [N, K] rows): for saving and quantizing."""
        return self.packed.to_dense().T

    def __reduce__(self) -> tuple:
        # oneDNN's opaque tensor can be neither pickled nor deep-copied: a copy travels as the plain
        # weight and is laid out where it lands as the engine's loading lays it out there (packed
        # again if that machine packs its dtype).
        from .cpu_matmul import packed_if_packable  # cpu_matmul imports this module

        return (packed_if_packable, (self.dense(),))


def pack_weight(weight: torch.Tensor) -> PackedWeight:
    """W [K, N] (any strides) packed by oneDNN."""
    return PackedWeight(REORDER(weight.T.contiguous()), weight.shape)


def is_packed(weight: object) -> bool:
    return isinstance(weight, PackedWeight)


def dense(weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """A float weight as a plain tensor; a packed one unpacked."""
    return weight.dense() if is_packed(weight) else weight
