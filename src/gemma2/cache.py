"""Key/value caches: an object passed into the model's forward and returned, never module state.

Gemma 2 alternates two kinds of layers, and each gets the cache it needs:

- FullAttentionCache keeps every past key in one buffer, preallocated when the caller knows the
  final length (generation) and grown by doubling otherwise.
- SlidingWindowCache keeps a ring buffer of W slots. A decode step writes its key into the slot
  of the key that just left the window, then attends over the ring: exactly the last W keys
  (including itself), never W + 1 (a known off-by-one elsewhere). A chunk of several tokens
  attends over ring + chunk before writing, because the chunk's own writes would overwrite keys
  its earlier queries still need.

Each update returns the keys, values and the slot of every key; the attention mask is built from
those slots, so the mask follows the cache rather than being guessed by the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gemma2.config import Gemma2Config
from gemma2.errors import InputError


@dataclass
class DecodeSlot:
    """Where one decode step's key and value go, and which slots it attends over."""

    keys: torch.Tensor  # [B, K, capacity, D], the cache's own buffers
    values: torch.Tensor
    positions: torch.Tensor | None  # [capacity] position of each slot (-1 empty); None: slot s holds position s
    slots: int  # attend over slots 0 .. slots - 1 (the new one included)
    slot: int  # the new token's slot


class FullAttentionCache:
    """Every past key and value of one full-attention layer: buffers [B, K, capacity, D]."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        B, K, _, D = like.shape
        if self.keys is None or self.values is None:
            size = max(needed, self.capacity or 0)
            self.keys = like.new_empty(B, K, size, D)
            self.values = like.new_empty(B, K, size, D)
        elif needed > self.keys.shape[2]:
            size = max(needed, 2 * self.keys.shape[2])
            grown_k, grown_v = like.new_empty(B, K, size, D), like.new_empty(B, K, size, D)
            grown_k[:, :, : self.length] = self.keys[:, :, : self.length]
            grown_v[:, :, : self.length] = self.values[:, :, : self.length]
            self.keys, self.values = grown_k, grown_v

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append key/value [B, K, C, D]; return all keys, values [B, K, S, D] and their slots [S]."""
        _check_batch(self.keys, key)
        start, stop = self.length, self.length + key.shape[2]
        self._reserve(key, stop)
        assert self.keys is not None and self.values is not None
        self.keys[:, :, start:stop] = key
        self.values[:, :, start:stop] = value
        self.length = stop
        positions = torch.arange(stop, device=key.device)
        return self.keys[:, :, :stop], self.values[:, :, :stop], positions

    def decode_slot(self, like: Callable[[], torch.Tensor]) -> DecodeSlot:
        """Room for one more token, to be filled by a native decode layer.

        like() gives a [B, K, 1, D] tensor to allocate from (called only when the buffers must
        be allocated or grow). Nothing is recorded until `commit_decode`, so a caller that falls
        back to `update` can.
        """
        if self.keys is None or self.length + 1 > self.keys.shape[2]:
            self._reserve(like(), self.length + 1)
        assert self.keys is not None and self.values is not None
        return DecodeSlot(self.keys, self.values, None, self.length + 1, self.length)

    def commit_decode(self) -> None:
        self.length += 1

    def memory_bytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


class SlidingWindowCache:
    """The last W keys and values of one sliding-window layer, in a ring buffer of W slots.

    When the caller knows the sequence stays shorter than W (`capacity`), the ring is that long
    instead; it grows to W if the sequence outgrows it (no slot has wrapped by then).
    """

    def __init__(self, window: int, capacity: int | None = None) -> None:
        self.window = window
        self.capacity = min(window, capacity) if capacity else window
        self.keys: torch.Tensor | None = None  # [B, K, slots, D]
        self.values: torch.Tensor | None = None
        self.slot_positions: torch.Tensor | None = None  # [slots]; -1 for a slot not yet written
        self.length = 0

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        B, K, _, D = like.shape
        if self.keys is None or self.values is None or self.slot_positions is None:
            self.keys = like.new_zeros(B, K, self.capacity, D)
            self.values = like.new_zeros(B, K, self.capacity, D)
            self.slot_positions = torch.full((self.capacity,), -1, dtype=torch.long, device=like.device)
        if needed > self.capacity and self.capacity < self.window:
            # Outgrew a short ring before any slot wrapped: slots equal positions, so just extend.
            extra = self.window - self.capacity
            self.keys = torch.cat([self.keys, like.new_zeros(B, K, extra, D)], dim=2)
            self.values = torch.cat([self.values, like.new_zeros(B, K, extra, D)], dim=2)
            self.slot_positions = torch.cat([self.slot_positions, self.slot_positions.new_full((extra,), -1)])
            self.capacity = self.window

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add key/value [B, K, C, D]; return the keys, values and slots this chunk may attend to."""
        _check_batch(self.keys, key)
        C = key.shape[2]
        start = self.length
        self._reserve(key, start + C)
        assert self.keys is not None and self.values is not None and self.slot_positions is not None
        ring = self.capacity
        new_positions = torch.arange(start, start + C, device=key.device)
        if C == 1:
            slot = start % ring
            self.keys[:, :, slot] = key[:, :, 0]
            self.values[:, :, slot] = value[:, :, 0]
            self.slot_positions[slot] = start
            self.length += 1
            return self.keys, self.values, self.slot_positions
        keys = torch.cat([self.keys, key], dim=2)
        values = torch.cat([self.values, value], dim=2)
        positions = torch.cat([self.slot_positions, new_positions])
        kept = min(C, ring)  # only the chunk's last W keys can be seen by later queries
        slots = new_positions[-kept:] % ring
        self.keys[:, :, slots] = key[:, :, -kept:]
        self.values[:, :, slots] = value[:, :, -kept:]
        self.slot_positions[slots] = new_positions[-kept:]
        self.length += C
        return keys, values, positions

    def decode_slot(self, like: Callable[[], torch.Tensor]) -> DecodeSlot:
        """As FullAttentionCache.decode_slot: the ring slot of the key that leaves the window."""
        if self.keys is None or self.length + 1 > self.capacity:
            self._reserve(like(), self.length + 1)
        assert self.keys is not None and self.values is not None and self.slot_positions is not None
        return DecodeSlot(self.keys, self.values, self.slot_positions, self.capacity, self.length % self.capacity)

    def commit_decode(self) -> None:
        assert self.slot_positions is not None
        self.slot_positions[self.length % self.capacity] = self.length
        self.length += 1

    def memory_bytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


LayerCache = FullAttentionCache | SlidingWindowCache


class Gemma2Cache:
    """Per-layer caches for a whole model, plus the number of slots seen so far.

    Pass `max_length` (prompt + new tokens) to allocate full-layer buffers once; without it they
    grow as needed. Sliding layers never hold more than `sliding_window` slots.
    """

    def __init__(self, config: Gemma2Config, max_length: int | None = None) -> None:
        self.layers: list[LayerCache] = []
        for i in range(config.num_hidden_layers):
            if config.is_sliding(i):
                assert config.sliding_window is not None
                self.layers.append(SlidingWindowCache(config.sliding_window, capacity=max_length))
            else:
                self.layers.append(FullAttentionCache(max_length))
        self.seq_length = 0

    def get_seq_length(self) -> int:
        """Slots (tokens, padding included) already in the cache."""
        return self.seq_length

    def memory_bytes(self) -> int:
        return sum(layer.memory_bytes() for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def cache_memory_bytes(config: Gemma2Config, length: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes of keys and values for `length` tokens: full layers hold all, sliding layers the window."""
    per_token = 2 * batch * config.num_key_value_heads * config.head_dim * bytes_per_value
    total = 0
    for i in range(config.num_hidden_layers):
        slots = min(length, config.sliding_window or length) if config.is_sliding(i) else length
        total += slots * per_token
    return total


def _check_batch(existing: torch.Tensor | None, key: torch.Tensor) -> None:
    if existing is not None and existing.shape[0] != key.shape[0]:
        raise InputError(f"batch size {key.shape[0]} does not match the cache's batch size {existing.shape[0]}")


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
