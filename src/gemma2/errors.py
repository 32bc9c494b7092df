"""The errors this package raises for bad input.

Every error names what was wrong (file, key, field, shape or value) so a user can fix the input
without reading a traceback from inside torch. They derive from ValueError so that code written
against transformers' error types keeps working.
"""


class Gemma2Error(ValueError):
    """Base class of every input error raised by gemma2."""


class ConfigError(Gemma2Error):
    """A configuration field or config.json file is invalid."""


class CheckpointError(Gemma2Error):
    """A checkpoint file, index, key or tensor is missing, corrupt or of the wrong shape."""


class InputError(Gemma2Error):
    """Arguments to a forward pass are inconsistent (ids out of range, mask of the wrong size...)."""


class TokenizerError(Gemma2Error):
    """A tokenizer file is missing or unreadable."""


class ChatFormatError(Gemma2Error):
    """A conversation does not fit the chat format (roles, order, content)."""


class DataError(Gemma2Error):
    """A training data file is missing or malformed."""


class TrainingError(Gemma2Error):
    """Training cannot start or continue (no state to resume, mismatched state)."""


class TrainingInterrupted(Gemma2Error):
    """Ctrl-C stopped training; the state was saved for --resume."""


class AssetError(Gemma2Error):
    """A cached asset could not be fetched or failed its checksum."""


class SentencePieceError(ValueError):
    """A tokenizer.model file is not a SentencePiece model this reader understands."""
