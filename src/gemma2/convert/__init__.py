"""Converters from Google's original Gemma 2 checkpoints (PyTorch, Flax/Orbax) to the Hugging Face layout."""

from gemma2.convert.converter import ConversionSummary, convert_checkpoint

__all__ = ["ConversionSummary", "convert_checkpoint"]
