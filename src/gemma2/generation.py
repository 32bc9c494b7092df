"""Text generation as thin wrappers over the engine: generate(), stream(), the incremental detokenizer.

- Each prompt row becomes one engine request at its own cache row, its padding stripped: a padded
  row produces the tokens of the same prompt alone (the reference's left-padding rule, without
  computing the padding).
- The cache is sized once: full-attention layers to the longest prompt + max_new_tokens, sliding
  layers a ring buffer of the window (or shorter when every sequence is shorter).
- Only the last position's logits are computed (never [T, V] for the prompt).
- Rows that finish (a stop token) are padded with pad_token_id until every row is done.

No I/O here: `stream` yields text for the caller to print.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gemma2.engine import Engine, stop_token_ids
from gemma2.errors import InputError
from gemma2.sampling import SamplingParams, SamplingSettings

if TYPE_CHECKING:
    from gemma2.heads import Gemma2ForCausalLM
    from gemma2.tokenizer import Gemma2Tokenizer


def generate_steps(
    model: Gemma2ForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    prefill_chunk: int = 512,
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens [B] (finished rows get pad_token_id); arguments as `generate`.

    With a seed, row b samples from its own generator seeded with seed + b.
    """
    config = model.config
    settings = SamplingSettings(do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    # Every check happens before any model work.
    settings.validate()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputError(f"input_ids must be a [batch, length] tensor with length >= 1, got {shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    B, T = input_ids.shape
    if config.max_position_embeddings < T:
        raise InputError(
            f"the prompt has {T} tokens, more than max_position_embeddings ({config.max_position_embeddings})"
        )
    stops = stop_token_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.generation_config.get("pad_token_id", config.pad_token_id)
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    input_ids = input_ids.cpu()
    if attention_mask is None:
        # As the reference does: pad tokens in the prompt are padding, unless pad doubles as a stop token.
        if pad_token_id not in stops and bool((input_ids == pad_token_id).any()):
            attention_mask = (input_ids != pad_token_id).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, got {list(attention_mask.shape)}"
        )
    real = attention_mask.cpu().bool()
    if bool((real.sum(-1) == 0).any()):
        raise InputError("a row of the prompt is all padding (its attention_mask is all zeros)")
    prompts = [input_ids[b][real[b]].tolist() for b in range(B)]
    longest = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, config.max_position_embeddings - longest)
    if max_new_tokens < 1:
        return

    engine = Engine(model, max_batch=B, max_length=longest + max_new_tokens, prefill_chunk=prefill_chunk)
    for b, prompt in enumerate(prompts):
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=None if seed is None else seed + b,
            stop_token_ids=stops,
            ignore_eos=True,  # exactly `stops`, the checkpoint's stop tokens included when eos_token_id is None
        )
        engine.add(prompt, params, request_id=b)
    tokens: list[list[int]] = [[] for _ in range(B)]
    emitted = 0
    while engine.has_unfinished():
        for event in engine.step():
            if event.token_id is not None:
                tokens[int(event.request_id)].append(event.token_id)  # type: ignore[call-overload]
        # Step t of the batch is out once every row still running has its t-th token (finished rows
        # are padded); when none runs, everything left is out.
        running = [len(tokens[b]) for b in range(B) if b in engine.requests]
        ready = min(running) if running else max(map(len, tokens))
        for t in range(emitted, ready):
            yield torch.tensor([tokens[b][t] if t < len(tokens[b]) else pad_token_id for b in range(B)])
        emitted = max(emitted, ready)


def generate(model: Gemma2ForCausalLM, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Prompt plus generated tokens, LongTensor [B, T + new]; see Gemma2ForCausalLM.generate."""
    steps = list(generate_steps(model, input_ids, **kwargs))
    if not steps:
        return input_ids
    return torch.cat([input_ids.to(steps[0].device), torch.stack(steps, dim=1)], dim=1)


class IncrementalDecoder:
    """Turns a growing list of token ids into new text, never emitting half a UTF-8 character.

    Byte-fallback pieces (<0xE2> <0x80> <0x99>) decode to U+FFFD until the character is whole;
    text is held back while it ends in U+FFFD. Only a short window of recent ids is re-decoded.
    """

    def __init__(self, tokenizer: Gemma2Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] were already shown
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        shown = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(shown) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        shown = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(shown) :]


def stream(
    model: Gemma2ForCausalLM,
    tokenizer: Gemma2Tokenizer,
    prompt: str | Sequence[dict[str, Any]],
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the generated text piece by piece for a prompt string or a list of chat messages.

    Messages are rendered with the tokenizer's chat template (with the generation prompt), and
    `<end_of_turn>` is added to the stop tokens. Stop tokens are not part of the text.
    """
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        stops = stop_token_ids(model, kwargs.pop("eos_token_id", None))
    else:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        stops = stop_token_ids(model, kwargs.pop("eos_token_id", None))
        for token in (tokenizer.eos_token_id, tokenizer.end_of_turn_id):
            if token is not None and token not in stops:
                stops.append(token)
    decoder = IncrementalDecoder(tokenizer)
    for tokens in generate_steps(model, torch.tensor([ids]), eos_token_id=stops, **kwargs):
        token = int(tokens[0])
        if token in stops:
            break
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
