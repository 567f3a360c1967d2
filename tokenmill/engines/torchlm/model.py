"""A Llama-family decoder forward written for serving: packed tokens, paged KV, mixed steps.

One call runs every token of a step -- decode rows of many sequences and prefill chunks of some --
through the weights as one packed [tokens, hidden] matrix, so each weight matrix is read once per
step however many sequences share it (that is where batching wins on a CPU). Only attention
looks at sequences separately: all decode rows together, block by block over the KV blocks
they read, each prefill chunk on its own with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.engines.torchlm.checkpoint import Checkpoint
from tokenmill.engines.torchlm.kv_cache import PagedKVCache
from tokenmill.engines.torchlm.linear import Projection, can_prepack, projection


@dataclass(frozen=True, slots=True)
class BlockReads:
    """KV blocks read by decode rows: the i-th is read by row `rows[i]`, its cells masked by
    `bias[i]`. It is the cache's block `blocks[i]` (gathered), or with `blocks` None the cache's
    block i itself (read in place: a block no row reads is masked whole)."""

    rows: torch.Tensor  # [blocks]
    bias: torch.Tensor  # [blocks, 1, 1, cells per block] 0 where a cell holds one of the row's keys, else -inf
    blocks: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """The first `size` packed rows: one new token each, and the KV blocks they read."""

    size: int
    reads: list[BlockReads]


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Packed rows start..start+length-1: one sequence's tokens after `past` cached ones (a prompt
    chunk, or the one new token of a step with few decode rows)."""

    start: int
    length: int
    blocks: torch.Tensor  # the sequence's blocks covering its first past + length cells
    mask: torch.Tensor  # [length, past + length] causal


@dataclass(frozen=True, slots=True)
class StepInputs:
    token_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    blocks: torch.Tensor  # [tokens] the KV block each token's key and value go to
    offsets: torch.Tensor  # [tokens] and the cell within it
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]
    sample_rows: torch.Tensor  # packed rows whose next-token logits are wanted


@dataclass(frozen=True, slots=True)
class _Layer:
    attn_norm: torch.Tensor
    qkv: Projection
    out: Projection
    mlp_norm: torch.Tensor
    gate_up: Projection
    down: Projection


class LlamaModel:
    def __init__(self, checkpoint: Checkpoint, max_positions: int, four_bit_rows: int = 0):
        """Consumes `checkpoint.layers` (left empty)."""
        self.config = c = checkpoint.config
        prepack = can_prepack(checkpoint.lm_head)

        def project(w, name: str) -> Projection:
            return projection(getattr(w, name), prepack, w.four_bit.get(name), four_bit_rows)

        # Takes the checkpoint's layers one by one, so each dense copy is freed as soon as its
        # packed one exists: holding both for the whole model was most of a load's peak memory.
        self._layers = []
        while checkpoint.layers:
            w = checkpoint.layers.pop(0)
            self._layers.append(
                _Layer(
                    attn_norm=w.attn_norm,
                    qkv=project(w, "qkv"),
                    out=project(w, "out"),
                    mlp_norm=w.mlp_norm,
                    gate_up=project(w, "gate_up"),
                    down=project(w, "down"),
                )
            )
        # rows up to which a step's projections use the file's 4-bit blocks (0: dense weights only)
        self.four_bit_rows = min((layer.qkv.few_rows for layer in self._layers), default=0)
        self._embedding = checkpoint.embedding
        self._final_norm = checkpoint.final_norm
        self._lm_head = projection(checkpoint.lm_head, prepack)
        self._group = c.num_heads // c.num_kv_heads
        self._scale = c.head_dim**-0.5
        device, dtype = checkpoint.embedding.device, checkpoint.embedding.dtype
        inverse = 1.0 / (
            c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=device) / c.head_dim)
        )
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inverse)
        angles = torch.cat([angles, angles], dim=-1)
        self._cos, self._sin = angles.cos().to(dtype), angles.sin().to(dtype)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, cache: PagedKVCache) -> torch.Tensor:
        """Logits (fp32) for `inputs.sample_rows`, after writing every token's keys/values to `cache`."""
        c = self.config
        tokens = inputs.token_ids.shape[0]
        x = self._embedding[inputs.token_ids]
        cos, sin = self._cos[inputs.positions][:, None, :], self._sin[inputs.positions][:, None, :]
        q_size, heads = c.num_heads * c.head_dim, c.num_heads + c.num_kv_heads
        for index, layer in enumerate(self._layers):
            h = _rms_norm(x, layer.attn_norm, c.rms_norm_eps)
            qkv = layer.qkv(h)
            # queries and keys rotate together: one set of elementwise ops instead of two
            qk = _rotate(qkv[:, : q_size + c.kv_size].view(tokens, heads, c.head_dim), cos, sin)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
            v = qkv[:, q_size + c.kv_size :].view(tokens, c.num_kv_heads, c.head_dim)
            cache.write(index, inputs.blocks, inputs.offsets, k, v)
            attended = self._attend(q, inputs, cache, index)
            x = x + layer.out(attended.view(tokens, q_size))
            gate, up = layer.gate_up(_rms_norm(x, layer.mlp_norm, c.rms_norm_eps)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        last = _rms_norm(x[inputs.sample_rows], self._final_norm, c.rms_norm_eps)
        return self._lm_head(last).float()

    @torch.inference_mode()
    def hidden_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Every token's final (normed) hidden state, for one whole sequence with no KV cache: the
        embeddings pass (`torchlm.embedder`)."""
        c = self.config
        tokens = token_ids.shape[0]
        x = self._embedding[token_ids]
        positions = torch.arange(tokens, device=token_ids.device)
        cos, sin = self._cos[positions][:, None, :], self._sin[positions][:, None, :]
        q_size, heads = c.num_heads * c.head_dim, c.num_heads + c.num_kv_heads
        for layer in self._layers:
            qkv = layer.qkv(_rms_norm(x, layer.attn_norm, c.rms_norm_eps))
            qk = _rotate(qkv[:, : q_size + c.kv_size].view(tokens, heads, c.head_dim), cos, sin)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]
            v = qkv[:, q_size + c.kv_size :].view(tokens, c.num_kv_heads, c.head_dim)
            attended = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                enable_gqa=True,
            )
            x = x + layer.out(attended[0].transpose(0, 1).reshape(tokens, q_size))
            gate, up = layer.gate_up(_rms_norm(x, layer.mlp_norm, c.rms_norm_eps)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return _rms_norm(x, self._final_norm, c.rms_norm_eps)

    def _attend(self, q: torch.Tensor, inputs: StepInputs, cache: PagedKVCache, layer: int) -> torch.Tensor:
        c = self.config
        out = q.new_empty(q.shape)
        decode = inputs.decode
        if decode is not None:
            parts = [
                (*(cache.span(layer, len(r.rows)) if r.blocks is None else cache.gather(layer, r.blocks)), r)
                for r in decode.reads
            ]
            out[: decode.size] = self._attend_blocks(q[: decode.size], parts).view(decode.size, c.num_heads, c.head_dim)
        for chunk in inputs.prefills:
            seen = chunk.mask.shape[1]
            rows = q[chunk.start : chunk.start + chunk.length].transpose(0, 1)[None]
            k, v = cache.sequence(layer, chunk.blocks, seen)
            attended = F.scaled_dot_product_attention(rows, k[None], v[None], attn_mask=chunk.mask, enable_gqa=True)
            out[chunk.start : chunk.start + chunk.length] = attended[0].transpose(0, 1)
        return out

    def _attend_blocks(
        self, q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, BlockReads]]
    ) -> torch.Tensor:
        """Decode attention block by block: scores per (block, key head) in one batched matmul per
        part, then a softmax per row across all its blocks in fp32 (each row's peak, the
        exponentials, their sum, the blocks' value sums added up). Grouped-query attention without
        repeating keys: the query heads sharing a key head are that head's rows."""
        c = self.config
        n = q.shape[0]
        rows = q.view(n, c.num_kv_heads, self._group, c.head_dim)
        scores = [
            torch.add(
                reads.bias, torch.matmul(rows.index_select(0, reads.rows), keys.transpose(-1, -2)), alpha=self._scale
            ).float()
            for keys, _, reads in parts
        ]
        peak = scores[0].new_full((n, c.num_kv_heads, self._group), -torch.inf)
        for part, (_, _, reads) in zip(scores, parts, strict=True):
            block_peaks = part.amax(dim=-1)
            peak.scatter_reduce_(0, reads.rows.view(-1, 1, 1).expand(block_peaks.shape), block_peaks, "amax")
        total = peak.new_zeros(peak.shape)
        attended = peak.new_zeros((*peak.shape, c.head_dim))
        for part, (_, values, reads) in zip(scores, parts, strict=True):
            weights = part.sub_(peak.index_select(0, reads.rows).unsqueeze(-1)).exp_()
            total.index_add_(0, reads.rows, weights.sum(dim=-1))
            attended.index_add_(0, reads.rows, torch.matmul(weights.to(q.dtype), values).float())
        return (attended / total.unsqueeze(-1)).to(q.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In fp32 and cast back before the weight, as the reference implementation does (one fused
    # kernel for the normalisation instead of five ops).
    return weight * torch.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
