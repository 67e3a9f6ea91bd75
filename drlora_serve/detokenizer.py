"""Incremental detokenization and stop checks.

Text is decoded over a sliding window of tokens (prefix_offset, read_offset): the delta is
what decoding the window adds beyond its already emitted part, held back while it ends in an
incomplete UTF-8 sequence. Stop strings are searched in the tail the delta can complete;
the stop string and what follows are removed (vLLM's convention). Stop token ids (and eos)
finish the sequence and contribute no text.
"""

from __future__ import annotations

from drlora_serve.sequence import Sequence


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def append(self, seq: Sequence, flush: bool = False) -> str:
        """Decode what the latest tokens add to seq.text; returns the delta."""
        ids = seq.output_token_ids
        before = self._decode(ids[seq.detok_prefix:seq.detok_read])
        after = self._decode(ids[seq.detok_prefix:])
        if len(after) > len(before) and (flush or not after.endswith("\ufffd")):
            delta = after[len(before):]
            seq.detok_prefix, seq.detok_read = seq.detok_read, len(ids)
            seq.text += delta
            return delta
        return ""

    @staticmethod
    def find_stop(seq: Sequence, delta_len: int) -> bool:
        """Truncate seq.text at the first stop string the delta completed; True if found."""
        stops = seq.params.stop
        if not stops or not delta_len:
            return False
        longest = max(len(s) for s in stops)
        start = max(0, len(seq.text) - delta_len - longest + 1)
        hits = [(i, s) for s in stops if s and (i := seq.text.find(s, start)) >= 0]
        if not hits:
            return False
        seq.text = seq.text[:min(hits)[0]]
        return True

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """Text safe to show now: while running, hold back a possible stop-string prefix."""
        if seq.is_finished or not seq.params.stop:
            return seq.text
        hold = max(len(s) for s in seq.params.stop) - 1
        # max(0, ...): while the text is shorter than the hold, nothing is visible (a negative
        # end would slice from the other side and show text that later snapshots take back)
        return seq.text[:max(0, len(seq.text) - hold)]
