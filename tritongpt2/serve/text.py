"""A completion's text, token by token: detokenized as a whole (byte-level BPE splits characters
across tokens), cut at the first stop string, and streamed without ever sending text that a stop
string or a later token could still take back."""

from __future__ import annotations

from typing import Protocol

INCOMPLETE = "\ufffd"  # what a character split across tokens decodes to until its last byte arrives


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextStream:
    def __init__(self, tokenizer: Decoder, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Take a generated token; returns the text that can be sent now. After it returns with
        `stopped` set, the completion has hit a stop string and its text ends before it."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        found = [i for i in (text.find(stop, max(0, len(self.sent) - len(stop) + 1)) for stop in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._send(text[: min(found)])
        safe = len(text.rstrip(INCOMPLETE))
        held = max((_overlap(text[:safe], stop) for stop in self.stop), default=0)
        return self._send(text[: safe - held])

    def finish(self) -> str:
        """The rest of the text, once no token will follow."""
        return "" if self.stopped else self._send(self.tokenizer.decode(self.tokens))

    @property
    def text(self) -> str:
        return self.sent

    def _send(self, text: str) -> str:
        # Text already sent is never taken back: a decode that rewrote it would be a tokenizer bug.
        if not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
