"""A GGUF file's own 4-bit weights (Q4_0 / Q4_1), kept for steps with only a few rows.

A decode step over one or two sequences reads every weight once and does almost no arithmetic
with it, so its time is the weights' bytes over memory bandwidth. Dequantised to bf16 the default
model's matrices are 3.6x the size of its Q4_1 blocks; torch's CPU int4 kernel reads the blocks
directly and ran the model's projections 2.5x faster at 1 row (measured here: 4.1 vs 10.0 ms a
step) but slower from about 6 rows up, where bf16 matmuls amortise the bytes over many rows.

Both formats store blocks of 32 weights along the input dimension with their own scale:
Q4_0 is `d * (q - 8)` and Q4_1 is `d * q + m`, q in 0..15. torch's kernel computes
`(q - 8) * scale + zero` per block, so Q4_1 maps to scale = d, zero = m + 8d, and Q4_0 to zero = 0:
the same values the file holds (in fp32; bf16 activations need bf16 scales, which round them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


@dataclass(frozen=True, slots=True)
class FourBitBlocks:
    """One matrix as 4-bit codes with a scale and zero point per block of 32 inputs."""

    codes: torch.Tensor  # [out, in] uint8, 0..15
    scale: torch.Tensor  # [out, in // 32] float32
    zero: torch.Tensor  # [out, in // 32] float32

    def rows(self, index: torch.Tensor) -> FourBitBlocks:
        return FourBitBlocks(self.codes[index], self.scale[index], self.zero[index])

    @staticmethod
    def stacked(parts: list[FourBitBlocks]) -> FourBitBlocks:
        return FourBitBlocks(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero")))


def read_gguf_blocks(raw: np.ndarray, type_name: str) -> FourBitBlocks | None:
    """The blocks of a Q4_0 / Q4_1 GGUF tensor (`raw`: [rows, bytes per row] uint8); None for other types."""
    size = _BLOCK_BYTES.get(type_name)
    if size is None:
        return None
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., 4:]
        zero = m + 8 * d
    else:
        packed = blocks[..., 2:]
        zero = np.zeros_like(d)
    # byte j of a block holds element j in its low nibble and element j + 16 in its high nibble
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)
    return FourBitBlocks(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero))


class FourBitMatmul:
    """`x @ W.T` on the packed blocks (CPU only)."""

    __slots__ = ("_packed", "_scales_and_zeros")

    def __init__(self, blocks: FourBitBlocks, dtype: torch.dtype):
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.codes.to(torch.int32), 1)
        self._scales_and_zeros = torch.stack([blocks.scale.t(), blocks.zero.t()], dim=-1).to(dtype).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self._packed, BLOCK, self._scales_and_zeros)


def four_bit_matmul(blocks: FourBitBlocks, dense: torch.Tensor) -> FourBitMatmul | None:
    """The kernel for `blocks`, or None where it is missing or disagrees with the dense weight."""
    if dense.device.type != "cpu" or dense.dtype not in (torch.bfloat16, torch.float32):
        return None
    try:
        matmul = FourBitMatmul(blocks, dense.dtype)
        probe = torch.randn(2, dense.shape[1], dtype=dense.dtype)
        got, want = matmul(probe).float(), (probe @ dense.t()).float()
        agrees = bool((got - want).abs().max() <= 0.02 * want.abs().max())  # bf16 outputs hold ~3 digits
    except (RuntimeError, AttributeError) as error:
        log.info("int4 CPU kernel unavailable (%s); small steps use the dense weights", error)
        return None
    if not agrees:
        log.warning("int4 CPU kernel disagrees with the dense weights; small steps use the dense weights")
        return None
    return matmul
