"""Read Llama-family weights into one canonical layout, from a GGUF file or an HF checkpoint folder.

The canonical layout is Hugging Face's (rotate-half rotary embeddings): a GGUF file stores the query
and key projections permuted for llama.cpp's interleaved rotary kernel, so they are permuted back
here, the same way transformers' own GGUF loader does. Quantised GGUF tensors are dequantised once,
at load, by the `gguf` package; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmill.engines.torchlm.four_bit import FourBitBlocks, read_gguf_blocks


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    trained_context: int
    head_dim: int

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True, slots=True)
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: torch.Tensor  # [q rows; k rows; v rows] x hidden: one matmul instead of three
    out: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # [gate rows; up rows] x hidden
    down: torch.Tensor
    four_bit: dict[str, FourBitBlocks]  # "qkv", "out", "gate_up", "down" where the file stores them in 4 bits


@dataclass(frozen=True, slots=True)
class Checkpoint:
    config: ModelConfig
    embedding: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # the embedding itself when the model ties them


def load_checkpoint(path: Path, dtype: torch.dtype, device: torch.device, four_bit: bool = True) -> Checkpoint:
    """Weights from `path`: a .gguf file, or a folder with config.json and *.safetensors.
    `four_bit`: also keep a GGUF's 4-bit blocks (four_bit.py); off where nothing would use them."""
    blocks: dict[str, FourBitBlocks] = {}
    if path.is_dir():
        config, tensors = _read_hf_folder(path)
    else:
        config, tensors, blocks = _read_gguf(path, four_bit, dtype)
    return _assemble(config, tensors, blocks, dtype, device)


def _assemble(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    blocks: dict[str, FourBitBlocks],
    dtype: torch.dtype,
    device: torch.device,
) -> Checkpoint:
    def take(name: str) -> torch.Tensor:
        # pop: each fp32 source tensor is freed as soon as its converted copy exists (peak memory)
        return tensors.pop(name).to(device=device, dtype=dtype).contiguous()

    def fused(*names: str) -> torch.Tensor:
        return torch.cat([tensors.pop(n).to(dtype) for n in names]).to(device).contiguous()

    def four_bit(p: str) -> dict[str, FourBitBlocks]:
        groups = {
            "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "out": ("self_attn.o_proj",),
            "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
            "down": ("mlp.down_proj",),
        }
        found = {}
        for key, names in groups.items():
            parts = [blocks.pop(f"{p}{n}.weight", None) for n in names]
            present = [part for part in parts if part is not None]
            if len(present) == len(parts):
                found[key] = FourBitBlocks.stacked(present)
        return found

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                attn_norm=take(p + "input_layernorm.weight"),
                qkv=fused(p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                out=take(p + "self_attn.o_proj.weight"),
                mlp_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=fused(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=take(p + "mlp.down_proj.weight"),
                four_bit=four_bit(p),
            )
        )
    embedding = take("model.embed_tokens.weight")
    lm_head = take("lm_head.weight") if "lm_head.weight" in tensors else embedding
    return Checkpoint(config, embedding, layers, take("model.norm.weight"), lm_head)


# -- Hugging Face folders


def _read_hf_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    raw = json.loads((path / "config.json").read_text())
    if raw.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported by the torch engine yet")
    heads = raw["num_attention_heads"]
    config = ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta", 10000.0),
        trained_context=raw.get("max_position_embeddings", 2048),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    if raw.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    return config, tensors


# -- GGUF files

_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _read_gguf(
    path: Path, four_bit: bool, dtype: torch.dtype
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, FourBitBlocks]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"the torch engine reads Llama-family GGUF files; {path.name} is {arch!r}")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(_field(reader, "llama.embedding_length"))
    config = ModelConfig(
        vocab_size=int(_field(reader, "llama.vocab_size", 0)) or _vocab_rows(reader),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        trained_context=int(_field(reader, "llama.context_length", 2048)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
    )
    tensors, blocks = {}, {}
    for name, tensor, small_step in _gguf_tensors(reader, dequantize, four_bit):
        rotary_heads = heads if name.endswith("q_proj.weight") else kv_heads if name.endswith("k_proj.weight") else 0
        if rotary_heads:
            order = _rotary_row_order(tensor.shape[0], rotary_heads)
            tensor = tensor[order]
            small_step = small_step.rows(order) if small_step is not None else None
        # in the serving dtype at once: the whole model in fp32 is what the peak memory of a load was
        tensors[name] = tensor.to(dtype)
        if small_step is not None:
            blocks[name] = small_step
    return config, tensors, blocks


def _gguf_tensors(reader, dequantize, four_bit: bool) -> Iterator[tuple[str, torch.Tensor, FourBitBlocks | None]]:
    for info in reader.tensors:
        parts = info.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
        elif parts[0] in _GGUF_TOP:
            name = f"{_GGUF_TOP[parts[0]]}.{parts[1]}"
        else:
            continue  # e.g. precomputed rope frequencies: recomputed here
        values = dequantize(info.data, info.tensor_type)
        if values.dtype != np.float32 or not values.flags.writeable or not values.flags.c_contiguous:
            values = np.array(values, dtype=np.float32)  # float tensors come back as read-only file views
        yield name, torch.from_numpy(values), read_gguf_blocks(info.data, info.tensor_type.name) if four_bit else None


def _rotary_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's conversion-time permutation of query/key rows (interleaved ->
    rotate-half): `weight[order]` is the Hugging Face layout."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(rows)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"the GGUF file lacks {key}")
        return default
    return field.contents()


def _vocab_rows(reader) -> int:
    return next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
