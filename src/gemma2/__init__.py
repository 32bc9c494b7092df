"""gemma2: Google's Gemma 2 language models in PyTorch, exact to the reference implementation."""

from gemma2.cache import Gemma2Cache
from gemma2.config import Gemma2Config
from gemma2.engine import Engine, StepEvent
from gemma2.errors import CheckpointError, ConfigError, Gemma2Error, InputError
from gemma2.generation import IncrementalDecoder, generate, stream
from gemma2.heads import Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2ForTokenClassification
from gemma2.model import Gemma2Model
from gemma2.outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput, TokenClassifierOutput
from gemma2.sampling import SamplingParams
from gemma2.tokenizer import ChatFormatError, Gemma2Tokenizer, TokenizerError

__version__ = "0.1.0"

__all__ = [
    "BaseModelOutput",
    "CausalLMOutput",
    "ChatFormatError",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "Gemma2Cache",
    "Gemma2Config",
    "Gemma2Error",
    "Gemma2ForCausalLM",
    "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification",
    "Gemma2Model",
    "Gemma2Tokenizer",
    "IncrementalDecoder",
    "InputError",
    "SamplingParams",
    "SequenceClassifierOutput",
    "StepEvent",
    "TokenClassifierOutput",
    "TokenizerError",
    "generate",
    "stream",
]
