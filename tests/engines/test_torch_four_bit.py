"""The torch engine's small-step path on a GGUF file's own 4-bit blocks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf.quants import dequantize, quantize

from tokenmill.engines.model_files import default_model_path
from tokenmill.engines.torchlm.four_bit import FourBitMatmul, read_gguf_blocks
from tokenmill.engines.torchlm.linear import projection

FOUR_BIT_TYPES = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1]


def values(blocks) -> torch.Tensor:
    out, inputs = blocks.codes.shape
    grouped = blocks.codes.float().view(out, inputs // 32, 32)
    return ((grouped - 8) * blocks.scale[..., None] + blocks.zero[..., None]).view(out, inputs)


@pytest.mark.parametrize("kind", FOUR_BIT_TYPES, ids=lambda k: k.name)
def test_blocks_hold_exactly_the_values_gguf_dequantises(kind):
    raw = quantize(np.random.default_rng(0).standard_normal((96, 128)).astype(np.float32), kind)
    blocks = read_gguf_blocks(raw, kind.name)
    assert blocks.codes.dtype == torch.uint8 and int(blocks.codes.max()) <= 15
    assert torch.equal(values(blocks), torch.from_numpy(dequantize(raw, kind)))


def test_other_tensor_types_have_no_blocks():
    raw = quantize(np.ones((4, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    assert read_gguf_blocks(raw, "Q8_0") is None


@pytest.mark.parametrize("kind", FOUR_BIT_TYPES, ids=lambda k: k.name)
def test_kernel_multiplies_by_the_file_values(kind):
    raw = quantize(np.random.default_rng(1).standard_normal((96, 128)).astype(np.float32), kind)
    dense = torch.from_numpy(dequantize(raw, kind))
    x = torch.randn(3, 128)
    got = FourBitMatmul(read_gguf_blocks(raw, kind.name), torch.float32)(x)
    assert torch.allclose(got, x @ dense.t(), rtol=1e-5, atol=1e-5)


def test_projection_uses_the_blocks_for_few_rows_only():
    kind = gguf.GGMLQuantizationType.Q4_1
    raw = quantize(np.random.default_rng(2).standard_normal((64, 96)).astype(np.float32), kind)
    blocks = read_gguf_blocks(raw, kind.name)
    # a dense weight that differs from the blocks on purpose shows which one answered
    dense = torch.from_numpy(dequantize(raw, kind)) + 1e-3
    project = projection(dense, prepack=False, four_bit=blocks, four_bit_rows=2)
    for rows in (1, 2, 3, 8):
        x = torch.randn(rows, 96)
        used = values(blocks) if rows <= 2 else dense
        assert torch.allclose(project(x), x @ used.t(), rtol=1e-5, atol=1e-5), rows
    off = projection(dense, prepack=False, four_bit=blocks, four_bit_rows=0)
    x = torch.randn(1, 96)
    assert torch.allclose(off(x), x @ dense.t(), rtol=1e-5, atol=1e-5)


def test_default_model_keeps_its_blocks_for_every_projection():
    from tokenmill.engines.torchlm.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(default_model_path(), torch.float32, torch.device("cpu"))
    for layer in checkpoint.layers:
        assert set(layer.four_bit) == {"qkv", "out", "gate_up", "down"}
        for name, blocks in layer.four_bit.items():
            # same rows in the same (un-permuted) order as the dense weight
            assert torch.allclose(values(blocks), getattr(layer, name), atol=1e-6), name
