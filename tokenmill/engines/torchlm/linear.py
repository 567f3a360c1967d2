"""Weight-times-activation products, with the weight laid out once for the CPU's bf16 kernels,
and the checkpoint's own 4-bit blocks for steps with only a few rows (four_bit.py says why).

`F.linear` on a CPU re-lays the weight out in oneDNN's blocked format on every call; doing that
once at load (the same prepacking torch.compile's CPU freezing does) made the model's matmuls
20-40% faster here at every batch size from 1 to 64 (benchmarked on this 2-core Zen 5). The packed
kernel is a private torch op, so it is checked against `F.linear` once and skipped if absent or off.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tokenmill.engines.torchlm.four_bit import FourBitBlocks, FourBitMatmul, four_bit_matmul

log = logging.getLogger(__name__)
_PACKED_FOR_ROWS = 32  # the batch size oneDNN tunes the packed layout for; others still run well


class Projection:
    __slots__ = ("_few_rows", "_few_rows_kernel", "_packed", "weight")

    def __init__(
        self,
        weight: torch.Tensor | None,
        packed: torch.Tensor | None,
        few_rows: int,
        few_rows_kernel: FourBitMatmul | None,
    ):
        self.weight = None if packed is not None else weight  # never hold both dense copies
        self._packed = packed
        self._few_rows = few_rows if few_rows_kernel is not None else 0
        self._few_rows_kernel = few_rows_kernel

    @property
    def few_rows(self) -> int:
        """Steps with at most this many rows use the 4-bit kernel (0: never)."""
        return self._few_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._few_rows_kernel is not None and x.shape[0] <= self._few_rows:
            return self._few_rows_kernel(x)
        if self._packed is None:
            assert self.weight is not None  # the dense weight is kept exactly when nothing is packed
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")


def projection(
    weight: torch.Tensor, prepack: bool, four_bit: FourBitBlocks | None = None, four_bit_rows: int = 0
) -> Projection:
    """`four_bit_rows`: steps with at most this many rows use `four_bit` (when given and usable)."""
    kernel = four_bit_matmul(four_bit, weight) if four_bit is not None and four_bit_rows > 0 else None
    return Projection(weight, _prepacked(weight) if prepack else None, four_bit_rows, kernel)


def can_prepack(weight: torch.Tensor) -> bool:
    """True where the packed kernel exists for this weight and agrees with F.linear."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.randn(3, weight.shape[1], dtype=weight.dtype)
        packed = _prepacked(weight)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        return torch.allclose(got.float(), F.linear(probe, weight).float(), rtol=1e-2, atol=1e-2)
    except (RuntimeError, AttributeError) as error:
        log.info("prepacked bf16 linear unavailable (%s); using F.linear", error)
        return False


def _prepacked(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, _PACKED_FOR_ROWS)
