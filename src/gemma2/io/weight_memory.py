"""Memory for loaded weights: the process's own, on transparent huge pages where the OS offers them.

Decoding reads every weight once per token. Read from a memory-mapped checkpoint, those reads go
through 4 KiB page-cache pages, one TLB entry each; in anonymous memory with MADV_HUGEPAGE Linux
backs them with 2 MiB pages, and a decode step of gemma-2-2b ran 13 % faster that way at this
machine's higher memory-bandwidth moments (and the same otherwise). Small tensors, and systems
without MADV_HUGEPAGE, get ordinary memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

from gemma2.errors import CheckpointError

HUGE_PAGE_BYTES = 2 * 1024 * 1024
SMALLEST_HUGE_PAGE_TENSOR = 2 * HUGE_PAGE_BYTES  # below this, aligning would waste more than it gains
READ_CHUNK_BYTES = 1 << 30  # one read() call returns at most about 2 GiB on Linux


def huge_pages_wanted() -> bool:
    """False when GEMMA2_HUGE_PAGES=0: where the OS must compact memory to find huge pages, loading
    can take seconds longer (gemma-2-2b: 2 to 10 s here), which someone may not want to pay."""
    return os.environ.get("GEMMA2_HUGE_PAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def empty_bytes(nbytes: int) -> torch.Tensor:
    """A new uint8 tensor [nbytes]; a large one starts on a huge-page boundary of MADV_HUGEPAGE memory."""
    if nbytes < SMALLEST_HUGE_PAGE_TENSOR or not huge_pages_wanted():
        return torch.empty(nbytes, dtype=torch.uint8)
    # Private: a shared anonymous mapping is shmem, which gets neither huge pages nor fast faults.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=-address % HUGE_PAGE_BYTES)


def read_into(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor `out` with the bytes of `path` from `offset`."""
    nbytes = out.numel() * out.element_size()
    if nbytes == 0:
        return
    target = memoryview((ctypes.c_ubyte * nbytes).from_address(out.data_ptr())).cast("B")
    done = 0
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        while done < nbytes:
            got = handle.readinto(target[done : done + READ_CHUNK_BYTES])
            if not got:
                raise CheckpointError(
                    f"{path}: {nbytes - done} bytes short of the tensor at offset {offset} (changed while loading?)"
                )
            done += got
