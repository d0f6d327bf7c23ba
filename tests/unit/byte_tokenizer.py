"""A one-token-per-byte llguidance tokenizer for offline grammar tests (no model needed)."""

from __future__ import annotations

from typing import ClassVar

import llguidance


class ByteTokenizer:
    """One token per byte plus an end-of-sequence token: enough for llguidance to match text."""

    eos_token_id: ClassVar[int] = 256
    bos_token_id: ClassVar[int | None] = None
    tokens: ClassVar[list[bytes]] = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids: ClassVar[list[int]] = [256]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


BYTE_TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteTokenizer()))
