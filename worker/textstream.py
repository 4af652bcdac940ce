"""Turn generated token ids into text deltas that never split a character or leak a stop string."""

from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Return GPT-2's byte-level map from printable stand-in characters back to bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenDecoder:
    """Decode a tokenizer's ids to bytes one at a time (byte-level BPE) or by re-decoding (others)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.special_ids = set(tokenizer.all_special_ids)
        self.added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self._cache: dict[int, bytes] = {}

    def token_bytes(self, token_id: int) -> bytes:
        """Return the raw bytes of one token (empty for special tokens)."""
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self.special_ids:
            raw = b""
        elif token_id in self.added:
            raw = self.added[token_id].encode("utf-8")
        else:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            table = _byte_decoder()
            raw = bytes(table[ch] for ch in piece) if all(ch in table for ch in piece) else piece.encode()
        self._cache[token_id] = raw
        return raw


class TextStream:
    """Accumulate one row's tokens and hand out safe-to-show text deltas.

    A delta never ends inside a multi-byte character, and text that could be the start of a stop
    string is held back until it is known not to be one. The emitted deltas concatenate to ``text``.
    """

    def __init__(self, decoder: TokenDecoder, stop: list[str] | None = None) -> None:
        self.decoder = decoder
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._pending = ""  # decoded but held back (possible stop-string prefix)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._prefix_offset = 0  # generic path: ids already folded into text
        self._generic_text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly visible text (possibly empty)."""
        self.ids.append(token_id)
        if self.decoder.byte_level:
            new = self._utf8.decode(self.decoder.token_bytes(token_id))
        else:
            new = self._generic_step()
        return self._release(new, final=False)

    def finish(self) -> str:
        """Flush what is held back at the end of generation and return it."""
        if self.stopped:
            return ""
        new = self._utf8.decode(b"", final=True) if self.decoder.byte_level else self._generic_flush()
        return self._release(new, final=True)

    def _generic_step(self) -> str:
        """Decode the unsettled tail; settle it unless it ends in an incomplete character."""
        tail = self.decoder.tokenizer.decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        if tail.endswith("\ufffd") and len(self.ids) - self._prefix_offset < 4:
            return ""
        self._prefix_offset = len(self.ids)
        return tail

    def _generic_flush(self) -> str:
        """Return whatever tail the generic path still holds."""
        tail = self.decoder.tokenizer.decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        self._prefix_offset = len(self.ids)
        return tail

    def _release(self, new: str, final: bool) -> str:
        """Move text from pending to emitted, honouring stop strings."""
        if self.stopped:
            return ""
        # NUL cannot be stored in Postgres text; random demo weights do emit it.
        pending = self._pending + new.replace("\x00", "\ufffd")
        if self.stop:
            window = self.text[-max(len(s) for s in self.stop) :] + pending
            cut = min((i for i in (window.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                keep = cut - (len(window) - len(pending))
                delta = pending[: max(keep, 0)]
                if keep < 0:  # the stop string began in text already shown; cannot happen with holdback
                    delta = ""
                self.text += delta
                self._pending = ""
                self.stopped = True
                return delta
            if not final:
                hold = _longest_stop_prefix_suffix(pending, self.stop)
                self._pending = pending[len(pending) - hold :] if hold else ""
                pending = pending[: len(pending) - hold]
        self.text += pending
        if final or not self.stop:
            self._pending = ""
        return pending


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Return the length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
