"""What the models return: dataclasses that also index like transformers' ModelOutput.

`out.logits` is the usual access; `out[0]` and `out["logits"]` work too, counting only the
fields that are set, as transformers does (so `out[0]` is the loss when labels were given).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from gemma2.cache import Gemma2Cache


class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)  # type: ignore[arg-type]

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor
    past_key_values: Gemma2Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def cache(self) -> Gemma2Cache | None:  # transformers 5.x's name
        return self.past_key_values


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Gemma2Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def cache(self) -> Gemma2Cache | None:  # transformers 5.x's name
        return self.past_key_values


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Gemma2Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
