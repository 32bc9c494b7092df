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
