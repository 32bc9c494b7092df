"""One choice's text as its tokens arrive: incremental detokenizing, stop strings, log probabilities.

Stop strings are found in the decoded text, not in tokens, so a stop split across tokens
("<|" + "end|>") still stops, and its text is never shown: while the text ends in what could be
the start of a stop string, that tail is held back. The streamed pieces and the whole answer come
from the same `ChoiceText`, so a stream joins to exactly the non-streamed text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemma2.engine import StepEvent
from gemma2.generation import IncrementalDecoder
from gemma2.tokenizer import Gemma2Tokenizer


@dataclass
class TokenInfo:
    """A generated (or, under echo, prompt) token with its log probabilities, for the response."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class ChoiceText:
    tokenizer: Gemma2Tokenizer
    stops: list[str]
    decoder: IncrementalDecoder = field(init=False)
    text: str = ""  # everything decoded so far (cut at a stop string once one is found)
    sent: int = 0  # text[:sent] has been released
    completion_tokens: int = 0
    finish_reason: str | None = None
    tokens: list[TokenInfo] = field(default_factory=list)  # not yet released with a piece of text
    released_tokens: list[TokenInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.tokenizer)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, event: StepEvent) -> str:
        """Take an engine event; return the text that can be shown now (maybe "")."""
        if self.finished:
            return ""
        if event.token_id is not None:
            self.completion_tokens += 1
            # A stop token ends the choice; like the checkpoint's end-of-turn, it is not text.
            if event.finish_reason != "stop":
                self.tokens.append(TokenInfo(event.token_id, event.logprob, event.top_logprobs))
                self.text += self.decoder.push(event.token_id)
        if event.finished:
            self.text += self.decoder.flush()
            released = self._release(final=True)
            if self.finish_reason is None:
                self.finish_reason = event.finish_reason
            return released
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        start = self.sent
        found = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if found:
            self.text = self.text[: min(found)[0]]
            self.finish_reason = "stop"
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._partial_stop_length()
        if end <= self.sent:
            return ""
        self.sent = end
        self.released_tokens += self.tokens
        self.tokens = []
        return self.text[start:end]

    def _partial_stop_length(self) -> int:
        """The longest tail of the unreleased text that a stop string starts with."""
        tail = self.text[self.sent :]
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(tail)), best, -1):
                if tail.endswith(stop[:k]):
                    best = k
                    break
        return best

    def take_tokens(self) -> list[TokenInfo]:
        """Tokens whose text has been released since the last call (for a stream's logprobs)."""
        out, self.released_tokens = self.released_tokens, []
        return out

    def all_tokens(self) -> list[TokenInfo]:
        """Every token's entry once the choice is done (held-back ones included, as the answer has them)."""
        out = self.released_tokens + (self.tokens if self.finish_reason != "stop" else [])
        self.released_tokens, self.tokens = [], []
        return out
