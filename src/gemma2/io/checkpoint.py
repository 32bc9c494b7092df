"""Checkpoint files in the Hugging Face layout: finding them, reading tensors, writing shards.

Reading is lazy: `CheckpointReader` opens each safetensors file memory-mapped and reports names,
shapes and dtypes from the headers, so a loader can check every key and shape before it reads a
single tensor. Writing is atomic: files go to a temporary directory beside the target and are
moved in only when everything has been written.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import struct
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gemma2.errors import CheckpointError
from gemma2.io import weight_memory

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch floating dtype from a dtype or its name; None (or "auto") keeps the stored dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise CheckpointError(f"dtype {dtype} is not a floating-point dtype")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def _looks_like_repo_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", text) is not None and not text.startswith(".")


def resolve_checkpoint_dir(
    path: str | Path,
    config_only: bool = False,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local directory holding the checkpoint: `path` itself, or a hub download of it."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{local}: expected a checkpoint directory, found a file")
    text = str(path)
    if not _looks_like_repo_id(text):
        raise CheckpointError(f"{local}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json"] if config_only else ["*.json", "*.safetensors", "tokenizer.model"]
        return Path(
            snapshot_download(text, allow_patterns=patterns, revision=revision, cache_dir=cache_dir, token=token)
        )
    except Exception as error:  # network, authentication, missing repository: one clear message
        raise CheckpointError(
            f"{text}: not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(error).__name__}: {error})"
        ) from None


class CheckpointReader:
    """The tensors of a checkpoint directory (single file or sharded, safetensors or .bin)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._files: dict[str, Any] = {}  # shard name -> open safe_open handle or loaded dict
        self._data_offsets: dict[str, dict[str, int]] = {}  # shard name -> key -> byte offset of its data
        self.key_to_file = self._find_keys()
        self.bytes_read = 0  # tensor data read so far (read / read_slice), for tensor-parallel loading
        self._count_lock = threading.Lock()

    # -- discovery ---------------------------------------------------------------------------

    def _find_keys(self) -> dict[str, str]:
        d = self.directory
        if (d / SAFE_INDEX).exists():
            return self._read_index(d / SAFE_INDEX)
        if (d / SAFE_WEIGHTS).exists():
            return {key: SAFE_WEIGHTS for key in self._open(SAFE_WEIGHTS).keys()}
        if (d / TORCH_INDEX).exists():
            return self._read_index(d / TORCH_INDEX)
        if (d / TORCH_WEIGHTS).exists():
            return {key: TORCH_WEIGHTS for key in self._open(TORCH_WEIGHTS)}
        raise CheckpointError(f"{d}: no weights found (expected {SAFE_WEIGHTS}, or {SAFE_INDEX} with its shards)")

    def _read_index(self, index_path: Path) -> dict[str, str]:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path}: not a valid checkpoint index ({error})") from None
        by_file: dict[str, list[str]] = {}
        for key, filename in weight_map.items():
            by_file.setdefault(str(filename), []).append(key)
        for filename, keys in by_file.items():
            if not (self.directory / filename).exists():
                raise CheckpointError(
                    f"{index_path}: shard {filename} (holding {keys[0]!r} and {len(keys) - 1} more) is missing"
                )
            present = set(self._keys_of(filename))
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"{index_path}: names tensor {key!r} in {filename}, but that shard lacks it")
        return {key: str(filename) for key, filename in weight_map.items()}

    def _open(self, filename: str) -> Any:
        handle = self._files.get(filename)
        if handle is not None:
            return handle
        path = self.directory / filename
        try:
            if filename.endswith(".safetensors"):
                handle = safe_open(str(path), framework="pt", device="cpu")
            else:
                handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(handle, dict):
                    raise CheckpointError(f"{path}: expected a dict of tensors")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found") from None
        except CheckpointError:
            raise
        except Exception as error:  # torch and safetensors raise many types for a bad file
            raise CheckpointError(f"{path}: not a readable checkpoint file ({error})") from None
        self._files[filename] = handle
        return handle

    def _keys_of(self, filename: str) -> list[str]:
        handle = self._open(filename)
        return list(handle.keys())

    # -- access ------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._open(self.key_to_file[key])
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        handle = self._open(self.key_to_file[key])
        if isinstance(handle, dict):
            return handle[key].dtype
        name = handle.get_slice(key).get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.directory / self.key_to_file[key]}: tensor {key!r} has unsupported dtype {name}"
            )
        return _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        filename = self.key_to_file[key]
        handle = self._open(filename)
        try:
            return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)
        except (SafetensorError, RuntimeError) as error:
            raise CheckpointError(f"{self.directory / filename}: cannot read tensor {key!r} ({error})") from None

    def file_of(self, key: str) -> Path:
        return self.directory / self.key_to_file[key]

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor (converted to dtype) in the process's own memory, not mapped from the file.

        Large tensors land on huge pages (see weight_memory); a safetensors tensor that needs no
        conversion is read straight from the file into that memory.
        """
        stored_dtype, shape = self.dtype(key), self.shape(key)
        dtype = dtype or stored_dtype
        nbytes = math.prod(shape) * dtype.itemsize
        out = weight_memory.empty_bytes(nbytes).view(dtype).view(shape)
        location = self._byte_range(key)
        if location is not None and dtype == stored_dtype:
            weight_memory.read_into(*location, out)
        else:
            out.copy_(self.get(key))
        self._count(math.prod(shape) * stored_dtype.itemsize)
        return out

    def read_slice(self, key: str, dim: int, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Indices [start, stop) of dimension `dim` of a tensor, reading only their bytes from a
        safetensors file (a tensor-parallel rank's share); counted in `bytes_read`."""
        stored_dtype, shape = self.dtype(key), self.shape(key)
        if not 0 <= start < stop <= shape[dim]:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} has no slice {start}:{stop} of dimension {dim}")
        local_shape = (*shape[:dim], stop - start, *shape[dim + 1 :])
        location = self._byte_range(key)
        if location is None:  # .bin: the mapped file, then a copy of the slice
            out = self.get(key).narrow(dim, start, stop - start).to(dtype or stored_dtype).clone()
            self._count(out.numel() * stored_dtype.itemsize)
            return out
        raw = torch.empty(local_shape, dtype=stored_dtype)
        outer = math.prod(shape[:dim])  # runs of contiguous bytes: one per index of the leading dims
        inner = math.prod(shape[dim + 1 :]) * stored_dtype.itemsize
        run, stride = (stop - start) * inner, shape[dim] * inner
        path, offset = location
        if outer == 1:
            weight_memory.read_into(path, offset + start * inner, raw)
        else:
            _read_runs(path, [offset + i * stride + start * inner for i in range(outer)], run, raw)
        self._count(outer * run)
        return raw if dtype is None or dtype == stored_dtype else raw.to(dtype)

    def _count(self, nbytes: int) -> None:
        with self._count_lock:  # reads run in a thread pool
            self.bytes_read += nbytes

    def _byte_range(self, key: str) -> tuple[Path, int] | None:
        """File and byte offset of a safetensors tensor's data (None for .bin checkpoints)."""
        filename = self.key_to_file[key]
        if not filename.endswith(".safetensors"):
            return None
        if filename not in self._data_offsets:
            # safe_open has already checked the header against the file; this only finds offsets.
            data_start, entries = safetensors_header(self.directory / filename)
            self._data_offsets[filename] = {
                name: data_start + entry["data_offsets"][0] for name, entry in entries.items()
            }
        return self.directory / filename, self._data_offsets[filename][key]


def _read_runs(path: Path, offsets: list[int], run: int, out: torch.Tensor) -> None:
    """Fill the contiguous tensor `out` with `run` bytes from each offset of `path` in turn (a column
    slice of a row-major matrix: one run per row), through one file descriptor."""
    target = memoryview((ctypes.c_ubyte * (run * len(offsets))).from_address(out.data_ptr())).cast("B")
    with open(path, "rb", buffering=0) as handle:
        for i, offset in enumerate(offsets):
            done = 0
            while done < run:
                got = os.preadv(handle.fileno(), [target[i * run + done : (i + 1) * run]], offset + done)
                if not got:
                    raise CheckpointError(f"{path}: the file ends inside the tensor at offset {offset} (changed?)")
                done += got


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets) and where data starts."""
    with open(path, "rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_bytes))
    return 8 + header_bytes, {name: entry for name, entry in header.items() if name != "__metadata__"}


# ------------------------------------------------------------------------------------------------
# Writing


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB" (decimal) or "4GiB" (binary), as transformers reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise CheckpointError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if match is None:
        raise CheckpointError(f"max_shard_size {size!r} is not a size like '5GB', '500MB' or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    factors.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    value = int(number * factors[unit])
    if value <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split keys, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    """model.safetensors, or model-00001-of-0000N.safetensors ... for N shards."""
    if count == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Write tensors as model.safetensors or numbered shards plus index; return the file names."""
    sizes = {key: t.numel() * t.element_size() for key, t in tensors.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, shards):
        save_file({key: tensors[key] for key in keys}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in keys})
    if len(shards) == 1:
        return names
    write_index(directory, weight_map, sum(sizes.values()))
    return [*names, SAFE_INDEX]


_WEIGHT_FILE = re.compile(
    r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?)$"
)


def check_new_output(out: Path, force: bool) -> None:
    """Refuse to overwrite a file or a non-empty directory unless forced (commands writing --out)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"{out}: exists and is not empty (pass --force to replace it)")


class AtomicDirectory:
    """Write files into a temporary directory beside `target`; swap it in on success only.

    A new target is created by one rename. For an existing target, its other files (a tokenizer,
    say) are hard-linked or copied into the temporary directory, except weight files the new save
    replaces (stale shards of an earlier save), so the temporary directory becomes the complete new
    checkpoint; then the old directory is renamed aside, the new one renamed into place, and the old
    one deleted. Any failure leaves the old directory as it was. With keep_other_files=False the
    new directory replaces the old one whole.
    """

    def __init__(self, target: str | Path, keep_other_files: bool = True) -> None:
        self.target = Path(target)
        self.keep_other_files = keep_other_files
        tag = uuid.uuid4().hex[:8]
        self.path = self.target.parent / f".{self.target.name}.tmp-{tag}"
        self.backup = self.target.parent / f".{self.target.name}.old-{tag}"

    def __enter__(self) -> Path:
        if self.target.exists() and not self.target.is_dir():
            raise CheckpointError(f"{self.target}: exists and is not a directory")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self.path

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            if self.target.exists():
                if self.keep_other_files:
                    self._carry_over_other_files()
                os.rename(self.target, self.backup)
                try:
                    os.rename(self.path, self.target)
                except BaseException:
                    os.rename(self.backup, self.target)
                    raise
                shutil.rmtree(self.backup, ignore_errors=True)
            else:
                os.rename(self.path, self.target)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)

    def _carry_over_other_files(self) -> None:
        written = {p.name for p in self.path.iterdir()}
        for old in self.target.iterdir():
            if old.name in written or _WEIGHT_FILE.match(old.name):
                continue
            if old.is_dir():
                shutil.copytree(old, self.path / old.name, copy_function=_link_or_copy, symlinks=True)
            else:
                _link_or_copy(old, self.path / old.name)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file by writing a temporary sibling and renaming it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
