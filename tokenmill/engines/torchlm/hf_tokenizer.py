"""The Tokenizer protocol over a Hugging Face checkpoint folder (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
from collections.abc import Sequence as Seq
from functools import cache
from pathlib import Path

from tokenmill.engines.chat_template import ChatTemplate
from tokenmill.generation import ChatMessage, ToolFunction
from tokenmill.reasoning import ReasoningFormat
from tokenmill.tools import ToolCallFormat


class HFTokenizer:
    def __init__(self, folder: Path, context_window: int):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self._context_window = context_window
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self._template = ChatTemplate(config.get("chat_template"), bos_token=bos or "", eos_token=eos or "")
        special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
        ends = {eos, "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"} & (special | {eos})
        self.eog_ids = sorted(i for i in (self._tokenizer.token_to_id(t) for t in ends if t) if i is not None)
        self._eog = frozenset(self.eog_ids)
        self._byte_level = "ByteLevel" in json.dumps(json.loads(self._tokenizer.to_str()).get("decoder"))

    @property
    def context_window(self) -> int:
        return self._context_window

    def render_chat(self, messages: Seq[ChatMessage], tools: Seq[ToolFunction] = ()) -> str:
        return self._template.render(messages, tools)

    @property
    def tool_call_format(self) -> ToolCallFormat:
        return self._template.tool_format

    @property
    def reasoning_format(self) -> ReasoningFormat | None:
        return self._template.reasoning_format

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special).ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes(token_id)

    def is_end_of_generation(self, token_id: int) -> bool:
        return token_id in self._eog

    @cache  # noqa: B019 -- one tokenizer per engine, lives as long as it
    def _bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.id_to_token(token_id) or ""
        if self._byte_level:
            return bytes(_BYTE_DECODER.get(ch, 0) for ch in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])  # sentencepiece byte fallback
        return piece.replace("\u2581", " ").encode("utf-8")


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible map from bytes to printable characters, inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


_BYTE_DECODER = _byte_decoder()
