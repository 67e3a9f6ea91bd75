"""Incremental detokenization (frontend side): the text each new token adds.

Fast tokenizers use `tokenizers.decoders.DecodeStream` (one Rust call per token; it holds a
token back while it ends in an incomplete UTF-8 sequence). Other tokenizers decode a sliding
window of tokens and emit what decoding the window adds beyond its already emitted part.
Both give, joined, the text of decoding all the tokens at once (`decode_all`), except for an
incomplete UTF-8 sequence at the very end, which `decode_all` shows as U+FFFD.
"""

from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None


def backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a transformers tokenizer, or None (slow tokenizer)."""
    raw = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
    return raw if raw is not None and hasattr(raw, "decode") and hasattr(raw, "encode") else None


def decode_all(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """The text of a whole sequence of tokens (what the incremental path joins up to)."""
    if not ids:
        return ""
    raw = backend(tokenizer)
    if raw is not None:
        return raw.decode(ids, skip_special_tokens=skip_special_tokens)
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    __slots__ = ("tokenizer", "raw", "stream", "skip", "ids", "prefix", "read")

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.raw = backend(tokenizer)
        self.skip = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens) \
            if self.raw is not None and DecodeStream is not None else None
        self.ids: list[int] = []  # the window path's tokens
        self.prefix = self.read = 0

    def step(self, token_id: int) -> str:
        """The text this token adds ('' while it ends in an incomplete character)."""
        if self.stream is not None:
            return self.stream.step(self.raw, token_id) or ""
        self.ids.append(token_id)
        before = decode_all(self.tokenizer, self.ids[self.prefix:self.read], self.skip)
        after = decode_all(self.tokenizer, self.ids[self.prefix:], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""
