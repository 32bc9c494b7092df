"""gemma2: Google's Gemma 2 language models in PyTorch, exact to the reference implementation."""

from gemma2.cache import Gemma2Cache
from gemma2.config import Gemma2Config
from gemma2.errors import CheckpointError, ConfigError, Gemma2Error, InputError
from gemma2.heads import (
    CausalLMOutput,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2ForTokenClassification,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from gemma2.model import BaseModelOutput, Gemma2Model

__version__ = "0.1.0"

__all__ = [
    "BaseModelOutput",
    "CausalLMOutput",
    "CheckpointError",
    "ConfigError",
    "Gemma2Cache",
    "Gemma2Config",
    "Gemma2Error",
    "Gemma2ForCausalLM",
    "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification",
    "Gemma2Model",
    "InputError",
    "SequenceClassifierOutput",
    "TokenClassifierOutput",
]
