"""Reading Google's original Gemma 2 checkpoints lazily: names, shapes and dtypes first, data on demand.

Two formats (GEMMA2.md section 5):

- PyTorch (google/gemma_pytorch): `model.ckpt`, a torch.save dict with the weights under
  `model_state_dict`, or a directory of `*.bin` / `*.ckpt` shards (optionally with an index). Files are
  memory-mapped, so a tensor's bytes are read only when it is converted.
- Flax/Orbax (google-deepmind/gemma): an Orbax checkpoint directory whose tree has keys such as
  `transformer/layer_0/attn/q_einsum` with leaves `w`, `scale`, `input_embedding`. Each array is
  restored on its own (Orbax partial restore), so only one is in memory at a time. Needs the
  optional `orbax-checkpoint` package (`pip install gemma2[flax]`).

Every source tensor is named by its path with `/` before the leaf (`transformer/embedder/input_embedding`)
for Flax, and by its state-dict key for PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemma2.errors import CheckpointError


@dataclass
class SourceTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    load: Callable[[], torch.Tensor]
    # Drops the tensor's memory-mapped pages once it has been converted (None: nothing to drop).
    release: Callable[[], None] | None = None
    # load() returns a view of a private file mapping, whose pages may be dropped after reading.
    mapped: bool = False


Source = dict[str, SourceTensor]

ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
PYTORCH_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def detect_format(path: Path) -> str:
    """'pytorch' or 'flax' from the files at `path`."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in PYTORCH_SUFFIXES:
            return "pytorch"
        raise CheckpointError(
            f"{path}: not a Gemma 2 checkpoint (expected model.ckpt, *.bin shards or an Orbax directory)"
        )
    names = {p.name for p in path.iterdir()}
    if any(marker in names for marker in ORBAX_MARKERS):
        return "flax"
    if any(name.endswith(PYTORCH_SUFFIXES) for name in names):
        return "pytorch"
    if "config.json" in names and any(name.endswith(".safetensors") for name in names):
        raise CheckpointError(f"{path}: already a Hugging Face checkpoint; load it with from_pretrained directly")
    raise CheckpointError(f"{path}: not a Gemma 2 checkpoint (no model.ckpt, *.bin shards or Orbax files)")


# ------------------------------------------------------------------------------------------------
# PyTorch


def _torch_load(path: Path) -> tuple[Any, bool]:
    """The loaded object, and whether its tensors are memory-mapped from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as error:
        if "mmap" not in str(error) and "zip" not in str(error).lower():
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None
    try:  # the legacy (non-zip) format cannot be memory-mapped: read it whole
        return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    """torch's load errors run to many lines of advice; the first says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _state_dict_of(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict) and "model_state_dict" in loaded:
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(f"{path}: not a Gemma checkpoint (expected a dict with 'model_state_dict')")
    tensors = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[str(key)] = value
    return tensors


def pytorch_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in PYTORCH_SUFFIXES and p.is_file())
    if not files:
        raise CheckpointError(f"{path}: no model.ckpt or *.bin files")
    index_files = [p for p in path.iterdir() if p.name.endswith(".index.json")]
    if index_files:
        try:
            weight_map = json.loads(index_files[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_files[0]}: not a valid checkpoint index ({error})") from None
        for name in sorted(set(weight_map.values())):
            if not (path / name).exists():
                raise CheckpointError(f"{index_files[0]}: shard {name} is missing")
        files = [path / name for name in sorted(set(weight_map.values()))]
    return files


def _constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor  # memory-mapped: its bytes are read when the tensor is first used


def _releaser(tensor: torch.Tensor) -> Callable[[], None]:
    return lambda: release_pages(tensor)


def release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel a memory-mapped tensor's pages are no longer needed (only for file mappings:
    on ordinary memory MADV_DONTNEED would zero the data).

    Pages of a memory-mapped checkpoint stay in the process's resident set once read, so a
    conversion that reads every tensor would end up holding the whole file. The mapping is private
    and never written, so dropping the pages is safe: a later read faults them in from the file
    (usually from the page cache). A no-op where madvise is unavailable.
    """
    try:
        import ctypes
        import mmap

        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start = tensor.data_ptr()
        stop = start + tensor.numel() * tensor.element_size()
        first, last = (start + page - 1) // page * page, stop // page * page  # whole pages only
        if last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


def read_pytorch(path: Path) -> Source:
    source: Source = {}
    for file in pytorch_files(path):
        loaded, mapped = _torch_load(file)
        for key, tensor in _state_dict_of(file, loaded).items():
            if key in source:
                raise CheckpointError(f"{file}: tensor {key!r} also appears in {source[key].file.name}")
            release = _releaser(tensor) if mapped else None
            source[key] = SourceTensor(tuple(tensor.shape), tensor.dtype, file, _constant(tensor), release, mapped)
    return source


# ------------------------------------------------------------------------------------------------
# Flax / Orbax


def _numpy_to_torch(array: Any) -> torch.Tensor:
    import numpy as np

    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch wants writable memory; restored arrays usually are
        array = array.copy()
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: reinterpret the bits, no copy
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _torch_dtype(name: str) -> torch.dtype:
    table = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
    if name not in table:
        raise CheckpointError(f"unsupported array dtype {name} in the Orbax checkpoint")
    return table[name]


def read_flax(path: Path) -> Source:
    try:
        import numpy as np
        import orbax.checkpoint as ocp
    except ImportError:
        raise CheckpointError(
            f"{path}: reading Flax/Orbax checkpoints needs orbax-checkpoint: pip install 'gemma2[flax]'"
        ) from None
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(path).item_metadata
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: not a Gemma Orbax checkpoint (its tree is a {type(tree).__name__})")

    source: Source = {}

    def visit(node: Any, keys: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                visit(child, (*keys, str(key)))
            return
        name = "/".join(keys)
        shape = tuple(int(n) for n in node.shape)
        dtype = _torch_dtype(str(np.dtype(node.dtype)))

        def load(keys: tuple[str, ...] = keys, shape: tuple[int, ...] = shape) -> torch.Tensor:
            item: Any = np.zeros((), dtype=np.float32)
            restore: Any = ocp.RestoreArgs(restore_type=np.ndarray)
            for key in reversed(keys):
                item, restore = {key: item}, {key: restore}
            try:
                restored = checkpointer.restore(
                    path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore, partial_restore=True)
                )
            except Exception as error:
                raise CheckpointError(f"{path}: cannot read array {name!r} ({type(error).__name__}: {error})") from None
            for key in keys:
                restored = restored[key]
            tensor = _numpy_to_torch(restored)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{path}: array {name!r} has shape {list(tensor.shape)}, metadata says {list(shape)}"
                )
            return tensor

        source[name] = SourceTensor(shape, dtype, path, load)

    visit(tree, ())
    if not source:
        raise CheckpointError(f"{path}: the Orbax checkpoint holds no arrays")
    return source
