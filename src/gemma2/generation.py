"""Text generation: prefill, then one token at a time from a cache allocated once per call.

- The cache is sized once: full-attention layers to prompt + max_new_tokens, sliding layers a
  ring buffer of the window (or shorter when the whole sequence is shorter).
- Only the last position's logits are computed (never [T, V] for the prompt).
- Left padding works as in the reference: position ids count real tokens only, so a padded row
  produces the same tokens as the same prompt alone.
- Rows that finish (a stop token) are padded with pad_token_id until every row is done.

No I/O here: `stream` yields text for the caller to print.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gemma2.cache import Gemma2Cache
from gemma2.errors import InputError
from gemma2.sampling import SamplingSettings, next_tokens

if TYPE_CHECKING:
    from gemma2.heads import Gemma2ForCausalLM
    from gemma2.tokenizer import Gemma2Tokenizer


def read_generation_config(directory: Path) -> dict[str, Any]:
    """generation_config.json of a checkpoint directory, or {} when it has none."""
    path = directory / "generation_config.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    return data if isinstance(data, dict) else {}


def stop_token_ids(model: Gemma2ForCausalLM, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """Explicit ids, else generation_config.json's eos_token_id, else the config's."""
    if eos_token_id is None:
        eos_token_id = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


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
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens [B] (finished rows get pad_token_id); arguments as `generate`."""
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
    max_new_tokens = min(max_new_tokens, config.max_position_embeddings - T)
    stops = stop_token_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = model.generation_config.get("pad_token_id", config.pad_token_id)
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    device = model.device
    input_ids = input_ids.to(device)
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
    attention_mask = attention_mask.to(device).long()
    if bool((attention_mask.sum(-1) == 0).any()):
        raise InputError("a row of the prompt is all padding (its attention_mask is all zeros)")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    padded = not bool(attention_mask.all())
    total = T + max_new_tokens
    cache = Gemma2Cache(config, max_length=total)
    mask = torch.zeros(B, total, dtype=torch.long, device=device)
    mask[:, :T] = attention_mask
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    next_position = positions[:, -1:] + 1  # [B, 1]
    seen = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)

    with torch.no_grad():
        logits = model(
            input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache, logits_to_keep=1
        ).logits[:, -1]
        for step in range(max_new_tokens):
            tokens = next_tokens(logits, seen, settings, generator)
            tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
            yield tokens
            finished |= torch.isin(tokens, stop_ids)
            if bool(finished.all()) or step == max_new_tokens - 1:
                return
            seen = torch.cat([seen, tokens[:, None]], dim=1)
            mask[:, T + step] = 1
            logits = model(
                tokens[:, None],
                # Without padding every slot is real: no mask to gather in every layer.
                attention_mask=mask[:, : T + step + 1] if padded else None,
                position_ids=next_position,
                past_key_values=cache,
                logits_to_keep=1,
            ).logits[:, -1]
            next_position = next_position + 1


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
