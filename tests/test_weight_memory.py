"""Loaded weights live in the process's own memory, large ones on huge-page boundaries."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gemma2.errors import CheckpointError
from gemma2.io import weight_memory
from gemma2.io.checkpoint import CheckpointReader


def test_empty_bytes_gives_writable_memory_of_the_size_asked() -> None:
    smallest_huge = weight_memory.SMALLEST_HUGE_PAGE_TENSOR
    for nbytes in (0, 1, 4095, smallest_huge - 1, smallest_huge + 3):
        tensor = weight_memory.empty_bytes(nbytes)
        assert tensor.dtype == torch.uint8 and tensor.shape == (nbytes,)
        tensor.fill_(7)
        assert int(tensor.sum()) == 7 * nbytes


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages on this OS")
def test_large_tensors_start_on_a_huge_page_boundary() -> None:
    tensor = weight_memory.empty_bytes(weight_memory.SMALLEST_HUGE_PAGE_TENSOR)
    assert tensor.data_ptr() % weight_memory.HUGE_PAGE_BYTES == 0


def test_huge_pages_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    mapped: list[int] = []
    real = mmap.mmap

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        mapped.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", spy)
    weight_memory.empty_bytes(weight_memory.SMALLEST_HUGE_PAGE_TENSOR)
    assert len(mapped) == (1 if hasattr(mmap, "MADV_HUGEPAGE") else 0)
    monkeypatch.setenv("GEMMA2_HUGE_PAGES", "0")
    out = weight_memory.empty_bytes(weight_memory.SMALLEST_HUGE_PAGE_TENSOR)
    assert len(mapped) == (1 if hasattr(mmap, "MADV_HUGEPAGE") else 0)  # no new mapping
    assert out.numel() == weight_memory.SMALLEST_HUGE_PAGE_TENSOR
    out.fill_(7)


def test_reader_read_equals_the_mapped_tensor_for_every_dtype_and_shape(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    big = weight_memory.SMALLEST_HUGE_PAGE_TENSOR // 2 + 5  # bf16 elements: a huge-page tensor
    tensors = {
        "big": torch.randn(big, generator=g).bfloat16(),
        "matrix": torch.randn(37, 11, generator=g),
        "ints": torch.randint(-128, 128, (3, 5), generator=g, dtype=torch.int8),
        "bytes": torch.randint(0, 256, (129,), generator=g, dtype=torch.uint8),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    for key, want in tensors.items():
        got = reader.read(key)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got, want), key
        got.add_(1) if got.is_floating_point() else got.bitwise_not_()  # its own memory: writable, file untouched
    for key, want in tensors.items():
        assert torch.equal(reader.get(key), want)
    converted = reader.read("big", torch.float32)
    assert converted.dtype == torch.float32 and torch.equal(converted, tensors["big"].float())


def test_reader_read_of_a_bin_checkpoint(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(12.0).view(3, 4)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader.read("w"), tensors["w"])
    assert torch.equal(reader.read("w", torch.bfloat16), tensors["w"].bfloat16())


def test_a_file_cut_short_while_reading_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(100))
    out = torch.empty(64, dtype=torch.uint8)
    weight_memory.read_into(path, 36, out)  # exactly to the end: fine
    with pytest.raises(CheckpointError, match=r"data\.bin: 1 bytes short of the tensor at offset 37"):
        weight_memory.read_into(path, 37, out)
