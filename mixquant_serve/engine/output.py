"""What an engine step reports per request, and the text side of stopping (stop strings, streaming)."""

from __future__ import annotations

from dataclasses import dataclass

from mixquant_serve.model.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None  # "stop" (eos, stop token or stop string) | "length" | "abort"
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int


class StopStringText:
    """Detokenizes a stream and cuts it at the first stop string.

    Text that could still be the start of a stop string is held back, so a client never sees part of a
    stop string that the next token completes.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = stop
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that is now safe to emit. Sets `stopped` on a stop string."""
        self.decoder.push(token_id)
        text = self.decoder.text
        cut = min((i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit_until(text, cut)
        held = max((self._partial_suffix(text, s) for s in self.stop), default=0)
        return self._emit_until(text, len(text) - held)

    def flush(self) -> str:
        """At the end of generation without a stop string, the held-back text is emitted."""
        if self.stopped:
            return ""
        self.decoder.flush()  # a trailing incomplete UTF-8 sequence is emitted as the tokenizer decodes it
        return self._emit_until(self.decoder.text, len(self.decoder.text))

    def _emit_until(self, text: str, end: int) -> str:
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    @staticmethod
    def _partial_suffix(text: str, stop: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of stop."""
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-length:]):
                return length
        return 0
