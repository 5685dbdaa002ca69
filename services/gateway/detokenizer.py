"""Incremental detokenization with stop strings.

Tokens arrive a few at a time; `IncrementalDetokenizer.push` turns them into
text that will not change any more. Only a short window of recent tokens is
decoded per call, so the cost per token does not grow with the output length.

Why a window works: decoding is concatenative at character boundaries for the
usual decoders (byte-level BPE, byte fallback, Metaspace), so the text of
`window + new tokens` starts with the text of `window`, except that
- a trailing "\\ufffd" may be the start of a multi-byte character split across
  tokens, and may change when the next token arrives; such text is held back;
- some decoders depend on the left neighbour (e.g. Metaspace drops the leading
  space of the first token), so the window keeps a few already-emitted tokens
  as left context and only the text after them is new.

This is exact for byte-level BPE. With a byte-fallback decoder, a run of byte
tokens that is invalid UTF-8 as a whole decodes to one "\\ufffd" per byte, so
valid text followed by a stray byte can differ from a one-shot decode.

Stop strings are matched on the finalised text. Generation stops at the first
point where any stop string is complete; the output is cut where that stop
string starts (if several complete at the same point, the one starting first).
Text that could still grow into a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"

# Tokens of already-emitted text kept at the start of the window as left context.
_CONTEXT_TOKENS = 4
# When the window ends on a character boundary and holds more than this many
# tokens, it is cut back to the context tokens.
_TRIM_AT = 2 * _CONTEXT_TOKENS
# When the window has ended in "\ufffd" for this many tokens (invalid UTF-8),
# look for a split point that is provably final, to keep the window short.
_MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of final text.

    Exactness: when no stop string matches, the concatenated `push` outputs
    plus `flush()` equal `tokenizer.decode(all_pushed_ids, skip_special_tokens,
    clean_up_tokenization_spaces=False)`. With stop strings, the result is that
    text cut at the stop (see the module docstring).

    `prompt_token_ids` only serves as left context (the last few prompt tokens),
    so that the first generated token decodes as it would after the prompt; if
    the prompt's tail does not end on a character boundary it is not used.
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int] | None = None,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        # _window: recent token ids; the first `_emitted` characters of its
        # decoded text are context or were already handed to the stop matcher.
        self._window: list[int] = []
        self._emitted = 0
        self._held = ""  # final text held back because it may start a stop string
        self._parts: list[str] = []
        self._stopped = False
        self._flushed = False
        if prompt_token_ids:
            context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
            context_text = self._decode(context)
            if not context_text.endswith(REPLACEMENT_CHAR):
                self._window = context
                self._emitted = len(context_text)

    @property
    def stopped(self) -> bool:
        """True once a stop string matched; later tokens are ignored."""
        return self._stopped

    @property
    def text(self) -> str:
        """Everything returned so far by push() and flush()."""
        return "".join(self._parts)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text that became final."""
        if self._stopped or self._flushed:
            return ""
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        return self._emit(self._match_stop(self._advance(), final=False))

    def flush(self) -> str:
        """End of stream: return the held-back text (nothing if a stop string matched)."""
        if self._stopped or self._flushed:
            return ""
        self._flushed = True
        rest = self._decode(self._window)[self._emitted:]
        return self._emit(self._match_stop(rest, final=True))

    # ------------------------------------------------------------ internals

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            list(ids),
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _emit(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text

    def _advance(self) -> str:
        """Decode the window and return its newly final text."""
        text = self._decode(self._window)
        out = ""
        if text.endswith(REPLACEMENT_CHAR) and len(self._window) > _MAX_PENDING_TOKENS:
            out, text = self._resync(text)
        stable = text.rstrip(REPLACEMENT_CHAR)
        if len(stable) > self._emitted:
            out += stable[self._emitted:]
            self._emitted = len(stable)
        if len(stable) == len(text) and len(self._window) > _TRIM_AT:
            # The window ends on a character boundary: keep only left context.
            del self._window[:-_CONTEXT_TOKENS]
            self._emitted = len(self._decode(self._window))
        return out

    def _resync(self, text: str) -> tuple[str, str]:
        """Shorten a window that keeps ending in "\\ufffd" (invalid UTF-8).

        Splitting at `i` is safe when decoding the two halves separately gives
        the same text as decoding the whole, and the second half has text of its
        own: then the first half's text (trailing "\\ufffd" included) is final.
        Returns (newly final text, decoded text of the shortened window).
        """
        split = len(self._window) - _CONTEXT_TOKENS
        head = self._decode(self._window[:split])
        tail = self._decode(self._window[split:])
        if not tail or head + tail != text:
            return "", text
        out = head[self._emitted:]
        self._emitted = max(self._emitted - len(head), 0)
        del self._window[:split]
        return out, tail

    def _match_stop(self, new_text: str, final: bool) -> str:
        """Feed final text to the stop matcher; return what can be released."""
        if not self._stop:
            return new_text
        buffer = self._held + new_text
        self._held = ""
        best: tuple[int, int] | None = None  # (end, start) of the first complete stop string
        for s in self._stop:
            start = buffer.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is not None:
            self._stopped = True
            return buffer[: best[1]]
        if final:
            return buffer
        keep = self._partial_stop_len(buffer)
        if keep:
            self._held = buffer[-keep:]
            return buffer[:-keep]
        return buffer

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
