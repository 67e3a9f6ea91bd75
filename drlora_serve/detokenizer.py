"""Incremental detokenization (frontend side): the text each new token adds.

Fast tokenizers use `tokenizers.decoders.DecodeStream` (one Rust call per token; it holds a
token back while it ends in an incomplete UTF-8 sequence). Other tokenizers decode a sliding
window of tokens and emit what decoding the window adds beyond its already emitted part.
Both give, joined, the text of decoding all the tokens at once (`decode_all`), except for an
incomplete UTF-8 sequence at the very end, which `decode_all` shows as U+FFFD (`flush` gives
what the held tokens add).

`skip_special_tokens=False` keeps special tokens' text. `spaces_between_special_tokens=False`
(vLLM's meaning, which only matters when special tokens are kept): an added token that follows
another added token adds its own text, without the space a decoder may put between tokens
(WordPiece does; byte-level BPE never does). Text with that option is always made
incrementally, so streamed and final text agree.
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


def added_tokens(tokenizer) -> dict[int, str]:
    """Added (special and user-added) tokens: id -> text."""
    raw = backend(tokenizer)
    if raw is not None and hasattr(raw, "get_added_tokens_decoder"):
        return {i: t.content for i, t in raw.get_added_tokens_decoder().items()}
    return {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}


class IncrementalDetokenizer:
    __slots__ = ("tokenizer", "raw", "stream", "skip", "ids", "prefix", "read", "added", "last_added", "n", "n_shown")

    def __init__(self, tokenizer, skip_special_tokens: bool = True, added: dict[int, str] | None = None):
        """added: the tokenizer's added tokens, to join them without spaces
        (spaces_between_special_tokens=False), else None."""
        self.tokenizer = tokenizer
        self.raw = backend(tokenizer)
        self.skip = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens) \
            if self.raw is not None and DecodeStream is not None else None
        self.ids: list[int] = []  # the window path's tokens
        self.prefix = self.read = 0
        self.added = added if added and not skip_special_tokens else None
        self.last_added = False
        self.n = self.n_shown = 0  # tokens stepped; tokens whose text is all out

    def step(self, token_id: int) -> str:
        """The text this token adds ('' while it ends in an incomplete character)."""
        text = self._step(token_id)
        self.n += 1
        if self.added is not None:
            own = self.added.get(token_id)
            if own is not None and self.last_added:
                text = own
            self.last_added = own is not None
        if text:
            self.n_shown = self.n
        return text

    def _step(self, token_id: int) -> str:
        if self.stream is not None:
            return self.stream.step(self.raw, token_id) or ""
        self.ids.append(token_id)
        before = decode_all(self.tokenizer, self.ids[self.prefix:self.read], self.skip)
        after = decode_all(self.tokenizer, self.ids[self.prefix:], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self, ids: list[int]) -> str:
        """What the tokens held back (an incomplete character at the end) add as text, given
        all the tokens stepped so far (`ids`)."""
        if self.n_shown >= self.n:
            return ""
        full = decode_all(self.tokenizer, ids[:self.n], self.skip)
        return full[len(decode_all(self.tokenizer, ids[:self.n_shown], self.skip)):]
