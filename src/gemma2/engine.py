"""Continuous batching: requests join and leave a running batch between model steps. No HTTP, no I/O.

    engine = Engine(model, max_batch=8, max_length=None, prefill_chunk=512)
    rid = engine.add(prompt_ids, SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for event in engine.step():   # admit, read prompt chunks, decode every running row
            ...                       # event.request_id, .token_id, .logprob, .finished, .finish_reason
    engine.abort(rid)                 # the row is free before the next step

The engine owns one `Gemma2Cache` whose rows are the batch: a request takes a row when one is
free (FIFO otherwise), its prompt is read `prefill_chunk` tokens per step so running rows keep
decoding meanwhile, then every decoding row advances in one batched forward pass, each at its
own position. A finished or aborted request gives its row back at once (its slots wiped).

Each request samples with its own settings and its own random generator, and row b of a batched
forward computes exactly what it would alone (masks are per row), so a request's tokens do not
depend on what else runs: greedy output equals the prompt alone in float32; in bf16 the matrix
kernels may round a row differently at another batch size (see the README for how often).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gemma2.cache import Gemma2Cache
from gemma2.errors import InputError
from gemma2.sampling import SamplingParams, SamplingSettings, log_probabilities, next_tokens

if TYPE_CHECKING:
    from gemma2.heads import Gemma2ForCausalLM


@dataclass
class StepEvent:
    """One request's news from a step: a new token, or the end of the request."""

    request_id: Hashable
    token_id: int | None  # None for an abort
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"


@dataclass
class _Request:
    request_id: Hashable
    prompt: list[int]
    params: SamplingParams
    settings: SamplingSettings
    stops: frozenset[int]
    generator: torch.Generator | None
    row: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.row is not None and self.prefilled == len(self.prompt)


def _plain_greedy(request: _Request) -> bool:
    """Greedy with nothing that changes the logits first: the argmax of the raw logits."""
    return not request.settings.do_sample and not request.settings.penalizes


def stop_token_ids(model: Gemma2ForCausalLM, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """Explicit ids, else generation_config.json's eos_token_id, else the config's (one id or a list)."""
    if eos_token_id is None:
        eos_token_id = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


class Engine:
    """A continuous-batching generator over one causal LM (see the module docstring)."""

    def __init__(
        self, model: Gemma2ForCausalLM, max_batch: int = 8, max_length: int | None = None, prefill_chunk: int = 512
    ) -> None:
        context = model.config.max_position_embeddings
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= context
        ):
            raise InputError(
                f"max_length must be an integer in [1, {context}] (the context length), got {max_length!r}"
            )
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.model = model
        self.max_batch = max_batch
        self.max_length = max_length or context
        self.prefill_chunk = prefill_chunk
        self.default_stops = stop_token_ids(model)
        # Buffers sized to max_length when the caller gave it; grown on demand otherwise.
        self.cache = Gemma2Cache(model.config, max_length=max_length, max_batch=max_batch)
        self.waiting: deque[_Request] = deque()
        self.running: dict[int, _Request] = {}  # by cache row
        self.requests: dict[Hashable, _Request] = {}
        self.aborted: list[Hashable] = []
        self._ids = itertools.count()
        self.device = model.device

    # ---- requests ------------------------------------------------------------------------------

    def add(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        params: SamplingParams | None = None,
        request_id: Hashable = None,
    ) -> Hashable:
        """Queue a request; returns its id. Refused (InputError) when prompt + max_new_tokens > max_length."""
        params = params or SamplingParams()
        params.validate()
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
                raise InputError(f"prompt_ids must be a 1-D tensor of token ids, got shape {list(prompt_ids.shape)}")
            prompt = [int(i) for i in prompt_ids.tolist()]
        else:
            prompt = list(prompt_ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
                raise InputError("prompt_ids must be a list of integer token ids")
        vocab = self.model.config.vocab_size
        if not prompt:
            raise InputError("prompt_ids is empty: a request needs at least one token")
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise InputError(f"prompt_ids contains token id {bad[0]}, outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_new_tokens > self.max_length:
            raise InputError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) is "
                f"{len(prompt) + params.max_new_tokens} tokens, more than max_length ({self.max_length})"
            )
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self.requests:  # automatic ids skip the ids callers chose
                request_id = next(self._ids)
        if request_id in self.requests:
            raise InputError(f"request id {request_id!r} is already in use")
        stops = set() if params.ignore_eos else set(self.default_stops)
        stops |= set(params.stop_token_ids or ())
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = _Request(request_id, prompt, params, params.settings(), frozenset(stops), generator)
        self.requests[request_id] = request
        self.waiting.append(request)
        return request_id

    def abort(self, request_id: Hashable) -> bool:
        """Stop a request now (its row is free before the next step); False if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.row is None:
            self.waiting.remove(request)
        else:
            self._release(request)
        self.aborted.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    @property
    def rows_in_use(self) -> int:
        return len(self.running)

    def _release(self, request: _Request) -> None:
        assert request.row is not None
        del self.running[request.row]
        self.cache.free_row(request.row)
        request.row = None

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """Admit waiting requests, read up to prefill_chunk prompt tokens, decode every decoding row."""
        events = [StepEvent(rid, None, finished=True, finish_reason="abort") for rid in self.aborted]
        self.aborted = []
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            request.row = self.cache.allocate_row()
            self.running[request.row] = request
        decoding = [r for r in self.running.values() if r.decoding]
        with torch.no_grad():
            events += self._prefill()
            if decoding:
                events += self._decode(decoding)
        return events

    def _prefill(self) -> list[StepEvent]:
        """Read up to prefill_chunk prompt tokens, oldest request first; chunks of one length share a forward."""
        budget = self.prefill_chunk
        chunks: dict[int, list[_Request]] = {}
        for request in self.running.values():  # admission order
            if request.decoding:
                continue
            size = min(len(request.prompt) - request.prefilled, budget)
            if size == 0:
                break
            chunks.setdefault(size, []).append(request)
            budget -= size
        events = []
        for size, requests in chunks.items():
            ids = torch.tensor(
                [r.prompt[r.prefilled : r.prefilled + size] for r in requests], dtype=torch.long, device=self.device
            )
            rows = [r.row for r in requests]
            logits = self.model(ids, past_key_values=self.cache, cache_rows=rows, logits_to_keep=1).logits[:, -1]
            for i, request in enumerate(requests):
                request.prefilled += size
                if request.decoding:  # the whole prompt is read: its first token
                    events.append(self._emit(request, logits[i]))
        return events

    def _decode(self, requests: list[_Request]) -> list[StepEvent]:
        ids = torch.tensor([[r.generated[-1]] for r in requests], dtype=torch.long, device=self.device)
        rows = [r.row for r in requests]
        logits = self.model(ids, past_key_values=self.cache, cache_rows=rows, logits_to_keep=1).logits[:, -1]
        # Plain greedy rows take one argmax for the whole batch (the same index as one row at a time).
        greedy = self.model.greedy_tokens(logits).tolist() if any(map(_plain_greedy, requests)) else []
        return [
            self._emit(request, logits[i], greedy[i] if _plain_greedy(request) else None)
            for i, request in enumerate(requests)
        ]

    def _emit(self, request: _Request, logits: torch.Tensor, token: int | None = None) -> StepEvent:
        """Pick the request's next token from its logits [V] (unless given); finish it on a stop or its length."""
        if token is None:
            # The ids seen so far matter only to the repetition penalty: no tensor of them otherwise.
            seen = request.prompt + request.generated if request.settings.penalizes else []
            seen_ids = torch.tensor([seen], dtype=torch.long, device=logits.device)
            token = int(next_tokens(logits[None], seen_ids, request.settings, request.generator)[0])
        request.generated.append(token)
        event = StepEvent(request.request_id, token)
        if request.params.logprobs:
            event.logprob, event.top_logprobs = log_probabilities(logits, token, request.params.logprobs)
        if token in request.stops:
            event.finished, event.finish_reason = True, "stop"
        elif len(request.generated) >= request.params.max_new_tokens:
            event.finished, event.finish_reason = True, "length"
        if event.finished:
            self._release(request)
            del self.requests[request.request_id]
        return event
