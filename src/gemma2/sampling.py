"""Next-token selection: per-request settings, and processors and samplers as pure functions on [B, V] logits.

The processors and their order follow transformers' generate: repetition penalty, then (when
sampling) temperature, top-k, top-p, min-p; removed tokens get -inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gemma2.errors import InputError


@dataclass
class SamplingSettings:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    @property
    def penalizes(self) -> bool:
        """Whether the repetition penalty changes anything (so the ids seen so far are needed)."""
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0

    @property
    def counts_output(self) -> bool:
        """Whether the presence or frequency penalty applies (so the generated ids are needed)."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def changes_logits(self) -> bool:
        """Whether anything but the argmax of the raw logits can decide a greedy token."""
        return self.penalizes or self.counts_output or bool(self.logit_bias)

    def validate(self) -> None:
        """Raise InputError for settings that cannot work, before any model work is done."""
        if self.do_sample and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise InputError(f"top_k must be an integer (0 disables it), got {self.top_k!r}")
        if self.top_k is not None and self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise InputError(f"{name} must be a number in [-2, 2], got {value!r}")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int):
                raise InputError(f"logit_bias keys must be token ids, got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise InputError(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}")


@dataclass
class SamplingParams:
    """How one request of the engine picks its tokens and when it stops (OpenAI's conventions).

    temperature 0 is greedy. stop_token_ids None means the checkpoint's stop tokens
    (generation_config.json, else config.json); ids given are stops in addition to them;
    ignore_eos drops the checkpoint's (the ids given still stop); no stop token can end a request
    before min_tokens. logprobs N > 0 reports the chosen token's log probability and the N most
    likely tokens', from the model's own logits (after the final soft-cap, before any processor);
    prompt_logprobs N >= 0 reports the same for every prompt token after the first. max_new_tokens
    0 reads the prompt only (for its prompt_logprobs). presence and frequency penalties count the
    generated tokens (OpenAI's definition); the repetition penalty counts prompt and generated.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int = 0
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    def settings(self) -> SamplingSettings:
        sample = self.temperature > 0
        return SamplingSettings(
            sample,
            self.temperature if sample else 1.0,
            self.top_k,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
            self.presence_penalty,
            self.frequency_penalty,
            self.logit_bias,
        )

    def validate(self) -> None:
        """Raise InputError naming the field that cannot work."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise InputError("max_new_tokens 0 reads the prompt only, which needs prompt_logprobs")
        for name in ("prompt_logprobs", "min_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InputError(f"{name} must be an integer >= 0, got {value!r}")
        if self.min_tokens > self.max_new_tokens:
            raise InputError(f"min_tokens ({self.min_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or self.logprobs < 0:
            raise InputError(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if self.stop_token_ids is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.stop_token_ids
        ):
            raise InputError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.settings().validate()


def log_probabilities(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log_softmax of one row's logits [V] in float32: the token's value and the `top` largest (id, value)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        best = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
    return float(logprobs[token]), best


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in `seen` [B, L] less likely: negative logits times, positive over penalty."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    ascending, order = torch.sort(logits, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens less likely than p times the most likely token."""
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(remove, float("-inf"))


def output_penalties(logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties on the generated ids [B, G]: minus frequency x count, minus presence once seen."""
    counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def add_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(1, ids, values.expand(logits.shape[0], -1))


def process_logits(
    logits: torch.Tensor, seen: torch.Tensor, settings: SamplingSettings, generated: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [B, V] after the processors: logit bias, penalties, then (sampling) temperature and filters.

    `seen` [B, L] (prompt and generated) feeds the repetition penalty, `generated` [B, G] the
    presence and frequency penalties.
    """
    logits = logits.float()
    if settings.logit_bias:
        logits = add_logit_bias(logits, settings.logit_bias)
    if settings.penalizes:
        assert settings.repetition_penalty is not None
        logits = repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.counts_output and generated is not None and generated.numel():
        logits = output_penalties(logits, generated, settings.presence_penalty, settings.frequency_penalty)
    if not settings.do_sample:
        return logits
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    if settings.top_k:
        logits = top_k_filter(logits, settings.top_k)
    if settings.top_p is not None and settings.top_p < 1.0:
        logits = top_p_filter(logits, settings.top_p)
    if settings.min_p:
        logits = min_p_filter(logits, settings.min_p)
    return logits


def next_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None,
    generated: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token [B] for each row: argmax when greedy, a draw from the processed distribution otherwise."""
    logits = process_logits(logits, seen, settings, generated)
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
