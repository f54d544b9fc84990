"""Weight-only quantized matrices, the operand every backend's matmuls and the embedding take in place
of a float weight. No triton here: the torch backend and the engine import this without the kernels.

A `QuantizedWeight` is a product's weight W [K, N] (input features by outputs, as Conv1D stores it;
the LM head's is wte.T), quantized in groups that run along K. Every tensor is stored N-major, as
nn.Linear and bitsandbytes store weights ([N, ...] contiguous), and is exposed in the [K, ...]
orientation the kernels index (a transposed view):

    int8  symmetric, one scale per output channel: W[k, n] = q[k, n] * scale[0, n],
          q int8 in [-127, 127]; group_size = K.
    int4  asymmetric per group of group_size (32, 64 or 128) rows of K:
          W[k, n] = (q[k, n] - zero[g, n]) * scale[g, n], g = k // group_size, q and zero in [0, 15].
    nf4   bitsandbytes' 4-bit NormalFloat, blocks of 64 along K: W[k, n] = NF4_CODE[q[k, n]] * absmax[g, n].
          With double quantization the float32 absmax is itself quantized, as bitsandbytes does:
          absmax[g, n] = DYNAMIC_CODE[scale[g, n]] * nested_absmax[i // 256] + nested_offset, where
          i = n * G + g is the block's index in bitsandbytes' (N-major) order and scale holds uint8 codes.

4-bit values are packed two a byte along K: byte [k // 2, n] holds row k = 2j in its high nibble and
2j + 1 in its low one, so the bytes of an nf4 weight are bitsandbytes' bytes for the same weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("int8", "int4", "nf4")
INT4_GROUP_SIZES = (32, 64, 128)
NF4_BLOCK = 64
NESTED_BLOCK = 256  # blocks of absmax values that share one float32 scale under double quantization

# bitsandbytes' NormalFloat4 code values (QLoRA, appendix E), the same float32 numbers it stores.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), float32 [256], sorted:
    for exponent e = 0..6, the midpoints of 2**e + 1 evenly spaced points in [0.1, 1] scaled by
    10**(e - 6), with both signs; then 0 and 1, padded with zeros to 256 values."""
    values: list[float] = []
    for exponent in range(7):
        edges = torch.linspace(0.1, 1.0, 2**exponent + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        # Scaled in float32, as bitsandbytes scales them, so every code value has its bits.
        values += (10.0 ** (exponent - 6) * midpoints).tolist()
        values += (-(10.0 ** (exponent - 6)) * midpoints).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    format: str  # one of FORMATS
    data: torch.Tensor  # [K, N] int8, or [K // 2, N] uint8 for the 4-bit formats
    scale: torch.Tensor  # [K // group_size, N]: float32, or uint8 codes (nf4 with double quantization)
    group_size: int
    zero: torch.Tensor | None = None  # int4: [K // group_size, N] uint8
    nested_absmax: torch.Tensor | None = None  # nf4 double quantization: [ceil(G * N / 256)] float32
    nested_offset: torch.Tensor | None = None  # [1] float32
    code: torch.Tensor | None = None  # nf4 double quantization: DYNAMIC_CODE, float32 [256]

    @property
    def shape(self) -> tuple[int, int]:
        """W's logical shape [K, N]."""
        rows, columns = self.data.shape
        return (rows * 2 if self.bits == 4 else rows, columns)

    @property
    def bits(self) -> int:
        return 8 if self.format == "int8" else 4

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the format by field name, in the stored N-major layout (contiguous)."""
        named = {"data": self.data, "scale": self.scale, "zero": self.zero, "nested_absmax": self.nested_absmax,
                 "nested_offset": self.nested_offset, "code": self.code}
        return {name: (t.T if t.dim() == 2 else t) for name, t in named.items() if t is not None}

    @property
    def nbytes(self) -> int:
        """The memory the format takes: packed values and every scale."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantizedWeight:
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.T.to(device).T if t.dim() == 2 else t.to(device)

        return QuantizedWeight(self.format, moved(self.data), moved(self.scale), self.group_size, moved(self.zero),
                               moved(self.nested_absmax), moved(self.nested_offset), moved(self.code))


def is_quantized(weight: object) -> bool:
    return isinstance(weight, QuantizedWeight)


def bytes_per_weight(format: str, group_size: int, double_quant: bool = False) -> float:
    """The bytes a format stores per weight, scales included (the ideal a decode step reads)."""
    if format == "int8":
        return 1.0 + 4.0 / group_size  # group_size = K: one float32 scale per output channel
    if format == "int4":
        return 0.5 + 5.0 / group_size  # float32 scale and uint8 zero point per group
    if double_quant:
        return 0.5 + 1.0 / group_size + 4.0 / (group_size * NESTED_BLOCK)
    return 0.5 + 4.0 / group_size


def stored_bytes(format: str, k: int, n: int, group_size: int | None, double_quant: bool = False) -> int:
    """The bytes QuantizedWeight.nbytes gives for a [k, n] weight, without building it."""
    group = k if format == "int8" else group_size
    groups = k // group * n
    if format == "int8":
        return k * n + 4 * n
    if format == "int4":
        return k * n // 2 + 5 * groups
    if double_quant:
        return k * n // 2 + groups + 4 * -(-groups // NESTED_BLOCK) + 4 + 4 * 256
    return k * n // 2 + 4 * groups
