"""Where gemma2 keeps what it builds or downloads (compiled kernels, the tokenizer, converted files)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$GEMMA2_CACHE, else $XDG_CACHE_HOME/gemma2, else ~/.cache/gemma2."""
    if os.environ.get("GEMMA2_CACHE"):
        return Path(os.environ["GEMMA2_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gemma2"
